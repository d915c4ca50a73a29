"""Training checkpoints: one file, written atomically, from which a run continues exactly.

``<output_dir>/checkpoint.pt`` holds the student's full state dict, the optimizer's, the scheduler's,
the number of optimizer steps done (which is the data position, see `data.BatchPlan`), every process's
RNG states, and the run settings that must not change across a resume. It is written to a temporary
file, flushed to disk and renamed over the previous one: a crash or a second Ctrl-C during the write
leaves the previous checkpoint intact. Model and optimizer states are gathered to full tensors with
`torch.distributed.checkpoint.state_dict`, so DDP, FSDP2 and single-process runs write the same format.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from fusedkd.distill.distributed import DistContext, barrier, gather_objects
from fusedkd.distill.errors import UsageError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def rng_state() -> dict:
    """This process's RNG states (torch CPU and CUDA, Python, NumPy) as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _atomic_save(obj: object, path: Path) -> None:
    scratch = path.with_name(f".{path.name}.partial")
    with open(scratch, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(scratch, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    step: int,
    settings: dict,
    ctx: DistContext,
) -> None:
    """Write the checkpoint of a run that has done `step` optimizer steps (a collective: every rank calls)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    rng_states = gather_objects(rng_state(), ctx)
    if ctx.is_main:
        _atomic_save(
            {
                "format": FORMAT_VERSION,
                "step": step,
                "world_size": ctx.world_size,
                "settings": settings,
                "model": model_state,
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng": rng_states,
            },
            path,
        )
    barrier(ctx)


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's contents (tensors on the CPU), or a `UsageError` saying why it cannot be used."""
    if not path.is_file():
        raise UsageError(f"--resume: there is no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"--resume: cannot read {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise UsageError(f"--resume: {path} is not a fusedkd.distill checkpoint (format {FORMAT_VERSION})")
    return state


def check_resumable(state: dict, settings: dict, ctx: DistContext) -> None:
    """`UsageError` unless the checkpoint was written by a run with these settings and process count."""
    if state["world_size"] != ctx.world_size:
        raise UsageError(
            f"--resume: the checkpoint was written by {state['world_size']} process(es), this run has "
            f"{ctx.world_size}; resume with the same --nproc-per-node"
        )
    saved = state["settings"]
    differ = [
        f"{key} ({saved.get(key)!r} -> {settings.get(key)!r})"
        for key in sorted(set(saved) | set(settings))
        if saved.get(key) != settings.get(key)
    ]
    if differ:
        raise UsageError(
            "--resume: these settings differ from the checkpoint's, so the run would not continue exactly: "
            + ", ".join(differ)
        )


def restore_checkpoint(
    state: dict, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, ctx: DistContext
) -> int:
    """Load `state` into the model, optimizer, scheduler and RNGs; return the step to continue from."""
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][ctx.rank])
    return int(state["step"])
