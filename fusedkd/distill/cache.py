"""Where the embedded default keeps what it builds once (tokenizer, trained teacher), and how it writes it.

The cache root is ``--cache-dir``, else ``$FUSEDKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusedkd``, else
``~/.cache/fusedkd``. Every entry is a directory named for a hash of everything that determines its
contents, written under a temporary name and renamed into place when complete: an interrupted build
leaves no half-written entry, and a second run finds the finished one and reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE_ENV = "FUSEDKD_CACHE_DIR"


def default_cache_dir() -> Path:
    """The cache root when ``--cache-dir`` is not given (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fusedkd"


def cache_key(*parts: object) -> str:
    """A short stable hash of JSON-serializable `parts` (12 hex digits).

    Example:
        >>> cache_key({"vocab": 4096}, "py3.11-abc") == cache_key({"vocab": 4096}, "py3.11-abc")
        True
    """
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@contextmanager
def building(entry: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `entry`; rename it to `entry` if the block succeeds.

    If another process finished the same entry in the meantime, its copy is kept and ours discarded.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        yield scratch
        try:
            os.rename(scratch, entry)
        except OSError:
            if not entry.is_dir():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
