"""Which backend computes a loss: one rule for every public loss (docs/design.md §8).

``backend="auto"`` runs the Triton kernels on CUDA tensors when Triton can run there, else the
token-chunked PyTorch backend; ``"torch"`` and ``"triton"`` ask for one by name. Each public loss then
calls the chosen backend's entry point itself, a plain call a reader can follow, with `torch.autocast`
off (`fusedkd._autograd.autocast_off`: the inputs were cast first, `fusedkd._inputs.autocast_cast`).
"""

from __future__ import annotations

import torch

from fusedkd._options import KDOptions, check_backend

# The tiles backend's working set per (token, vocabulary entry) of a chunk: the student's and the
# teacher's float32 logit tiles; G is written over the student's (16-bit heads) or a tile (float32).
TILES_BYTES_PER_ENTRY = 8
# Its default budget for those tiles, and the smallest chunk worth running it with (below that the
# weight-gradient GEMM, which reads and writes all of dW once per chunk, is bound by memory traffic).
TILES_MEMORY_BUDGET = 1200 * 2**20  # 1,024-token chunks at V = 151,936 (1,187 MiB of tiles)
MIN_TILES_CHUNK = 256
TILES_CHUNK_MULTIPLE = 64  # chunks are rounded down to whole multiples of this many tokens


def tiles_chunk_size(vocab_size: int, memory_budget: int | None) -> int:
    """Tokens per chunk of the tiles backend: its two float32 tiles (G is written over the student's)
    within `memory_budget` bytes (default `TILES_MEMORY_BUDGET`), a multiple of TILES_CHUNK_MULTIPLE
    when it is at least that."""
    budget = TILES_MEMORY_BUDGET if memory_budget is None else memory_budget
    chunk = budget // max(1, vocab_size * TILES_BYTES_PER_ENTRY)
    multiple = TILES_CHUNK_MULTIPLE
    return int(chunk // multiple * multiple if chunk >= multiple else max(1, chunk))


def resolve_backend(
    backend: str,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    *,
    has_triton: bool = True,
    has_tiles: bool = False,
    tiles_fit: bool = True,
) -> str:
    """The backend `backend` names for tensors of `dtype` on `device`: "torch", "tiles" or "triton"
    (raises if the request cannot run).

    The rule of "auto": on CUDA with Triton and a float32 / bfloat16 / float16 dtype, the tiles backend
    (`has_tiles`: the fused linear loss) when its tiles fit the memory budget (`tiles_fit`), else the
    fused Triton kernels (O(N) memory); everywhere else the PyTorch backend. float64 stays on torch."""
    check_backend(backend, has_triton=has_triton)
    if backend == "tiles" and not has_tiles:
        raise ValueError(
            "backend='tiles' is fused_linear_kd_loss's (it projects the heads into logit tiles); this loss "
            "takes 'auto', 'torch' or 'triton'"
        )
    if backend == "torch" or not has_triton:
        return "torch"
    from fusedkd import kernels  # imports Triton: only when it may run

    reason = kernels.unavailable_reason(device)
    if backend in ("triton", "tiles"):
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot run here: {reason}")
        return backend
    if device.type != "cuda" or reason is not None or dtype == torch.float64:
        return "torch"
    return "tiles" if has_tiles and tiles_fit else "triton"


def backend_for(
    options: KDOptions, device: torch.device, dtype: torch.dtype, *, has_tiles: bool = False
) -> str:
    """`resolve_backend` for a loss call's `options` (its vocabulary resolved); `chunk_size` is the torch
    and tiles backends' only."""
    fits = tiles_chunk_size(options.vocab_size or 1, options.memory_budget) >= MIN_TILES_CHUNK
    chosen = resolve_backend(
        options.backend, device, dtype, has_triton=options.HAS_TRITON, has_tiles=has_tiles, tiles_fit=fits
    )
    if options.chunk_size is not None and chosen == "triton":
        raise ValueError(
            "chunk_size applies to backends 'torch' and 'tiles'; the Triton kernels tile themselves"
        )
    return chosen


def shaped_outputs(
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], options: KDOptions, leading_shape: torch.Size
):
    """The loss, or (loss, distill, ce), per-token values (reduction "none") in the leading shape."""
    if options.reduction == "none":
        outputs = tuple(x.reshape(leading_shape) for x in outputs)
    return outputs if options.return_components else outputs[0]
