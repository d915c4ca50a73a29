"""Which backend computes a loss: one rule for every public loss (docs/design.md §8).

``backend="auto"`` runs the Triton kernels on CUDA tensors when Triton can run there, else the
token-chunked PyTorch backend; ``"torch"`` and ``"triton"`` ask for one by name. Each public loss then
calls the chosen backend's entry point itself, a plain call a reader can follow, with `torch.autocast`
off (`fusedkd._autograd.autocast_off`: the inputs were cast first, `fusedkd._inputs.autocast_cast`).
"""

from __future__ import annotations

import torch

from fusedkd._options import KDOptions, check_backend


def resolve_backend(
    backend: str, device: torch.device, dtype: torch.dtype = torch.float32, *, has_triton: bool = True
) -> str:
    """The backend `backend` names for tensors of `dtype` on `device`: "torch" or "triton" (raises if the
    request cannot run). "auto" leaves float64, which the Triton kernels do not take, to torch."""
    check_backend(backend, has_triton=has_triton)
    if backend == "torch" or not has_triton:
        return "torch"
    from fusedkd import kernels  # imports Triton: only when it may run

    reason = kernels.unavailable_reason(device)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run here: {reason}")
        return "triton"
    return "triton" if device.type == "cuda" and reason is None and dtype != torch.float64 else "torch"


def backend_for(options: KDOptions, device: torch.device, dtype: torch.dtype) -> str:
    """`resolve_backend` for a loss call's `options`; `chunk_size` is the torch backend's only."""
    chosen = resolve_backend(options.backend, device, dtype, has_triton=options.HAS_TRITON)
    if options.chunk_size is not None and chosen != "torch":
        raise ValueError("chunk_size applies to backend='torch' only; the Triton backend tiles itself")
    return chosen


def shaped_outputs(
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], options: KDOptions, leading_shape: torch.Size
):
    """The loss, or (loss, distill, ce), per-token values (reduction "none") in the leading shape."""
    if options.reduction == "none":
        outputs = tuple(x.reshape(leading_shape) for x in outputs)
    return outputs if options.return_components else outputs[0]
