"""Exit codes and the one exception the recipe raises for bad input (this module imports none of it)."""

from __future__ import annotations

EXIT_OK = 0  # the run finished
EXIT_USAGE = 2  # bad input: one ``error: ...`` line on stderr, nothing already saved is touched
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C / SIGTERM (a real run saves a checkpoint first)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (another library's, for a one-line error), or its type."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class UsageError(Exception):
    """Bad input: `cli.main` prints ``error: <message>`` (what is wrong and, when it can, what to do) on one
    line and returns `EXIT_USAGE`, before anything already saved is touched."""
