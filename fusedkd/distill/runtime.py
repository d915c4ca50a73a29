"""Helpers both modes share (the embedded default in `recipe`, real runs in `run`).

Precision, output directories and rank-0 printing live here, not in either mode's module, so that
the two modes import neither each other nor the command line.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fusedkd.distill.checkpoint import CHECKPOINT_NAME
from fusedkd.distill.distributed import DistContext, broadcast_object
from fusedkd.distill.errors import UsageError
from fusedkd.distill.trainer import METRICS_NAME

FINAL_NAME = "final"


def say(ctx: DistContext, message: str) -> None:
    """Print on rank 0 only."""
    if ctx.is_main:
        print(message, flush=True)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 for ``bf16`` (and for ``auto`` on a CUDA device with bf16), else None."""
    if precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    ):
        return torch.bfloat16
    return None


def writable_dir(path: str, flag: str, ctx: DistContext) -> Path:
    """`path` created if needed and checked writable (by every process), else a `UsageError`."""
    directory = Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{ctx.rank}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"{flag} {str(directory)!r} is not writable: {exc.strerror or exc}") from None
    return directory


def prepare_output_dir(path: str | None, *, mode: str, resume: bool, ctx: DistContext) -> Path:
    """The run directory, created and checked writable; never one whose saved run would be overwritten."""
    if path is None:
        if resume:
            raise UsageError("--resume needs the --output-dir of the run to continue")
        path = broadcast_object(f"runs/{mode}-{time.strftime('%Y%m%d-%H%M%S')}", ctx)
    directory = Path(path).expanduser()
    if not resume:
        for name, what in ((CHECKPOINT_NAME, "a checkpoint"), (FINAL_NAME, "a finished run")):
            if (directory / name).exists():
                raise UsageError(
                    f"--output-dir {str(directory)!r} already holds {what}; pass --resume to continue it, "
                    "or choose another --output-dir"
                )
    directory = writable_dir(str(directory), "--output-dir", ctx)
    if not resume:
        discard_stale_metrics(directory, ctx)
    return directory


def discard_stale_metrics(directory: Path, ctx: DistContext) -> bool:
    """Remove a ``metrics.jsonl`` a fresh run finds in `directory` (and say so); True if there was one.

    A directory with a checkpoint or a finished run is refused before this; a metrics log without them is
    from an attempt that stopped before its first checkpoint, which cannot be resumed: the new run starts
    clean rather than append its steps to the dead attempt's.
    """
    path = directory / METRICS_NAME
    if not path.is_file():
        return False
    if ctx.is_main:
        path.unlink()
        print(
            f"{path}: left by an earlier attempt that stopped before its first checkpoint; removed, "
            "this run starts clean",
            flush=True,
        )
    return True
