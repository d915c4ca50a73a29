"""Launch configurations of the fused linear KD kernels: a fixed default per dtype, opt-in autotuning.

The defaults are chosen for Hopper (H100/H200) and serve every GPU; under Triton's interpreter small
tiles keep the CPU tests fast. `FUSEDKD_AUTOTUNE=1` (GPU only, never under the interpreter, where
Triton's autotuner cannot run, DESIGN.md §7) times a few candidate configurations on the first call
for each problem shape and keeps the fastest. It tunes whole `KernelConfig`s, the statistics and the
gradient tiles together, because the gradient pass must recompute the logits exactly as the
statistics pass computed them and its scratch is sized by its tile.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fusedkd.kernels import INTERPRETER

AUTOTUNE_ENV = "FUSEDKD_AUTOTUNE"


@dataclass(frozen=True)
class TileConfig:
    """One kernel's tile (tokens x vocabulary x hidden chunk) and launch parameters."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class KernelConfig:
    """Tiles of the statistics (and JSD) pass and of the gradient pass."""

    statistics: TileConfig
    gradient: TileConfig
    # Gradient pass: programs in one group walk the token blocks in step (L2 reuse of the hidden
    # states); different groups start at different token blocks (fewer colliding atomic adds).
    token_groups: int = 8


# Under the interpreter every tile is a numpy operation: small, odd-shape-friendly tiles.
INTERPRETER_CONFIG = KernelConfig(
    statistics=TileConfig(32, 128, 32, num_warps=4, num_stages=1),
    gradient=TileConfig(32, 128, 32, num_warps=4, num_stages=1),
    token_groups=2,
)

# The GPU tiles below were sized by compiling every kernel for sm_90 with Triton 3.9 (no GPU needed)
# and reading the register and stack use of the cubins: the largest tiles that do not spill. Two fp32
# accumulators (student and teacher logits) live in registers at once, plus the elementwise softmax
# work, so the tiles are smaller than a plain GEMM's.
#
# bf16 / fp16: tensor-core (wgmma) dots; statistics 64 x 128 tiles, gradient 64 x 64 (it also holds
# the G tile and the two gradient products).
HALF_CONFIG = KernelConfig(
    statistics=TileConfig(64, 128, 32, num_warps=8, num_stages=3),
    gradient=TileConfig(64, 64, 32, num_warps=8, num_stages=2),
)

# fp32 ("highest" matmul precision: IEEE fp32 on the CUDA cores, which needs more registers per tile).
FLOAT32_CONFIG = KernelConfig(
    statistics=TileConfig(64, 64, 16, num_warps=8, num_stages=2),
    gradient=TileConfig(32, 64, 16, num_warps=8, num_stages=2),
)

# Candidates timed by FUSEDKD_AUTOTUNE=1 (the default first); within one, both passes share BLOCK_H.
HALF_CANDIDATES = (
    HALF_CONFIG,
    KernelConfig(TileConfig(64, 128, 32, 8, 4), TileConfig(64, 64, 32, 8, 3)),
    KernelConfig(TileConfig(64, 64, 64, 8, 3), TileConfig(64, 64, 64, 8, 2)),
    KernelConfig(TileConfig(64, 128, 64, 8, 3), TileConfig(64, 64, 64, 8, 1), token_groups=4),
    KernelConfig(TileConfig(128, 64, 32, 8, 3), TileConfig(128, 64, 32, 8, 2), token_groups=16),
)
FLOAT32_CANDIDATES = (
    FLOAT32_CONFIG,
    KernelConfig(TileConfig(32, 128, 16, 8, 2), TileConfig(32, 32, 16, 4, 2)),
    KernelConfig(TileConfig(64, 64, 32, 8, 3), TileConfig(64, 64, 32, 8, 2)),
)


def gpu_config(dtype: torch.dtype) -> KernelConfig:
    """The fixed GPU configuration for inputs of `dtype` (the student's), interpreter or not."""
    return FLOAT32_CONFIG if dtype == torch.float32 else HALF_CONFIG


def default_config(dtype: torch.dtype) -> KernelConfig:
    """The configuration the kernels launch with for inputs of `dtype`: small tiles under the
    interpreter, `gpu_config(dtype)` on a GPU."""
    if INTERPRETER:
        return INTERPRETER_CONFIG
    return gpu_config(dtype)


def dot_precision() -> str:
    """tl.dot input precision of float32 tiles, following torch.get_float32_matmul_precision().

    bf16 and fp16 tiles ignore it (they always run on the tensor cores with float32 accumulation).
    """
    return {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}[torch.get_float32_matmul_precision()]


def autotune_enabled(device: torch.device) -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0") == "1" and device.type == "cuda" and not INTERPRETER


_TUNED: dict[tuple, KernelConfig] = {}


def select_config(
    key: tuple, dtype: torch.dtype, device: torch.device, run: Callable[[KernelConfig], object]
) -> KernelConfig:
    """The default for `dtype`, or with FUSEDKD_AUTOTUNE=1 on a GPU the fastest candidate for `key`.

    `run(config)` must execute the passes under `config` on representative inputs without side
    effects; it is timed once per candidate per key (the first call of a shape pays for it).
    """
    if not autotune_enabled(device):
        return default_config(dtype)
    if key not in _TUNED:
        from triton.runtime.errors import OutOfResources
        from triton.testing import do_bench

        candidates = FLOAT32_CANDIDATES if dtype == torch.float32 else HALF_CANDIDATES
        timings = {}
        for candidate in candidates:
            try:
                timings[candidate] = do_bench(lambda c=candidate: run(c), warmup=5, rep=20)
            except OutOfResources:  # too much shared memory or registers for this GPU
                continue
        _TUNED[key] = min(timings, key=timings.get) if timings else default_config(dtype)
    return _TUNED[key]
