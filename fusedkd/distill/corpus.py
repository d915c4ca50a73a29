"""The embedded default's corpus: a fixed selection of the Python standard library's own source files.

Every machine that runs fusedkd has these files, and nobody in this project wrote them. The selection is
fixed by module name (`TRAIN_MODULES`, `HELDOUT_MODULES`); a module is read from ``<stdlib>/<name>.py``
or, for the ones that became packages in later Pythons, ``<stdlib>/<name>/__init__.py``. The *contents*
are those of the Python that runs the recipe, so the numbers of the default differ slightly between
Python versions (the fingerprint of the corpus, part of every cache key, says which one was used).
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from fusedkd.distill.errors import UsageError

# Held out for evaluation: never seen by the tokenizer trainer, the teacher or the students.
HELDOUT_MODULES: tuple[str, ...] = ("argparse", "difflib", "fractions", "statistics", "textwrap")

# Training text: general-purpose modules present in every Python from 3.10 on (sorted by name).
TRAIN_MODULES: tuple[str, ...] = (
    "_collections_abc", "_compat_pickle", "_markupbase", "_pydecimal", "_pyio", "_strptime",
    "_threading_local", "_weakrefset", "abc", "ast", "base64", "bdb", "bisect", "calendar", "cmd",
    "code", "codecs", "codeop", "colorsys", "compileall", "configparser", "contextlib", "copy", "copyreg",
    "csv", "dataclasses", "dis", "doctest", "enum", "filecmp", "fileinput", "fnmatch", "ftplib",
    "functools", "genericpath", "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib",
    "heapq", "hmac", "imaplib", "inspect", "ipaddress", "keyword", "linecache", "locale", "lzma",
    "mailbox", "mimetypes", "modulefinder", "netrc", "ntpath", "numbers", "opcode", "operator",
    "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib",
    "poplib", "posixpath", "pprint", "profile", "pstats", "py_compile", "pyclbr", "pydoc", "queue",
    "quopri", "random", "reprlib", "rlcompleter", "runpy", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "signal", "site", "smtplib", "socket", "socketserver", "ssl", "stat", "string",
    "stringprep", "struct", "subprocess", "symtable", "tabnanny", "tarfile", "tempfile", "threading",
    "timeit", "token", "tokenize", "trace", "traceback", "tracemalloc", "tty", "turtle", "types", "typing",
    "uuid", "warnings", "wave", "weakref", "webbrowser", "zipapp", "zipfile", "zipimport",
)  # fmt: skip

# A Python that lacks more than this fraction of the modules is too different to stand for the default.
MAX_MISSING_FRACTION = 0.1


@dataclass(frozen=True)
class Document:
    """One source file: its module name and its text."""

    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """Training and held-out documents, and a fingerprint of their exact contents."""

    train: tuple[Document, ...]
    heldout: tuple[Document, ...]
    fingerprint: str

    @property
    def num_chars(self) -> tuple[int, int]:
        """(training characters, held-out characters)."""
        return sum(len(d.text) for d in self.train), sum(len(d.text) for d in self.heldout)


def stdlib_dir() -> Path:
    """The directory of the running Python's standard library source."""
    return Path(sysconfig.get_paths()["stdlib"])


def module_path(root: Path, name: str) -> Path | None:
    """``root/name.py`` or ``root/name/__init__.py``, whichever exists (None if neither)."""
    for candidate in (root / f"{name}.py", root / name / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _read(root: Path, names: tuple[str, ...], role: str) -> tuple[Document, ...]:
    documents, missing = [], []
    for name in names:
        path = module_path(root, name)
        if path is None:
            missing.append(name)
            continue
        documents.append(Document(name, path.read_text(encoding="utf-8", errors="replace")))
    if len(missing) > MAX_MISSING_FRACTION * len(names):
        raise UsageError(
            f"the standard library at {root} lacks {len(missing)} of the {len(names)} {role} modules of the "
            f"default corpus (e.g. {', '.join(missing[:3])}); run with a full CPython 3.10+ install"
        )
    return tuple(documents)


def stdlib_corpus(root: Path | None = None) -> Corpus:
    """Read the default corpus from `root` (default: the running Python's standard library).

    Example:
        >>> corpus = stdlib_corpus()
        >>> [d.name for d in corpus.heldout]
        ['argparse', 'difflib', 'fractions', 'statistics', 'textwrap']
        >>> corpus.num_chars[0] > 1_000_000
        True
    """
    root = stdlib_dir() if root is None else Path(root)
    train = _read(root, TRAIN_MODULES, "training")
    heldout = _read(root, HELDOUT_MODULES, "held-out")
    digest = hashlib.sha256()
    for role, documents in (("train", train), ("heldout", heldout)):
        for document in documents:
            digest.update(f"{role}:{document.name}:{len(document.text)}\n".encode())
            digest.update(document.text.encode("utf-8", errors="replace"))
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return Corpus(train=train, heldout=heldout, fingerprint=f"{version}-{digest.hexdigest()[:12]}")
