"""Which backend computes a loss: one rule for every public loss (docs/design.md §8).

``backend="auto"`` runs, on CUDA tensors where Triton can run, a loss's tile path (logit tiles on the
GEMM, one Triton pass over them) when its tiles fit the memory budget, else its fused Triton kernels;
elsewhere (and for a loss that has neither) the token-chunked PyTorch backend. ``"torch"``,
``"triton"`` and ``"tiles"`` ask for one by name. Each public loss then
calls the chosen backend's entry point itself, a plain call a reader can follow, with `torch.autocast`
off (`fusedkd._autograd.autocast_off`: the inputs were cast first, `fusedkd._inputs.autocast_cast`).
"""

from __future__ import annotations

import torch

from fusedkd._options import KDOptions, check_backend

# The tiles backend's working set per (token, vocabulary entry) of a chunk: the student's and the
# teacher's float32 logit tiles; G is written over the student's (16-bit heads) or a tile (float32).
# The top-k loss has the student's tile alone.
TILES_BYTES_PER_ENTRY = 8
TOPK_TILES_BYTES_PER_ENTRY = 4
# Its default budget for those tiles, and the smallest chunk worth running it with (below that the
# weight-gradient GEMM, which reads and writes all of dW once per chunk, is bound by memory traffic).
TILES_MEMORY_BUDGET = 1200 * 2**20  # 1,024-token chunks at V = 151,936 (1,187 MiB of tiles)
MIN_TILES_CHUNK = 256
TILES_CHUNK_MULTIPLE = 64  # chunks are rounded down to whole multiples of this many tokens


def tiles_chunk_size(
    vocab_size: int, memory_budget: int | None, bytes_per_entry: int = TILES_BYTES_PER_ENTRY
) -> int:
    """Tokens per chunk of the tiles backend: its float32 tiles (`bytes_per_entry` per token and
    vocabulary entry; G is written over the student's) within `memory_budget` bytes (default
    `TILES_MEMORY_BUDGET`), a multiple of TILES_CHUNK_MULTIPLE when it is at least that."""
    budget = TILES_MEMORY_BUDGET if memory_budget is None else memory_budget
    chunk = budget // max(1, vocab_size * bytes_per_entry)
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
    (`has_tiles`: the fused linear losses) when its tiles fit the memory budget (`tiles_fit`), else the
    fused Triton kernels (`has_triton`; O(N) memory) or, for a loss without them, the PyTorch backend;
    everywhere else the PyTorch backend. float64 stays on torch."""
    check_backend(backend, has_triton=has_triton, has_tiles=has_tiles)
    if backend == "tiles" and dtype == torch.float64:
        raise TypeError(
            "backend='tiles' takes float32, bfloat16 or float16 inputs (its logit tiles are float32); the "
            "inputs are torch.float64: use backend='torch' for float64"
        )
    if backend == "torch" or (backend == "auto" and not (has_triton or has_tiles)):
        return "torch"
    from fusedkd import kernels  # imports Triton: only when it may run

    reason = kernels.unavailable_reason(device)
    if backend in ("triton", "tiles"):
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot run here: {reason}")
        return backend
    if device.type != "cuda" or reason is not None or dtype == torch.float64:
        return "torch"
    if has_tiles and tiles_fit:
        return "tiles"
    return "triton" if has_triton else "torch"


def backend_for(
    options: KDOptions,
    device: torch.device,
    dtype: torch.dtype,
    *,
    tile_bytes_per_entry: int = TILES_BYTES_PER_ENTRY,
    allow_tiles: bool = True,
) -> str:
    """`resolve_backend` for a loss call's `options` (its vocabulary resolved): the backends its options
    class offers (`HAS_TRITON`, `HAS_TILES`; the tile path unless not `allow_tiles`), its tiles of
    `tile_bytes_per_entry` bytes per entry against its `memory_budget`; `chunk_size` is the torch and
    tiles backends' only."""
    has_tiles = options.HAS_TILES and allow_tiles
    chunk = tiles_chunk_size(options.vocab_size or 1, options.memory_budget, tile_bytes_per_entry)
    chosen = resolve_backend(
        options.backend,
        device,
        dtype,
        has_triton=options.HAS_TRITON,
        has_tiles=has_tiles,
        tiles_fit=chunk >= MIN_TILES_CHUNK,
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
