"""Which backend computes a loss, and the call to it: one place for every public loss.

`backend` and `chunk_size` are checked here and nowhere else; the chosen backend's entry point runs
with `torch.autocast` off (the inputs were cast first, `fusedkd._inputs.autocast_cast`), and its flat
outputs come back in the caller's leading shape.
"""

from __future__ import annotations

from importlib import import_module

import torch

from fusedkd._autograd import autocast_off
from fusedkd._options import BACKENDS, check_positive_int


def check_backend(backend: str, *, has_triton: bool = True, loss: str = "this loss") -> str:
    """`backend` is one of `BACKENDS`, and not "triton" for a loss without Triton kernels."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "triton" and not has_triton:
        raise ValueError(
            f"{loss} has no Triton kernel: use backend='torch' or 'auto' (the token-chunked PyTorch "
            "backend, on any device)"
        )
    return backend


def resolve_backend(
    backend: str, device: torch.device, *, has_triton: bool = True, loss: str = "this loss"
) -> str:
    """The backend that will run on `device`: "torch" or "triton" (raises if the request cannot run)."""
    check_backend(backend, has_triton=has_triton, loss=loss)
    if not has_triton:
        return "torch"
    from fusedkd import kernels

    if backend == "auto":
        if device.type == "cuda" and kernels.unavailable_reason(device) is None:
            return "triton"
        return "torch"
    if backend == "triton":
        reason = kernels.unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run here: {reason}")
    return backend


def check_chunk_size(chunk_size: int | None, backend: str) -> None:
    """`chunk_size` is None, or a positive int for the torch backend (the Triton kernels tile themselves)."""
    if chunk_size is None:
        return
    if backend != "torch":
        raise ValueError("chunk_size applies to backend='torch' only; the Triton backend tiles itself")
    check_positive_int("chunk_size", chunk_size)


def run_loss(
    args: tuple,
    *,
    backend: str,
    device: torch.device,
    chunk_size: int | None,
    torch_entry: str,
    triton_entry: str | None = None,
    loss: str = "this loss",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, distill, ce) of the backend `backend` resolves to on `device`, from its entry point
    (``"module:function"``) called on the prepared `args`, with autocast off."""
    chosen = resolve_backend(backend, device, has_triton=triton_entry is not None, loss=loss)
    check_chunk_size(chunk_size, chosen)
    module, name = (torch_entry if chosen == "torch" else triton_entry).split(":")
    entry = getattr(import_module(module), name)
    kwargs = {"chunk_size": chunk_size} if chosen == "torch" else {}
    with autocast_off(device):
        return entry(*args, **kwargs)


def shaped_outputs(
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    reduction: str,
    leading_shape: torch.Size,
    return_components: bool,
):
    """The loss, or (loss, distill, ce), per-token values (reduction "none") in the leading shape."""
    if reduction == "none":
        outputs = tuple(x.reshape(leading_shape) for x in outputs)
    return outputs if return_components else outputs[0]
