"""Launch configurations of the fused linear KD kernels: a fixed default per dtype, opt-in autotuning.

The defaults are chosen for Hopper (H100/H200) and serve every GPU; under Triton's interpreter small
tiles keep the CPU tests fast. `FUSEDKD_AUTOTUNE=1` (GPU only, never under the interpreter, where
Triton's autotuner cannot run, docs/design.md §7) times a few candidate configurations on the first call
for each problem shape and keeps the fastest. It tunes whole `KernelConfig`s, the statistics and the
gradient tiles together, because the gradient pass must recompute the logits exactly as the
statistics pass computed them and its scratch is sized by its tile. The persistent grids are sized
here too, from a configuration and the device's multiprocessors (`statistics_grid`,
`statistics_programs`, `gradient_programs`); the launchers beside the kernels use them, and so does
benchmarks/gpu_model.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fusedkd.kernels import INTERPRETER

if TYPE_CHECKING:
    from fusedkd.kernels.fused_linear_kd import _Problem

AUTOTUNE_ENV = "FUSEDKD_AUTOTUNE"


@dataclass(frozen=True)
class TileConfig:
    """One kernel's tile (tokens x vocabulary x hidden chunk) and launch parameters."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int
    # Columns of the slices the elementwise work of a parked tile is done in (tl_utils.park_tile): the
    # dots run on [block_n, block_v] tiles, the softmax work on [block_n, fold_block_v] slices.
    fold_block_v: int | None = None

    @property
    def fold_v(self) -> int:
        return self.block_v if self.fold_block_v is None else self.fold_block_v


@dataclass(frozen=True)
class KernelConfig:
    """Tiles of the statistics (and JSD) pass and of the gradient pass."""

    statistics: TileConfig
    gradient: TileConfig
    # Gradient pass: programs in one group walk the token blocks in step (L2 reuse of the hidden
    # states); different groups start at different token blocks (fewer colliding atomic adds).
    token_groups: int = 8
    # Statistics pass: vocabulary splits per token block (the grouped raster's group width).
    vocab_splits: int = 16
    # Gradient pass: token blocks whose G tiles are staged before one update of the float32 weight-
    # gradient rows (K = gradient_sub_blocks * BLOCK_N tokens per read-modify-write; gradient.py).
    gradient_sub_blocks: int = 4
    # Gradient pass: vocabulary blocks per program group: the gradient products (G W_s, one float32
    # atomic add per token and hidden unit; G^T h_s) run over gradient_vocab_sub_blocks * BLOCK_V
    # columns at once, while the logits are formed BLOCK_V columns at a time (register budget).
    gradient_vocab_sub_blocks: int = 2
    # Gradient pass: the two gradient products (G^T h_s and G W_s) run as GEMMs on the staged G with
    # [gradient_product_m, gradient_product_h] (weight rows x hidden units) and [BLOCK_N,
    # gradient_product_h] float32 accumulators, K steps of gradient_product_k, pipelined over
    # gradient_product_stages stages (gradient.py).
    gradient_product_m: int = 128
    gradient_product_h: int = 128
    gradient_product_k: int = 64
    gradient_product_stages: int = 2


# Under the interpreter every tile is a numpy operation: small, odd-shape-friendly tiles (two token
# blocks and two vocabulary blocks per weight-gradient update, so small tests exercise the staging).
INTERPRETER_CONFIG = KernelConfig(
    statistics=TileConfig(32, 128, 32, num_warps=4, num_stages=1, fold_block_v=64),
    gradient=TileConfig(32, 64, 32, num_warps=4, num_stages=1),
    token_groups=2,
    vocab_splits=2,
    gradient_sub_blocks=2,
    gradient_vocab_sub_blocks=2,
    gradient_product_h=32,
    gradient_product_k=32,
)

# The GPU tiles below were sized by `python -m fusedkd.kernels.compile_check` (Triton 3.9, sm_90, Qwen3
# shapes, no GPU needed): the largest tiles whose dots stay on the tensor cores with no spill inside
# their K-loops and no serialized warp-group MMA (benchmarks/gpu_model.py models their traffic).
# Each pass parks the teacher's logit tile (tl_utils.park_tile) while the student's is computed, so
# only one float32 accumulator is in registers during a dot; the softmax work then runs on column
# slices (the statistics pass parks the student's tile too and folds 32-column slices; the gradient
# pass splits the student's tile into halves in registers), which keeps the elementwise phase's
# registers at the level of a small tile.
#
# bf16 / fp16: wgmma dots (m64n128k16 per warp group).
# * Statistics (and JSD): 256 x 128 tiles over 16 warps (85 FLOP per byte loaded through the L2,
#   against 43 for the 64 x 128 tiles two accumulators in registers allowed), persistent programs
#   walking 16 vocabulary splits per token block (grouped raster).
# * Gradient: 128 x 128 logit tiles over 8 warps (the kernel's other state does not fit 16 warps'
#   128 registers per thread: ptxas serializes the MMAs), G staged for 8 token blocks (1,024 tokens)
#   x 2 vocabulary blocks (256 columns) per update: the float32 weight-gradient rows are read and
#   written once per 1,024 tokens, and each dh atomic add carries a sum over 256 columns. The two
#   products run as GEMMs with 128 x 128 float32 accumulators. One token group: all programs walk
#   the updates in step, so an update's hidden states come from HBM once (benchmarks/gpu_model.py).
# Both passes use BLOCK_H = 32: the gradient pass recomputes the logits with the statistics pass's
# K-order (the same sequence of k16 MMAs per logit).
HALF_CONFIG = KernelConfig(
    statistics=TileConfig(256, 128, 32, num_warps=16, num_stages=4, fold_block_v=32),
    gradient=TileConfig(128, 128, 32, num_warps=8, num_stages=3),
    token_groups=1,
    vocab_splits=16,
    gradient_sub_blocks=8,
    gradient_vocab_sub_blocks=2,
    gradient_product_m=128,
    gradient_product_h=128,
    gradient_product_k=64,
    gradient_product_stages=2,
)

# fp32 ("highest" matmul precision: IEEE fp32 on the CUDA cores, whose dot operands live in registers).
FLOAT32_CONFIG = KernelConfig(
    statistics=TileConfig(64, 64, 16, num_warps=8, num_stages=2),
    gradient=TileConfig(32, 64, 16, num_warps=8, num_stages=2),
    gradient_sub_blocks=4,
    gradient_product_m=64,
    gradient_product_h=32,
    gradient_product_k=16,
)

# Candidates timed by FUSEDKD_AUTOTUNE=1 (the default first); within one, both passes share BLOCK_H.
HALF_CANDIDATES = (
    HALF_CONFIG,
    KernelConfig(
        TileConfig(128, 128, 64, 8, 3, fold_block_v=64),
        TileConfig(128, 128, 64, 8, 2),
        gradient_vocab_sub_blocks=2,
        gradient_product_k=64,
    ),
    KernelConfig(
        TileConfig(256, 128, 32, 16, 4, fold_block_v=32),
        TileConfig(128, 128, 32, 8, 3),
        gradient_sub_blocks=8,
        gradient_vocab_sub_blocks=1,
    ),
    KernelConfig(
        TileConfig(128, 128, 32, 8, 4, fold_block_v=64),
        TileConfig(128, 128, 32, 8, 3),
        vocab_splits=8,
        gradient_vocab_sub_blocks=2,
    ),
)
FLOAT32_CANDIDATES = (
    FLOAT32_CONFIG,
    KernelConfig(
        TileConfig(32, 128, 16, 8, 2),
        TileConfig(32, 32, 16, 4, 2),
        gradient_product_m=64,
        gradient_product_h=32,
        gradient_product_k=16,
    ),
    KernelConfig(
        TileConfig(64, 64, 32, 8, 3),
        TileConfig(64, 64, 32, 8, 2),
        gradient_product_m=64,
        gradient_product_h=32,
        gradient_product_k=32,
    ),
)


def config_dtype(student_dtype: torch.dtype, teacher_dtype: torch.dtype) -> torch.dtype:
    """The dtype a configuration is chosen for, from both models' dtypes (one kernel computes both
    models' tiles, so one tile shape must suit both): float32 when either model is float32 (its dots
    run at float32 precision and need the float32 tiles), else the student's 16-bit dtype."""
    if torch.float32 in (student_dtype, teacher_dtype):
        return torch.float32
    return student_dtype


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


def staging_dtype(hidden_dtype: torch.dtype, interpreter: bool = False) -> torch.dtype:
    """The dtype G is staged in and the gradient products run in: the student's, except bf16 under the
    interpreter (float32: its bf16 dot is wrong, docs/design.md §7)."""
    if interpreter and hidden_dtype == torch.bfloat16:
        return torch.float32
    return hidden_dtype


def multiprocessor_count(device: torch.device) -> int:
    """The device's multiprocessors, which the persistent grids are sized for (1 off CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def statistics_grid(
    num_tokens: int, vocab_size: int, config: KernelConfig, multiprocessors: int, interpreter: bool = False
) -> tuple[int, int]:
    """(splits, vocabulary blocks per split) of the statistics grid.

    `config.vocab_splits` splits (more when there are too few token blocks to fill the GPU twice):
    with the grouped raster, a wave of `multiprocessors` programs covers about
    multiprocessors / splits token blocks, whose hidden states stay in L2 while the wave walks the
    vocabulary, and reads each weight tile from HBM once.
    """
    tile = config.statistics
    num_vocab_blocks = math.ceil(vocab_size / tile.block_v)
    num_token_blocks = math.ceil(num_tokens / tile.block_n)
    fill = math.ceil(2 * multiprocessors / max(1, num_token_blocks))
    wanted = 2 if interpreter else max(config.vocab_splits, fill)
    blocks_per_split = math.ceil(num_vocab_blocks / max(1, min(wanted, num_vocab_blocks)))
    return math.ceil(num_vocab_blocks / blocks_per_split), blocks_per_split


def statistics_task(task: int, splits: int) -> tuple[int, int]:
    """(token block, split) of statistics task `task`: what the kernels compute from it (program `pid`
    takes tasks pid, pid + P, ...)."""
    return task // splits, task % splits


def statistics_programs(num_tokens: int, splits: int, tile: TileConfig, multiprocessors: int) -> int:
    """Programs of the persistent statistics (and JSD) grid: one per multiprocessor, at most one per task."""
    return max(1, min(multiprocessors, math.ceil(num_tokens / tile.block_n) * splits))


def statistics_layout(
    num_tokens: int, vocab_size: int, config: KernelConfig, multiprocessors: int
) -> tuple[int, int, int]:
    """(splits, vocabulary blocks per split, programs) of the statistics and JSD grids as launched."""
    splits, blocks_per_split = statistics_grid(num_tokens, vocab_size, config, multiprocessors, INTERPRETER)
    programs = statistics_programs(num_tokens, splits, config.statistics, multiprocessors)
    return splits, blocks_per_split, programs


def gradient_group_width(config: KernelConfig, tile: TileConfig) -> int:
    """Vocabulary columns a gradient program owns at a time (the width of its gradient products)."""
    return tile.block_v * config.gradient_vocab_sub_blocks


def gradient_programs(
    vocab_size: int, group_width: int, multiprocessors: int, interpreter: bool = False
) -> int:
    """Programs of the (persistent) gradient grid: one per multiprocessor, at most one per vocab group."""
    num_vocab_groups = math.ceil(vocab_size / group_width)
    return min(num_vocab_groups, 3 if interpreter else multiprocessors)


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


def combine_partials(problem: _Problem, config: KernelConfig, partial: torch.Tensor, empty) -> torch.Tensor:
    """A pass's per-split states [splits, fields, N] of this rank, and every other rank's after them in
    vocabulary order: [all splits, fields, N], which the merge kernels combine exactly as they combine one
    rank's splits (docs/design.md §10). Each rank's splits are padded to the most any rank has with the
    states of no vocabulary entry (`empty`, one value per field), which merging leaves unchanged."""
    shard = problem.shard
    n = problem.num_tokens
    most = max(
        statistics_layout(n, shard.rows_of(rank), config, problem.multiprocessors)[0]
        if shard.rows_of(rank)
        else 0
        for rank in range(shard.world)
    )
    padded = partial.new_empty((most, partial.shape[1], n))
    padded[: partial.shape[0]] = partial
    padded[partial.shape[0] :] = torch.tensor(empty, dtype=partial.dtype, device=partial.device)[:, None]
    return shard.gather(padded).flatten(0, 1)
