"""Exit codes and the one exception the recipe raises for bad input.

Every module of the recipe may import this one; it imports nothing of the recipe.
"""

from __future__ import annotations

EXIT_OK = 0  # the run finished
EXIT_USAGE = 2  # bad input: one ``error: ...`` line on stderr, nothing already saved is touched
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C / SIGTERM (a real run saves a checkpoint first)


class UsageError(Exception):
    """Bad input (a missing model, an unusable dataset, an unwritable directory, conflicting options).

    `fusedkd.distill.cli.main` prints ``error: <message>`` on one line to stderr and returns `EXIT_USAGE`,
    before anything already saved is touched. The message says what is wrong and, when it can, what to do.
    """
