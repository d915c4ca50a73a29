"""The one exception the recipe raises for bad input: the CLI prints its message on one line, exits 2."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input (a missing model, an unusable dataset, an unwritable directory, conflicting options).

    `fusedkd.distill.cli.main` prints ``error: <message>`` on one line to stderr and returns exit code 2,
    before anything already saved is touched. The message says what is wrong and, when it can, what to do.
    """
