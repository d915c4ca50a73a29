"""Triton kernels of fusedkd and the autograd.Function over them (backend="triton").

This package imports without Triton; `unavailable_reason(device)` says whether the Triton backend can
run on a device and, if not, why. The kernels run on CUDA tensors, and on CPU tensors through Triton's
interpreter when `TRITON_INTERPRET=1` was set before Triton was first imported (docs/design.md §7).

Every file of the package:

    __init__.py             availability (`unavailable_reason`), `launch_device`
    tl_utils.py             the Triton helpers every kernel shares: the logit tile, the online
                            log-sum-exp convention and its merges, the KL shift, logaddexp
    config.py               tile configurations per model dtype, the persistent grids' sizes; opt-in
                            autotuning (FUSEDKD_AUTOTUNE=1)
    compile_check.py        compile every kernel as it is launched, for a GPU architecture, without a
                            GPU: registers, spills, shared memory, wgmma

  the fused linear KD loss (`fused_linear_kd_loss(..., backend="triton")`):
    fused_linear_kd.py      entry point, the problem struct and the autograd.Function, over the
                            passes below (each file launches its own kernels)
    statistics.py           pass 1: logit tiles + online log-sum-exp + one-pass KL -> O(N) statistics
                            (the statistics layout, STAT_*, is defined there once)
    jsd.py                  the JSD's second pass (it needs the final log-sum-exps)
    gradient.py             recompute the tiles, form G, accumulate the student's gradients

  the logits-level KD loss (`kd_loss(..., backend="triton")`):
    kd_logits.py            entry point and the autograd.Function
    kd_logits_forward.py    per-row statistics, D and C (and G for an output gradient of 1)
    kd_logits_backward.py   G from the saved per-row statistics (whose layout is defined there once)
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton  # noqa: F401

    TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install raising something else
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Whether `@triton.jit` functions in this package were made interpretable (read once, at import).
INTERPRETER: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device) -> str | None:
    """None if the Triton backend can run on `device`, else a sentence saying why not."""
    if TRITON_IMPORT_ERROR is not None:
        return f"Triton is not importable ({TRITON_IMPORT_ERROR}); install it with `pip install triton`"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if INTERPRETER:
            return None
        return (
            "the Triton kernels run on CPU tensors only through Triton's interpreter: set "
            "TRITON_INTERPRET=1 before the first `import triton` (slow; for testing), or use backend='torch'"
        )
    return f"the Triton kernels run on CUDA devices (or the CPU interpreter), not on {device.type!r}"


def launch_device(tensor: torch.Tensor):
    """The context every kernel launch runs under: the tensor's CUDA device (Triton launches on the
    current device, which need not be the inputs'), or nothing on the CPU (the interpreter)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
