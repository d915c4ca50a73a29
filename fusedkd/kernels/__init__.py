"""Triton kernels of fusedkd and the autograd.Function over them (backend="triton").

This package imports without Triton; `unavailable_reason(device)` says whether the Triton backend can
run on a device and, if not, why. The kernels run on CUDA tensors, and on CPU tensors through Triton's
interpreter when `TRITON_INTERPRET=1` was set before Triton was first imported (DESIGN.md §7).

The fused linear KD loss (`fused_linear_kd_loss(..., backend="triton")`):

    fused_linear_kd.py   entry point and the autograd.Function; launches the passes below
    statistics.py        pass 1: logit tiles + online log-sum-exp + one-pass KL -> O(N) statistics
    jsd.py               the JSD's second pass (it needs the final log-sum-exps)
    gradient.py          recompute the tiles, form G, accumulate the student's gradients
    tl_utils.py          shared Triton helpers: the logit tile, online LSE merges, the KL shift
    config.py            tile configurations per dtype; opt-in autotuning (FUSEDKD_AUTOTUNE=1, GPU)
    compile_check.py     compile them for a GPU architecture without a GPU; registers, spills, wgmma
"""

from __future__ import annotations

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
