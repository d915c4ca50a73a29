"""A roofline model of fusedkd's GPU paths and its peers (H100, H200): PREDICTIONS, not measurements.

    python benchmarks/gpu_model.py                 # Qwen3-4B -> 0.6B, N = 4k/16k/32k, bf16, H100 and H200
    python benchmarks/gpu_model.py --json          # one JSON object per (gpu, n, divergence, method)
    python benchmarks/gpu_model.py --detail        # every kernel: FLOPs, bytes, bound, quantization, fills
    python benchmarks/gpu_model.py --tile-budget-mib 1113 --l2-tbps 7   # other assumptions

Methods: `fusedkd` is what backend="auto" runs on CUDA at that N: the tile path (`fusedkd_tile`,
cuBLAS projections into float32 [c, V] tiles, one Triton element-wise kernel, cuBLAS gradient
products; chunks of c tokens from a memory budget) when the budget allows a chunk, else the fused
Triton kernels (`fusedkd_fused`: logits recomputed in the backward, O(N) memory). `liger` and `trl`
are the peers. Each row gives the predicted forward + backward time, the useful rate (the unavoidable
2 N V (H_t + 3 H_s) FLOPs over that time) and the extra memory, and the plain run evaluates the
issue's targets on them (PASS / FAIL per row, computed, never written in).

Nothing here ran on a GPU. For each kernel of fusedkd's two CUDA paths (with the launch configurations
the code actually uses: imported from `fusedkd.kernels.config` and `fusedkd.kernels.statistics`,
never copied) and for the two chunked peers (Liger-Kernel's fused linear JSD, TRL 1.16's
`trl.kernels.chunked_divergence.ChunkedDivergenceFunction`), it counts

    FLOPs      tensor-core FLOPs of the dots / GEMMs (2 per multiply-add, padded tiles included)
    HBM bytes  bytes that miss the L2 and go to HBM (reads + writes)
    L2 bytes   bytes moved between the SMs and the L2 (every global load/store and atomic)
    atomics    float32 atomic adds (red.global.add.f32)
    MUFU, ALU  exp/log (special-function unit) and other float32 operations of the softmax work

and predicts each kernel's time as

    (max(FLOPs / (peak * efficiency), HBM / HBM_BW, L2 / L2_BW, atomics / ATOMIC_RATE) + elementwise)
        * quantization + fills * DOT_FILL + launches * LAUNCH_GAP

and a method's time as the sum of its kernels' (kernels of one stream run one after another):

  * `elementwise = MUFU / MUFU_RATE + ALU / ALU_RATE` is *added* in fusedkd's Triton kernels (no warp
    specialization: the softmax work of a tile runs in the same warps as its dots) and overlapped
    (max) in memory-bound element-wise kernels (the peers' loss passes, the tile path's kernel).
  * The fused gradient kernel's two phases, (a) recompute the logits and form G, (b) the two gradient
    products over the staged G, run in lock step (a CTA barrier between them): two rooflines, added.
  * `quantization`: the busiest program's work over the mean (persistent grids: 594 vocabulary groups
    over 132 gradient programs is 5 groups for the busiest, 4.5 on average: x1.11); computed from the
    grid functions the code launches with. cuBLAS's own quantization is in its efficiency.
  * `fills`: the dot K-loops in series in the busiest program; each exposes DOT_FILL (the pipeline's
    prologue before the first MMA and the accumulator's drain after the last, nothing else in flight).
  * Every cuBLAS GEMM and every element-wise pass of the peers is its own kernel: they add.

Whether a re-read stream hits the L2 is decided from its working set: the bytes that the programs
running at the same time (one per SM) keep re-reading. Streams are placed in the L2 smallest first
until L2_USABLE of its capacity is used; the rest go to HBM. Streams the kernels load with the L2
hint evict_first (data read once per L2 lifetime: the gradient pass's own weight rows and float32
weight-gradient rows) always go to HBM and take no room. That is a coarse stand-in for LRU: the
prediction moves in steps when a stream's working set crosses the budget.

Hardware figures (GH100, 132 SMs on both SXM parts; each named with its source or "assumption"):
  * 989 TFLOP/s dense bf16 on both: NVIDIA H100 and H200 datasheets (1,979 with sparsity).
  * HBM 3.35 TB/s (H100 SXM5, HBM3) and 4.8 TB/s (H200 SXM, HBM3e): the datasheets.
  * 50 MB L2 on both: NVIDIA Hopper architecture whitepaper (H100 SXM5); H200 is the same die.
  * cuBLAS MMA efficiency 0.75: assumption (a large bf16 cuBLAS GEMM on an H100 SXM sustains
    ~700-750 TFLOP/s of 989 in public benchmarks), applied to every cuBLAS GEMM (its split-K / wave
    quantization included).
  * Triton MMA efficiency 0.60: assumption, from an independent expert reading of fusedkd's kernels:
    pointer-based cp.async loads (no TMA), 32-wide K steps (two k16 wgmmas per load), no warp
    specialization put Triton's Hopper dots at 0.55-0.65 of the peak; `--triton-efficiency` varies it.
  * DOT_FILL 0.5 us per K-loop: assumption (the order of one global-memory load latency on Hopper,
    ~0.5-0.7 us for a miss, plus the drain of the wgmma accumulator; not measured here).
  * LAUNCH_GAP 2 us between two kernels of a stream: assumption (typical back-to-back launch gap
    without CUDA graphs).
  * L2_BW 10 TB/s on both: assumption. Chips and Cheese measured ~5.5-7 TB/s on an H100 *PCIe* (114
    SMs, clocks down to 1.4 GHz under load: "Nvidia's H100: Funny L2, and Tons of Bandwidth", 2023);
    scaled to 132 SMs at ~1.8 GHz that is ~8-11 TB/s; third-party SXM figures quote ~12 TB/s.
    `--l2-tbps` varies it, and the plain run prints the sensitivity.
  * ATOMIC_RATE 1.25e12 float32 adds/s: assumption (half the L2's 32-byte sector rate at L2_BW,
    8 floats per sector, for coalesced warp-wide reductions). No public H100 figure was found.
  * MUFU 16 and ALU 128 float32 operations per clock per SM at 1.83 GHz: Hopper SM (4 partitions x
    4 SFUs / 32 FP32 lanes; the whitepaper); the 1.83 GHz sustained clock is an assumption.

The unavoidable GEMM FLOPs of any exact KD loss with the student's gradients, when the logits are
kept (one projection per model, two gradient products): 2 N V (H_t + 3 H_s). A fully fused loss that
never stores the logits recomputes both projections in the backward: 2 N V (2 H_t + 4 H_s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fusedkd import _dispatch  # noqa: E402
from fusedkd.kernels import config as kernel_config  # noqa: E402
from fusedkd.kernels import statistics as kernel_statistics  # noqa: E402

MB = 1e6
GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """One GPU's figures (defaults: H200 SXM). Every figure is named with its source in the module's
    docstring; the ones marked "assumption" there are not from a datasheet."""

    name: str = "H200"
    label: str = "H200 SXM (132 SMs)"
    bf16_flops: float = 989e12
    hbm_bytes_per_s: float = 4.8e12
    l2_bytes_per_s: float = 10e12
    l2_capacity: float = 50 * MB
    l2_usable: float = 0.7  # the fraction of the L2 that re-read streams may count on
    sms: int = 132
    clock_hz: float = 1.83e9
    # Fraction of the dense peak a kernel's MMAs sustain: cuBLAS (TMA, warp-specialized, 64-wide K
    # steps) and fusedkd's Triton kernels (pointer-based cp.async loads, 32-wide K steps, no warp
    # specialization).
    cublas_mma_efficiency: float = 0.75
    triton_mma_efficiency: float = 0.60
    # Exposed per K-loop of a Triton dot (pipeline fill before the first MMA, drain of the accumulator
    # after the last): the loads of the next tile are not in flight while a program does anything else.
    dot_fill_s: float = 0.5e-6
    launch_gap_s: float = 2e-6  # idle time between two kernels of a stream
    atomics_per_s: float = 1.25e12
    mufu_per_clock_per_sm: int = 16
    alu_per_clock_per_sm: int = 128

    @property
    def mufu_per_s(self) -> float:
        return self.mufu_per_clock_per_sm * self.sms * self.clock_hz

    @property
    def alu_per_s(self) -> float:
        return self.alu_per_clock_per_sm * self.sms * self.clock_hz

    def mma_efficiency(self, engine: str) -> float:
        return self.triton_mma_efficiency if engine == "triton" else self.cublas_mma_efficiency


H200 = Hardware()
# Same GH100 die (132 SMs, 50 MB L2, the same tensor-core peak); HBM3 at 3.35 TB/s instead of HBM3e.
H100 = replace(H200, name="H100", label="H100 SXM5 (132 SMs)", hbm_bytes_per_s=3.35e12)
GPUS = {"H100": H100, "H200": H200}


@dataclass(frozen=True)
class Shapes:
    tokens: int
    vocab: int = 151_936
    student_dim: int = 1024
    teacher_dim: int = 2560
    element_bytes: int = 2  # bf16
    divergence: str = "forward_kl"  # "forward_kl" (+ CE) or "jsd" (+ CE)

    @property
    def unavoidable_flops(self) -> float:
        """2 N V (H_t + 3 H_s): one projection per model and the two gradient products."""
        return 2 * self.tokens * self.vocab * (self.teacher_dim + 3 * self.student_dim)

    @property
    def fused_flops(self) -> float:
        """2 N V (2 H_t + 4 H_s): both projections again in the backward (docs/design.md §5)."""
        return 2 * self.tokens * self.vocab * (2 * self.teacher_dim + 4 * self.student_dim)


@dataclass
class Stream:
    """A stream of bytes through the L2: `total` bytes moved, re-reading a working set of `working_set`
    bytes (0: streamed once, never re-read: always HBM; None: always L2, e.g. a program's own scratch
    written and read back at once)."""

    name: str
    total: float
    working_set: float | None
    from_hbm_once: float = 0.0  # HBM bytes even when the stream hits the L2 (the first touch)
    hbm_when_missing: float | None = None  # HBM bytes when it misses (default: all of `total`)
    # Loaded with the L2 hint evict_first (streamed data never re-read while in the L2): it misses and
    # takes no L2 capacity from the other streams.
    evict_first: bool = False


@dataclass
class Prediction:
    kernel: str
    flops: float = 0.0
    streams: list[Stream] = field(default_factory=list)
    atomics: float = 0.0
    mufu: float = 0.0
    alu: float = 0.0
    elementwise_overlapped: bool = False  # memory-bound kernels: their ALU work hides under memory
    engine: str = "cublas"  # "triton": fusedkd's own kernels (Hardware.triton_mma_efficiency)
    # The busiest program's share of the work over the mean share (wave quantization: it sets the time).
    quantization: float = 1.0
    fills: float = 0.0  # pipeline fills (dot K-loops) in series in the busiest program
    launches: int = 1  # kernel launches (all chunks together)
    note: str = ""
    hbm: float = 0.0
    l2: float = 0.0
    l2_resident: list[str] = field(default_factory=list)

    def place(self, hw: Hardware) -> None:
        """Decide which streams hit the L2 (smallest working set first) and total the bytes."""
        budget = hw.l2_capacity * hw.l2_usable
        self.hbm, self.l2, self.l2_resident = 0.0, 0.0, []
        for stream in sorted(self.streams, key=lambda s: -1 if s.working_set is None else s.working_set):
            self.l2 += stream.total
            if stream.evict_first:
                self.hbm += stream.total if stream.hbm_when_missing is None else stream.hbm_when_missing
            elif stream.working_set is None or (0 < stream.working_set <= budget):
                if stream.working_set is not None:
                    budget -= stream.working_set
                self.l2_resident.append(stream.name)
                self.hbm += stream.from_hbm_once
            else:
                self.hbm += stream.total if stream.hbm_when_missing is None else stream.hbm_when_missing

    def times(self, hw: Hardware) -> dict:
        """max(MMA, HBM, L2, atomics) (+ the element-wise work unless it hides under memory), times the
        wave quantization, plus the pipeline fills and the launch gaps."""
        self.place(hw)
        parts = {
            "mma_s": self.flops / (hw.bf16_flops * hw.mma_efficiency(self.engine)),
            "hbm_s": self.hbm / hw.hbm_bytes_per_s,
            "l2_s": self.l2 / hw.l2_bytes_per_s,
            "atomics_s": self.atomics / hw.atomics_per_s,
        }
        elementwise = self.mufu / hw.mufu_per_s + self.alu / hw.alu_per_s
        bound = max(parts, key=parts.get)
        if self.elementwise_overlapped:
            core = max(parts[bound], elementwise)
        else:
            core = parts[bound] + elementwise
        fill = self.fills * hw.dot_fill_s
        launch = self.launches * hw.launch_gap_s
        total = core * self.quantization + fill + launch
        return {
            **parts,
            "elementwise_s": elementwise,
            "quantization": self.quantization,
            "fill_s": fill,
            "launch_s": launch,
            "time_s": total,
            "bound": bound.removesuffix("_s"),
        }


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --- fusedkd ---------------------------------------------------------------------------------------


def fusedkd_statistics(shapes: Shapes, hw: Hardware, jsd_pass: bool = False) -> Prediction:
    """statistics.py (or jsd.py with `jsd_pass`): persistent programs take the tasks (token block,
    vocabulary split) in order, the splits of a token block on consecutive programs; per (token x
    vocab) tile, the teacher's logits then the student's, each parked in the program's scratch."""
    cfg = kernel_config.gpu_config(_dtype())
    tile = cfg.statistics
    n, v, hs, ht = shapes.tokens, shapes.vocab, shapes.student_dim, shapes.teacher_dim
    eb = shapes.element_bytes
    token_blocks, vocab_blocks = _cdiv(n, tile.block_n), _cdiv(v, tile.block_v)
    splits, blocks_per_split = kernel_config.statistics_grid(n, v, cfg, hw.sms)
    programs = kernel_config.statistics_programs(n, splits, tile, hw.sms)
    tasks = token_blocks * splits
    # The tasks running together (the first `programs`): the token blocks and splits they cover.
    placed = [kernel_config.statistics_task(task, splits) for task in range(min(programs, tasks))]
    wave_token_blocks = len({token_block for token_block, _ in placed})
    wave_splits = len({split for _, split in placed})
    waves = tasks / programs
    tiles = token_blocks * vocab_blocks
    row_bytes = (hs + ht) * eb  # one token's (or one vocabulary entry's) hidden + weight row, both models
    flops = 2 * tiles * tile.block_n * tile.block_v * (hs + ht)
    # Wave quantization: program `pid` takes tasks pid, pid + P, ... (statistics_task); a split covers
    # blocks_per_split vocabulary blocks, the last one fewer. The busiest program sets the time.
    split_blocks = [min(blocks_per_split, vocab_blocks - split * blocks_per_split) for split in range(splits)]
    loads = [0] * programs
    for task in range(tasks):
        loads[task % programs] += split_blocks[kernel_config.statistics_task(task, splits)[1]]
    busiest = max(loads)
    p = Prediction(
        "jsd_kernel" if jsd_pass else "statistics_kernel",
        flops=flops,
        engine="triton",
        quantization=busiest / (tiles / programs),
        fills=busiest * 2,  # two dots per tile (the teacher's, the student's), each a K-loop
        launches=2,  # the pass and its merge of the split states
    )
    # Hidden tiles: re-read at every vocabulary step by their program; shared by the programs of the
    # same token block (other splits) running at the same time.
    p.streams.append(
        Stream(
            "hidden (re-read per vocab block)",
            tiles * tile.block_n * row_bytes,
            working_set=wave_token_blocks * tile.block_n * row_bytes,
            from_hbm_once=n * row_bytes,
        )
    )
    # Weight tiles: the programs running together that share a split walk its blocks in step: each
    # block is read from HBM once per wave (the working set is the few blocks in flight per split).
    weight_total = tiles * tile.block_v * row_bytes
    p.streams.append(
        Stream(
            "weights (walked in step by a wave)",
            weight_total,
            working_set=wave_splits * 2 * tile.block_v * row_bytes,
            from_hbm_once=waves * wave_splits * blocks_per_split * tile.block_v * row_bytes,
            hbm_when_missing=weight_total,
        )
    )
    # Parking (tl_utils.park_tile): both float32 tiles written once and read once per tile.
    park_bytes = 2 * tile.block_n * tile.block_v * 4
    p.streams.append(
        Stream(
            "parked logit tiles (written, read)", tiles * park_bytes * 2, working_set=programs * park_bytes
        )
    )
    p.streams.append(
        Stream("statistics out", n * splits * 8 * 4 * (0.25 if jsd_pass else 1.0), working_set=0)
    )
    entries = n * v
    if jsd_pass:
        p.mufu, p.alu = 6 * entries, 24 * entries  # log m (2 exp + log), p, q; the KL sums
    else:
        p.mufu, p.alu = 3 * entries, 28 * entries  # e^a, e^b, e^s (CE at T != 1); maxima, sums, KL
    p.note = (
        f"tile {tile.block_n}x{tile.block_v}x{tile.block_h} ({tile.num_warps} warps), {programs} "
        f"persistent programs, {tasks} tasks, {splits} splits; busiest program {busiest} tiles"
    )
    return p


def fusedkd_gradient(shapes: Shapes, hw: Hardware) -> list[Prediction]:
    """gradient.py: persistent programs own vocabulary groups (VOCAB_SUB_BLOCKS x BLOCK_V columns) and
    walk all tokens, SUB_BLOCKS token blocks per update. (a) Per (token block, vocabulary block) tile
    both logit tiles are recomputed and parked, G is formed and staged (16-bit); (b) the two products
    run as GEMMs over the staged G: grad_W with [PRODUCT_M, PRODUCT_H] float32 accumulators and K =
    the update's tokens (one read-modify-write of the float32 rows per update), grad_h with [BLOCK_N,
    PRODUCT_H] accumulators and K = the group's columns (one float32 atomic add per token, unit and
    group).

    The two phases run in lock step in the same warps (a CTA barrier between them, no warp
    specialization): each is its own roofline and their times add. Returned as two predictions of
    the one kernel."""
    cfg = kernel_config.gpu_config(_dtype())
    tile = cfg.gradient
    n, v, hs, ht = shapes.tokens, shapes.vocab, shapes.student_dim, shapes.teacher_dim
    eb = shapes.element_bytes
    group = kernel_config.gradient_group_width(cfg, tile)
    programs = kernel_config.gradient_programs(v, group, hw.sms)
    token_blocks, groups_v = _cdiv(n, tile.block_n), _cdiv(v, group)
    tiles = token_blocks * groups_v * cfg.gradient_vocab_sub_blocks  # logits tiles, padded
    sub_blocks = cfg.gradient_sub_blocks
    tokens_per_update = tile.block_n * sub_blocks
    updates_per_group = _cdiv(token_blocks, sub_blocks)
    updates = updates_per_group * groups_v  # dW read-modify-writes of [group, H_s]
    product_m = min(cfg.gradient_product_m, group)
    product_h = cfg.gradient_product_h
    h_chunks = _cdiv(hs, product_h)
    row_bytes = (hs + ht) * eb
    padded_tokens = token_blocks * tile.block_n
    logits_flops = 2 * tiles * tile.block_n * tile.block_v * (hs + ht)
    grad_flops = 2 * 2 * padded_tokens * groups_v * group * hs
    # Wave quantization: program pid owns groups pid, pid + P, ...; every group costs a whole group's
    # work (the last one's masked columns included), so the busiest program owns ceil(groups / P).
    groups_busiest = _cdiv(groups_v, programs)
    quantization = groups_busiest / (groups_v / programs)
    token_groups = min(cfg.token_groups, programs)
    logits = Prediction(
        "gradient_kernel (a) logits + G",
        flops=logits_flops,
        engine="triton",
        quantization=quantization,
        # Two dots per tile, each a K-loop.
        fills=groups_busiest * token_blocks * cfg.gradient_vocab_sub_blocks * 2,
        launches=1,
    )
    products = Prediction(
        "gradient_kernel (b) products",
        flops=grad_flops,
        engine="triton",
        quantization=quantization,
        # Per update: (GROUP_V / PRODUCT_M) x h_chunks grad_W tiles (K = the update's tokens) and
        # SUB_BLOCKS x h_chunks grad_h tiles (K = the group's columns), each a K-loop of its own.
        fills=groups_busiest * updates_per_group * (group // product_m + sub_blocks) * h_chunks,
        launches=0,  # the same launch as (a)
    )
    # Hidden states: both models' rows for the logits of every tile (a); the student's again as the
    # grad_W product's operand, once per (update, row tile of the group) (b), read back from the L2
    # right after (a) read them. The programs of a token group walk the updates in step: an update's
    # rows come from HBM once per token group and owned group.
    logits.streams.append(
        Stream(
            "hidden (token-group lockstep)",
            tiles * tile.block_n * row_bytes,
            working_set=token_groups * tokens_per_update * row_bytes,
            from_hbm_once=token_groups * (groups_v / programs) * n * row_bytes,
        )
    )
    products.streams.append(
        Stream(
            "student hidden (grad_W operand)",
            padded_tokens * groups_v * (group // product_m) * hs * eb,
            working_set=token_groups * tokens_per_update * hs * eb,
        )
    )
    # Weight rows of the program's own group: both models' for the logits at every token block.
    logits.streams.append(
        Stream(
            "own weight rows (re-read per token block)",
            tiles * tile.block_v * row_bytes,
            working_set=programs * group * row_bytes,
            from_hbm_once=v * row_bytes,
            evict_first=True,
        )
    )
    # The student's weight rows as grad_h's operand: a [group, PRODUCT_H] chunk read by each token block
    # of the update in turn (consecutively: the chunk is re-read from the L2), from HBM once per update.
    products.streams.append(
        Stream(
            "grad_h weight operand",
            token_blocks * groups_v * group * hs * eb,
            working_set=programs * group * product_h * eb,
            from_hbm_once=updates * group * hs * eb,
        )
    )
    # Parking: the teacher's float32 logit tile written once and read once (the student's is split in
    # registers).
    park_bytes = tile.block_n * tile.block_v * 4
    logits.streams.append(
        Stream(
            "parked logit tiles (written, read)", tiles * park_bytes * 2, working_set=programs * park_bytes
        )
    )
    # G staging: written once in (a); read by grad_W once per hidden chunk, by grad_h once per hidden
    # chunk in (b).
    staged_bytes = kernel_config.staging_dtype(_dtype()).itemsize
    staged_entries = tiles * tile.block_n * tile.block_v
    staging_set = programs * tokens_per_update * group * staged_bytes
    logits.streams.append(
        Stream("G staging (written)", staged_entries * staged_bytes, working_set=staging_set)
    )
    products.streams.append(
        Stream(
            f"G staging (read 2 x {h_chunks})",
            staged_entries * staged_bytes * 2 * h_chunks,
            working_set=staging_set,
        )
    )
    # dW accumulator: one float32 [group, H_s] read-modify-write per update (per program: its own).
    products.streams.append(
        Stream(
            "dW float32 read-modify-write",
            updates * group * hs * 4 * 2,
            working_set=programs * group * hs * 4,
            from_hbm_once=v * hs * (4 + eb),
            evict_first=True,
        )
    )
    # dh: float32 atomic adds into [N, H_s], one per (token, hidden unit) per vocabulary group. The rows
    # being added to at a time are those of the token groups' current updates; each pass of the
    # programs over the tokens (one per owned vocabulary group) brings all of dh through the L2 once.
    products.atomics = padded_tokens * hs * groups_v
    products.streams.append(
        Stream(
            "dh float32 atomics",
            products.atomics * 4,
            working_set=token_groups * tokens_per_update * hs * 4,
            from_hbm_once=(groups_v / programs) * n * hs * 4 * 2,
        )
    )
    entries = n * v
    logits.mufu, logits.alu = 3 * entries, 22 * entries  # q, p, q at T = 1; G, the casts
    logits.note = (
        f"tile {tile.block_n}x{tile.block_v}x{tile.block_h} ({tile.num_warps} warps), {group} columns per "
        f"group, {programs} programs (busiest owns {groups_busiest} of {groups_v} groups)"
    )
    products.note = (
        f"{tokens_per_update} tokens per dW update, products {product_m}x{product_h} / "
        f"{tile.block_n}x{product_h}"
    )
    return [logits, products]


def fusedkd(shapes: Shapes, hw: Hardware) -> list[Prediction]:
    """The fused Triton kernels (what `backend="triton"` runs): statistics (+ JSD) and gradient."""
    kernels = [fusedkd_statistics(shapes, hw)]
    if shapes.divergence == "jsd":
        kernels.append(fusedkd_statistics(shapes, hw, jsd_pass=True))
    kernels += fusedkd_gradient(shapes, hw)
    return kernels


def fusedkd_extra_memory(shapes: Shapes) -> float:
    """Bytes the fused loss allocates besides its inputs and the gradients (forward + backward): the
    statistics and the forward's parking, then the float32 dh accumulator, the per-program dW rows, G
    staging and parking of the gradient pass (gradient.launch_gradient); the larger of the two passes."""
    cfg = kernel_config.gpu_config(_dtype())
    n, v, hs = shapes.tokens, shapes.vocab, shapes.student_dim
    splits, _ = kernel_config.statistics_grid(n, v, cfg, _SMS)
    stat_programs = kernel_config.statistics_programs(n, splits, cfg.statistics, _SMS)
    tile = cfg.gradient
    group = kernel_config.gradient_group_width(cfg, tile)
    programs = kernel_config.gradient_programs(v, group, _SMS)
    partial_fields = int(kernel_statistics.NUM_PARTIAL_FIELDS.value)
    saved = (int(kernel_statistics.NUM_STAT_FIELDS.value) + 8) * n * 4
    forward = (
        splits * partial_fields * n * 4
        + stat_programs * 2 * cfg.statistics.block_n * cfg.statistics.block_v * 4
    )
    staged_bytes = kernel_config.staging_dtype(_dtype()).itemsize
    staging = programs * cfg.gradient_sub_blocks * tile.block_n * group * staged_bytes
    park = programs * tile.block_n * tile.block_v * 4
    backward = n * hs * 4 + programs * group * hs * 4 + staging + park
    return saved + max(forward, backward)


# --- Peers: every cuBLAS GEMM and every element-wise pass is its own kernel ----------------------------
#
# A GEMM overlaps its own loads and stores with its MMAs (cuBLAS on Hopper: TMA, warp-specialized
# producers and epilogues): max(MMA, HBM). The element-wise passes of the peers are separate kernels,
# memory-bound (their ALU work hides under their memory traffic): they add to the GEMMs, never overlap.


def _gemm(name: str, flops: float, streams: list[Stream], launches: int) -> Prediction:
    return Prediction(name, flops=flops, streams=streams, engine="cublas", launches=launches)


def _elementwise(
    name: str, streams: list[Stream], launches: int, mufu: float = 0.0, alu: float = 0.0
) -> Prediction:
    return Prediction(
        name, streams=streams, mufu=mufu, alu=alu, elementwise_overlapped=True, launches=launches
    )


# --- Liger-Kernel: LigerFusedLinearJSDLoss (chunked_loss/fused_linear_distillation.py) ---------------


LIGER_CHUNK = 1024  # LigerFusedLinearDistillationBase.forward(chunk_size=1024)
# Bytes per (token, vocabulary) entry of the torch.compile'd loss + its gradient on a chunk: reads of
# both bf16 logits chunks for the log-softmaxes and the KL (assumed 3 reads each: 12 B), the CE's
# float32 log-softmax (written and read: 8 B), G written in bf16 (2 B). An assumption, not a count;
# the same for the JSD (whose mixture terms would add more: favourable to Liger).
LIGER_ELEMENTWISE_BYTES = 22
LIGER_LOSS_KERNELS = 4  # inductor kernels per chunk for the loss and its gradient (assumption)


def liger_chunks(shapes: Shapes) -> tuple[int, int]:
    """(chunks, tokens of the largest chunk): `num_chunks = max(1, N // chunk_size)` and torch.chunk."""
    chunks = max(1, shapes.tokens // LIGER_CHUNK)
    return chunks, _cdiv(shapes.tokens, chunks)


def liger(
    shapes: Shapes, hw: Hardware, elementwise_bytes: float = LIGER_ELEMENTWISE_BYTES
) -> list[Prediction]:
    """Per chunk (torch.compile'd `accumulate_chunk`): the student's and the teacher's logits (cuBLAS,
    bf16 out), the loss and its gradient (inductor kernels), torch.func's backward GEMMs G W_s and
    G^T h_s (a new bf16 [V, H_s] chunk gradient), then `grad_weight.add_(chunk_grad_weight)`."""
    n, v, hs, ht, eb = (
        shapes.tokens,
        shapes.vocab,
        shapes.student_dim,
        shapes.teacher_dim,
        shapes.element_bytes,
    )
    chunks, _ = liger_chunks(shapes)
    entries = n * v
    # Weights re-read once per chunk: 311 MB (W_s) and 778 MB (W_t) at Qwen3 shapes, far above the L2.
    student = _gemm(
        "s = h_s W_s^T (cuBLAS, bf16 out)",
        2 * entries * hs,
        [
            Stream("W_s per chunk", chunks * v * hs * eb, working_set=v * hs * eb, from_hbm_once=v * hs * eb),
            Stream("h_s", n * hs * eb, working_set=0),
            Stream("logits written", entries * eb, working_set=0),
        ],
        chunks,
    )
    teacher = _gemm(
        "t = h_t W_t^T (cuBLAS, bf16 out)",
        2 * entries * ht,
        [
            Stream("W_t per chunk", chunks * v * ht * eb, working_set=v * ht * eb, from_hbm_once=v * ht * eb),
            Stream("h_t", n * ht * eb, working_set=0),
            Stream("logits written", entries * eb, working_set=0),
        ],
        chunks,
    )
    loss = _elementwise(
        "compiled loss + grad (element-wise)",
        [Stream("logits chunk passes", entries * elementwise_bytes, working_set=0)],
        chunks * LIGER_LOSS_KERNELS,
        mufu=(8 if shapes.divergence == "jsd" else 5) * entries,
        alu=30 * entries,
    )
    grad_h = _gemm(
        "dh = G W_s (cuBLAS)",
        2 * entries * hs,
        [
            Stream("G read", entries * eb, working_set=0),
            Stream("W_s per chunk", chunks * v * hs * eb, working_set=v * hs * eb, from_hbm_once=v * hs * eb),
            Stream("dh written", n * hs * eb, working_set=0),
        ],
        chunks,
    )
    grad_w = _gemm(
        "chunk dW = G^T h_s (cuBLAS, bf16 [V, H_s] out)",
        2 * entries * hs,
        [
            Stream("G read", entries * eb, working_set=0),
            Stream("h_s", n * hs * eb, working_set=0),
            Stream("chunk dW written", chunks * v * hs * eb, working_set=0),
        ],
        chunks,
    )
    accumulate = _elementwise(
        "grad_weight.add_(chunk dW) (element-wise)",
        [Stream("read 2, write 1 [V, H_s] bf16", chunks * v * hs * eb * 3, working_set=0)],
        chunks,
    )
    return [student, teacher, loss, grad_h, grad_w, accumulate]


# Bytes per (token, vocabulary) entry of the chunk tensors live at Liger's peak. Measured on a CPU in
# float32 (benchmarks/RESULTS.md, memory_vs_topk.py, 2026-11-28): 4 chunk x V tensors beside the
# floor at every N >= 1,024. In bf16 on a GPU the logits s, t and G are bf16 (the GEMMs' outputs and
# inputs); the fourth is taken as float32 (the CE's `student_logits_chunk.float()` log-softmax, the
# tensor LIGER_ELEMENTWISE_BYTES writes and reads): 3 x 2 + 4. An estimate, not a GPU measurement:
# 8 B (all four bf16) to 16 B (all four float32); this model's earlier formula took 3 x 2 + 3 x 4 = 18.
LIGER_CHUNK_ENTRY_BYTES = 3 * 2 + 4


def liger_extra_memory(shapes: Shapes, entry_bytes: float = LIGER_CHUNK_ENTRY_BYTES) -> float:
    """The chunk tensors at Liger's peak (`entry_bytes` per chunk x V entry) and the bf16 [V, H_s]
    chunk weight gradient before it is added in (`grad_weight.add_`). Its gradient accumulators are
    the gradients themselves; the final torch.cat of the grad_input chunks (N H_s 2 bytes more) comes
    after the chunks are freed and is smaller."""
    _, chunk = liger_chunks(shapes)
    return chunk * shapes.vocab * entry_bytes + shapes.vocab * shapes.student_dim * shapes.element_bytes


# --- TRL 1.16: trl.kernels.chunked_divergence.ChunkedDivergenceFunction -----------------------------


TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768  # chunked_divergence.TOKEN_CHUNK_SIZE, VOCAB_CHUNK_SIZE


def trl(shapes: Shapes, hw: Hardware) -> list[Prediction]:
    """Forward: per (4096 tokens x 32768 vocab) tile, two cuBLAS projections into float32 buffers and a
    Triton statistics kernel reading them (the JSD repeats both: a second pass). Backward: both
    projections again, a Triton kernel writing G (float32, in place), its bf16 cast, two cuBLAS addmm
    products accumulating into float32 dh and dW (`_addmm_fp32`: beta = 1, in the GEMM). No
    cross-entropy (TRL computes the divergence only)."""
    n, v, hs, ht, eb = (
        shapes.tokens,
        shapes.vocab,
        shapes.student_dim,
        shapes.teacher_dim,
        shapes.element_bytes,
    )
    entries = n * v
    token_chunks, vocab_chunks = _cdiv(n, TRL_TOKEN_CHUNK), _cdiv(v, TRL_VOCAB_CHUNK)
    tiles = token_chunks * vocab_chunks
    passes = 2 if shapes.divergence == "jsd" else 1

    def projections(name: str, times: int) -> Prediction:
        return _gemm(
            name,
            times * 2 * entries * (hs + ht),
            [
                Stream("weights per token chunk", times * token_chunks * v * (hs + ht) * eb, working_set=0),
                Stream("hidden per vocab chunk", times * vocab_chunks * n * (hs + ht) * eb, working_set=0),
                Stream("float32 logits written", times * entries * 8, working_set=0),
            ],
            times * tiles * 2,
        )

    forward_projections = projections(f"forward: projections x{passes} (cuBLAS, float32 out)", passes)
    forward_statistics = _elementwise(
        f"forward: statistics x{passes} (Triton)",
        [Stream("float32 logits read", passes * entries * 8, working_set=0)],
        passes * tiles,
        mufu=passes * 4 * entries,
        alu=passes * 20 * entries,
    )
    backward_projections = projections("backward: projections (cuBLAS, float32 out)", 1)
    gradient = _elementwise(
        "backward: G kernel (Triton, float32 in place)",
        [Stream("s, t read, G written", entries * (8 + 4), working_set=0)],
        tiles,
        mufu=3 * entries,
        alu=16 * entries,
    )
    cast = _elementwise("backward: G to bf16", [Stream("read 4, write 2", entries * 6, working_set=0)], tiles)
    grad_h = _gemm(
        "backward: dh += G W_s (addmm, float32)",
        2 * entries * hs,
        [
            Stream("G read", entries * eb, working_set=0),
            Stream("W_s per token chunk", token_chunks * v * hs * eb, working_set=0),
            Stream("dh float32 per vocab chunk", vocab_chunks * n * hs * 4 * 2, working_set=0),
        ],
        tiles,
    )
    grad_w = _gemm(
        "backward: dW += G^T h_s (addmm, float32)",
        2 * entries * hs,
        [
            Stream("G read", entries * eb, working_set=0),
            Stream("h_s per vocab chunk", vocab_chunks * n * hs * eb, working_set=0),
            Stream("dW float32 per token chunk", token_chunks * v * hs * 4 * 2, working_set=0),
        ],
        tiles,
    )
    casts = _elementwise(
        "backward: float32 dh, dW to bf16",
        [Stream("read 4, write 2", (n + v) * hs * 6, working_set=0)],
        2,
    )
    forward = [forward_projections, forward_statistics]
    return forward + [backward_projections, gradient, cast, grad_h, grad_w, casts]


def trl_extra_memory(shapes: Shapes) -> float:
    """Two float32 [4096, 32768] buffers per pass, float32 dW and dh accumulators, a bf16 G tile."""
    rows = min(shapes.tokens, TRL_TOKEN_CHUNK)
    buffers = 2 * rows * TRL_VOCAB_CHUNK * 4 + rows * TRL_VOCAB_CHUNK * shapes.element_bytes
    return buffers + shapes.vocab * shapes.student_dim * 4 + shapes.tokens * shapes.student_dim * 4


# --- fusedkd's tile path (what backend="auto" runs on CUDA when its tiles fit the budget) ------------
#
# `backend="tiles"` (`fusedkd.kernels.kd_tile`, `torch_backend.fused_linear_kd.stream`). Per chunk of c
# tokens: the student's and the teacher's projections on cuBLAS (bf16 inputs, float32 [c, V] tiles
# out, the bias folded into the GEMM), one Triton element-wise kernel (pass 1: per-row online
# log-sum-exps of s/T, t/T and of s at T = 1 and the KL sums; pass 2: re-reads both tiles and writes
# G = dloss/dlogits in bf16 into the student tile's own bytes; the JSD a third read for its mixture),
# then dh = G W_s and dW_s += G^T h_s on cuBLAS (into a float32 dW, beta = 1: `accumulate_float32`).
# Nothing is recomputed: 2 N V (H_t + 3 H_s) FLOPs, the unavoidable.

# The code's budget rule, imported: the chunk's tiles (the float32 dW, V x H_s x 4, is on top) within
# `_dispatch.TILES_MEMORY_BUDGET` (1,200 MiB: at V = 151,936, 1,200 MiB / (8 B x V) = 1,035 tokens,
# rounded down to 1,024), and auto takes the fused kernels below `_dispatch.MIN_TILES_CHUNK` tokens.
# `--tile-budget-mib` varies the budget.
TILE_BUDGET_BYTES = _dispatch.TILES_MEMORY_BUDGET
TILE_ENTRY_BYTES = _dispatch.TILES_BYTES_PER_ENTRY  # the float32 s and t tiles; G is over s's bytes
TILE_CHUNK_MULTIPLE = _dispatch.TILES_CHUNK_MULTIPLE
MIN_TILE_CHUNK = _dispatch.MIN_TILES_CHUNK
TILE_ROW_STATS = 8  # float32 per-row statistics and losses of a chunk (assumption; negligible)


def tile_chunk(shapes: Shapes, budget: float = TILE_BUDGET_BYTES) -> int:
    """Tokens per chunk of the tile path under `budget` bytes of tiles (0: the budget does not
    allow the tile path: auto runs the fused kernels)."""
    chunk = _dispatch.tiles_chunk_size(shapes.vocab, int(budget))
    if chunk < MIN_TILE_CHUNK:
        return 0
    return min(chunk, shapes.tokens)


def tile_extra_memory(shapes: Shapes, budget: float = TILE_BUDGET_BYTES) -> float:
    """The chunk's two float32 tiles (G in s's bytes), the float32 dW (V x H_s x 4), the row statistics."""
    chunk = tile_chunk(shapes, budget)
    return (
        chunk * shapes.vocab * TILE_ENTRY_BYTES
        + shapes.vocab * shapes.student_dim * 4
        + chunk * TILE_ROW_STATS * 4
    )


def tile_chunk_within(shapes: Shapes, limit: float) -> int:
    """The largest tile-path chunk (a multiple of TILE_CHUNK_MULTIPLE) whose extra memory is at most
    `limit` bytes (0: none)."""
    per_token = shapes.vocab * TILE_ENTRY_BYTES + TILE_ROW_STATS * 4
    chunk = int((limit - shapes.vocab * shapes.student_dim * 4) // per_token)
    return max(0, chunk // TILE_CHUNK_MULTIPLE * TILE_CHUNK_MULTIPLE)


def fusedkd_tile(shapes: Shapes, hw: Hardware, budget: float = TILE_BUDGET_BYTES) -> list[Prediction]:
    """The tile path's kernels, all chunks together (chunks = ceil(N / c))."""
    n, v, hs, ht, eb = (
        shapes.tokens,
        shapes.vocab,
        shapes.student_dim,
        shapes.teacher_dim,
        shapes.element_bytes,
    )
    chunk = tile_chunk(shapes, budget)
    if chunk == 0:
        raise ValueError(f"a tile budget of {budget / 2**20:.0f} MiB allows no tile-path chunk at V = {v}")
    chunks = _cdiv(n, chunk)
    entries = n * v
    jsd = shapes.divergence == "jsd"

    def weights(name: str, dim: int) -> Stream:
        # Re-read once per chunk: from the L2 if the whole matrix fits the L2 budget, else from HBM.
        size = v * dim * eb
        return Stream(name, chunks * size, working_set=size, from_hbm_once=size)

    student = _gemm(
        "tile: s = h_s W_s^T (cuBLAS, float32 tile)",
        2 * entries * hs,
        [
            weights("W_s per chunk", hs),
            Stream("h_s", n * hs * eb, working_set=0),
            Stream("float32 s written", entries * 4, working_set=0),
        ],
        chunks,
    )
    teacher = _gemm(
        "tile: t = h_t W_t^T (cuBLAS, float32 tile)",
        2 * entries * ht,
        [
            weights("W_t per chunk", ht),
            Stream("h_t", n * ht * eb, working_set=0),
            Stream("float32 t written", entries * 4, working_set=0),
        ],
        chunks,
    )
    reads = 3 if jsd else 2
    elementwise = Prediction(
        f"tile: element-wise kernel (Triton: {reads} reads of s, t; G bf16 out)",
        engine="triton",
        elementwise_overlapped=True,
        launches=chunks,
    )
    # A row's two float32 tiles are 8 V bytes (1.2 MB at Qwen3's V): the re-reads of the rows the
    # programs are on (one per SM) hit the L2 only if those rows fit it.
    elementwise.streams += [
        Stream("s, t first read (pass 1)", entries * 8, working_set=0),
        Stream(
            f"s, t re-read x{reads - 1} (passes 2{', 3' if jsd else ''})",
            (reads - 1) * entries * 8,
            working_set=hw.sms * v * 8,
        ),
        Stream("G written (bf16)", entries * 2, working_set=0),
    ]
    # exp of s/T, t/T, s (T = 1) in pass 1 and again in pass 2 (G); the JSD's mixture: two exps and a
    # log more per read. ALU: as the fused kernels' statistics + gradient passes (28 + 22, JSD + 24).
    elementwise.mufu = (10 if jsd else 6) * entries
    elementwise.alu = (74 if jsd else 50) * entries
    grad_h = _gemm(
        "tile: dh = G W_s (cuBLAS)",
        2 * entries * hs,
        [
            Stream("G read", entries * 2, working_set=0),
            weights("W_s per chunk", hs),
            Stream("dh written", n * hs * eb, working_set=0),
        ],
        chunks,
    )
    dw_size = v * hs * 4
    grad_w = _gemm(
        "tile: dW += G^T h_s (cuBLAS, float32 dW)",
        2 * entries * hs,
        [
            Stream("G read", entries * 2, working_set=0),
            Stream("h_s", n * hs * eb, working_set=0),
            Stream(
                "float32 dW read + written per chunk",
                chunks * dw_size * 2,
                working_set=dw_size,
                from_hbm_once=dw_size,
            ),
        ],
        chunks,
    )
    cast = _elementwise(
        "tile: float32 dW to bf16 (once)", [Stream("read 4, write 2", v * hs * (4 + eb), working_set=0)], 1
    )
    for kernel in (student, teacher, grad_h, grad_w):
        kernel.note = f"{chunks} chunks of {chunk} tokens"
    return [student, teacher, elementwise, grad_h, grad_w, cast]


# --- the table --------------------------------------------------------------------------------------


_SMS = Hardware().sms
METHODS = ("fusedkd", "fusedkd_fused", "fusedkd_tile", "liger", "trl")
# The targets for fusedkd (auto), each evaluated by the model, never hard-coded.
TARGET_VS_LIGER = 0.9  # time <= 0.9 x Liger's
FUSED_MEMORY_LIMIT_MIB = 300  # the fused path's extra memory at N = 16k
FUSED_MEMORY_TOKENS = 16384


def _dtype():
    import torch

    return torch.bfloat16


def _method_row(kernels: list[Prediction], memory: float, shapes: Shapes, hw: Hardware) -> dict:
    kernel_rows = []
    for k in kernels:
        t = k.times(hw)
        kernel_rows.append(
            {
                "kernel": k.kernel,
                "flops": k.flops,
                "hbm_bytes": k.hbm,
                "l2_bytes": k.l2,
                "atomics": k.atomics,
                **t,
                "l2_resident": k.l2_resident,
                "note": k.note,
            }
        )
    time = sum(r["time_s"] for r in kernel_rows)
    flops = sum(r["flops"] for r in kernel_rows)
    return {
        "kernels": kernel_rows,
        "time_s": time,
        "flops": flops,
        "hbm_bytes": sum(r["hbm_bytes"] for r in kernel_rows),
        "l2_bytes": sum(r["l2_bytes"] for r in kernel_rows),
        "atomics": sum(r["atomics"] for r in kernel_rows),
        # Achieved rate on the FLOPs it executes, and as a fraction of the bf16 peak.
        "tflops": flops / time / 1e12,
        "fraction_of_peak": flops / time / hw.bf16_flops,
        # The rate on the unavoidable FLOPs 2NV(H_t + 3H_s): comparable across methods.
        "useful_tflops": shapes.unavoidable_flops / time / 1e12,
        "useful_fraction_of_peak": shapes.unavoidable_flops / time / hw.bf16_flops,
        "extra_memory_bytes": memory,
    }


def evaluate(
    shapes: Shapes,
    hw: Hardware,
    tile_budget: float = TILE_BUDGET_BYTES,
    liger_bytes: float = LIGER_ELEMENTWISE_BYTES,
) -> dict:
    """Every method's prediction at `shapes` on `hw`, and the issue's targets for fusedkd (auto)."""
    rows = {
        "fusedkd_fused": _method_row(fusedkd(shapes, hw), fusedkd_extra_memory(shapes), shapes, hw),
        "liger": _method_row(liger(shapes, hw, liger_bytes), liger_extra_memory(shapes), shapes, hw),
        "trl": _method_row(trl(shapes, hw), trl_extra_memory(shapes), shapes, hw),
    }
    chunk = tile_chunk(shapes, tile_budget)
    if chunk:
        rows["fusedkd_tile"] = _method_row(
            fusedkd_tile(shapes, hw, tile_budget), tile_extra_memory(shapes, tile_budget), shapes, hw
        )
        rows["fusedkd_tile"]["chunk_tokens"] = chunk
    # auto on CUDA: the tile path when its budget allows a chunk, else the fused kernels.
    path = "tile" if chunk else "fused"
    rows["fusedkd"] = {**rows[f"fusedkd_{path}"], "path": path}
    rows = {method: rows[method] for method in METHODS if method in rows}
    return {
        "shapes": asdict(shapes),
        "gpu": hw.name,
        "tile_budget_bytes": tile_budget,
        "unavoidable_flops": shapes.unavoidable_flops,
        "fused_flops": shapes.fused_flops,
        "methods": rows,
        "targets": targets(shapes, rows),
        "suggested_budget": suggested_budget(shapes, hw, rows["liger"]),
    }


def targets(shapes: Shapes, rows: dict) -> dict:
    """The issue's targets, evaluated on the predictions: fusedkd (auto) <= 0.9x Liger's time, below
    TRL's, extra memory <= Liger's; the fused path <= 300 MiB extra at N = 16k (O(N) memory)."""
    auto, liger_row, trl_row = rows["fusedkd"], rows["liger"], rows["trl"]
    result = {
        "time_vs_liger": {
            "value": auto["time_s"] / liger_row["time_s"],
            "limit": TARGET_VS_LIGER,
            "pass": auto["time_s"] <= TARGET_VS_LIGER * liger_row["time_s"],
        },
        "time_vs_trl": {
            "value": auto["time_s"] / trl_row["time_s"],
            "limit": 1.0,
            "pass": auto["time_s"] < trl_row["time_s"],
        },
        "memory_vs_liger": {
            "value": auto["extra_memory_bytes"] / liger_row["extra_memory_bytes"],
            "limit": 1.0,
            "pass": auto["extra_memory_bytes"] <= liger_row["extra_memory_bytes"],
        },
    }
    if shapes.tokens == FUSED_MEMORY_TOKENS:
        fused_mib = rows["fusedkd_fused"]["extra_memory_bytes"] / 2**20
        result["fused_memory_mib"] = {
            "value": fused_mib,
            "limit": FUSED_MEMORY_LIMIT_MIB,
            "pass": fused_mib <= FUSED_MEMORY_LIMIT_MIB,
        }
    result["pass"] = all(check["pass"] for check in result.values() if isinstance(check, dict))
    return result


def suggested_budget(shapes: Shapes, hw: Hardware, liger_row: dict) -> dict | None:
    """The largest tile-path chunk whose extra memory stays within Liger's, its budget, and the tile
    path's predicted time there (None: no chunk fits)."""
    chunk = min(tile_chunk_within(shapes, liger_row["extra_memory_bytes"]), shapes.tokens)
    if chunk < MIN_TILE_CHUNK:
        return None
    budget = chunk * shapes.vocab * TILE_ENTRY_BYTES
    row = _method_row(fusedkd_tile(shapes, hw, budget), tile_extra_memory(shapes, budget), shapes, hw)
    return {
        "chunk_tokens": chunk,
        "budget_mib": budget / 2**20,
        "time_ms": row["time_s"] * 1e3,
        "time_vs_liger": row["time_s"] / liger_row["time_s"],
        "extra_mib": row["extra_memory_bytes"] / 2**20,
    }


def json_rows(result: dict) -> list[dict]:
    """One flat JSON object per method of an `evaluate` result."""
    shapes = result["shapes"]
    out = []
    for method, row in result["methods"].items():
        item = {
            "gpu": result["gpu"],
            "n": shapes["tokens"],
            "divergence": f"{shapes['divergence']}+ce",
            "method": method,
            "time_ms": row["time_s"] * 1e3,
            "extra_mib": row["extra_memory_bytes"] / 2**20,
            "useful_tflops": row["useful_tflops"],
            "unavoidable_tflop": result["unavoidable_flops"] / 1e12,
            "executed_tflop": row["flops"] / 1e12,
            "fraction_of_peak": row["fraction_of_peak"],
            "hbm_gb": row["hbm_bytes"] / GB,
            "l2_gb": row["l2_bytes"] / GB,
            "atomics": row["atomics"],
            "predicted": True,
            "kernels": [
                {
                    "kernel": k["kernel"],
                    "time_ms": k["time_s"] * 1e3,
                    "bound": k["bound"],
                    "tflop": k["flops"] / 1e12,
                    "hbm_gb": k["hbm_bytes"] / GB,
                    "quantization": k["quantization"],
                    "fill_ms": k["fill_s"] * 1e3,
                }
                for k in row["kernels"]
            ],
        }
        if "chunk_tokens" in row:
            item["chunk_tokens"] = row["chunk_tokens"]
        if method == "fusedkd":
            item["path"] = row["path"]
            item["tile_budget_mib"] = result["tile_budget_bytes"] / 2**20
            item["targets"] = result["targets"]
            item["suggested_budget"] = result["suggested_budget"]
        out.append(item)
    return out


def backward_traffic(shapes: Shapes, hw: Hardware) -> dict:
    """fusedkd's backward HBM traffic against the unavoidable: weights, hidden states and the student's
    gradients moved once per ~512 tokens (the float32 dW accumulator read and written, the dh
    accumulator once)."""
    phases = fusedkd_gradient(shapes, hw)
    for phase in phases:
        phase.place(hw)
    hbm = sum(phase.hbm for phase in phases)
    n, v, hs, ht, eb = (
        shapes.tokens,
        shapes.vocab,
        shapes.student_dim,
        shapes.teacher_dim,
        shapes.element_bytes,
    )
    per = _cdiv(n, 512)
    unavoidable = per * (v * (hs + ht) * eb + v * hs * 4 * 2) + n * (hs + ht) * eb + n * hs * 4 * 2
    return {"hbm_bytes": hbm, "unavoidable_bytes": unavoidable, "ratio": hbm / unavoidable}


def _fmt_bytes(x: float) -> str:
    return f"{x / GB:8.1f} GB"


def _mark(check: dict) -> str:
    return "PASS" if check["pass"] else "FAIL"


def print_assumptions(hw_list: list[Hardware], tile_budget: float) -> None:
    print("Roofline PREDICTIONS (no GPU ran: a model, benchmarks/gpu_model.py), forward + backward.")
    for hw in hw_list:
        print(
            f"  {hw.label}: {hw.bf16_flops / 1e12:.0f} TFLOP/s bf16 dense, "
            f"HBM {hw.hbm_bytes_per_s / 1e12:.2f} TB/s, L2 {hw.l2_capacity / MB:.0f} MB "
            f"at {hw.l2_bytes_per_s / 1e12:.1f} TB/s (assumed)"
        )
    hw = hw_list[0]
    print(
        f"  Assumed: MMA efficiency cuBLAS {hw.cublas_mma_efficiency}, Triton {hw.triton_mma_efficiency}; "
        f"{hw.dot_fill_s * 1e6:.2f} us per dot K-loop fill; {hw.launch_gap_s * 1e6:.0f} us per launch; "
        f"{hw.atomics_per_s:.3g} float32 atomics/s."
    )
    print(
        "  fusedkd = what backend='auto' runs on CUDA: the tile path (chunks from a "
        f"{tile_budget / 2**20:.0f} MiB tile budget) when the budget allows a chunk, else the fused kernels."
    )


def print_headline(results: list[dict]) -> None:
    """Time, useful TFLOP/s and extra memory per method, then the targets, per row."""
    print()
    header = (
        f"{'GPU':<5} {'N':>6} {'divergence':<14} "
        + " ".join(f"{m:>21}" for m in METHODS)
        + "   (time ms / useful TFLOP/s / extra MiB)"
    )
    print(header)
    for result in results:
        s = result["shapes"]
        cells = []
        for method in METHODS:
            row = result["methods"].get(method)
            if row is None:
                cells.append(f"{'-':>21}")
                continue
            mib = row["extra_memory_bytes"] / 2**20
            cells.append(f"{row['time_s'] * 1e3:7.1f} /{row['useful_tflops']:4.0f} /{mib:6.0f}")
        path = result["methods"]["fusedkd"]["path"]
        print(
            f"{result['gpu']:<5} {s['tokens']:>6} {s['divergence'] + '+ce':<14} "
            + " ".join(f"{c:>21}" for c in cells)
            + f"   auto = {path}"
        )
    print()
    print(
        f"Targets (fusedkd = auto): time <= {TARGET_VS_LIGER}x Liger's, time < TRL's, extra memory <= "
        f"Liger's; fused path <= {FUSED_MEMORY_LIMIT_MIB} MiB extra at N = {FUSED_MEMORY_TOKENS}."
    )
    print(
        f"{'GPU':<5} {'N':>6} {'divergence':<14} {'vs Liger time':>15} {'vs TRL time':>13} "
        f"{'vs Liger memory':>17} {'fused MiB':>14} {'row':>5}   largest chunk within Liger's memory"
    )
    for result in results:
        s, t, sb = result["shapes"], result["targets"], result["suggested_budget"]
        fused = t.get("fused_memory_mib")
        fused_cell = f"{fused['value']:.0f} {_mark(fused)}" if fused else "-"
        suggestion = (
            f"{sb['chunk_tokens']} tokens ({sb['budget_mib']:.0f} MiB budget, {sb['extra_mib']:.0f} MiB "
            f"extra): {sb['time_ms']:.1f} ms, {sb['time_vs_liger']:.3f}x Liger"
            if sb
            else "none"
        )
        print(
            f"{result['gpu']:<5} {s['tokens']:>6} {s['divergence'] + '+ce':<14} "
            f"{t['time_vs_liger']['value']:9.4f}x {_mark(t['time_vs_liger'])} "
            f"{t['time_vs_trl']['value']:7.4f}x {_mark(t['time_vs_trl'])} "
            f"{t['memory_vs_liger']['value']:11.4f}x {_mark(t['memory_vs_liger'])} "
            f"{fused_cell:>14} {'PASS' if t['pass'] else 'FAIL':>5}   {suggestion}"
        )
    shapes = Shapes(FUSED_MEMORY_TOKENS)
    low, high = (liger_extra_memory(shapes, b) / 2**20 for b in (8, 18))
    print(
        f"Liger's extra memory is an estimate ({LIGER_CHUNK_ENTRY_BYTES} B per chunk x V entry: the 4 chunk "
        f"tensors measured on a CPU, s, t, G bf16 and one float32): {low:.0f} to {high:.0f} MiB at 8 to 18 B "
        "per entry."
    )


def print_detail(results: list[dict]) -> None:
    for result in results:
        s = result["shapes"]
        print()
        print(
            f"{result['gpu']}, N = {s['tokens']}, V = {s['vocab']}, H_t = {s['teacher_dim']}, "
            f"H_s = {s['student_dim']}, bf16, {s['divergence']} + CE: unavoidable GEMMs 2NV(H_t+3H_s) = "
            f"{result['unavoidable_flops'] / 1e12:.1f} TFLOP; fused 2NV(2H_t+4H_s) = "
            f"{result['fused_flops'] / 1e12:.1f} TFLOP"
        )
        print(
            f"  {'method / kernel':<52} {'TFLOP':>6} {'HBM':>11} {'L2':>11} {'atomics':>9} "
            f"{'bound':>6} {'quant':>5} {'fill':>6} {'time':>9}"
        )
        for method, row in result["methods"].items():
            if method == "fusedkd":
                continue  # the same kernels as the path it runs
            for k in row["kernels"]:
                print(
                    f"  {method + ': ' + k['kernel']:<52.52} {k['flops'] / 1e12:6.1f} "
                    f"{_fmt_bytes(k['hbm_bytes'])} {_fmt_bytes(k['l2_bytes'])} {k['atomics']:9.2e} "
                    f"{k['bound']:>6} {k['quantization']:5.2f} {k['fill_s'] * 1e3:4.1f}ms "
                    f"{k['time_s'] * 1e3:7.1f}ms"
                )
            print(
                f"  {method + ' total':<52} {row['flops'] / 1e12:6.1f} {_fmt_bytes(row['hbm_bytes'])} "
                f"{_fmt_bytes(row['l2_bytes'])} {row['atomics']:9.2e} {'':>20} {row['time_s'] * 1e3:7.1f}ms"
                f"   {100 * row['fraction_of_peak']:.0f}% of peak; "
                f"useful {row['useful_tflops']:.0f} TFLOP/s; "
                f"extra memory {row['extra_memory_bytes'] / 2**20:.0f} MiB"
            )


def print_sensitivity(hw_list: list[Hardware], tile_budget: float) -> None:
    """How the N = 16k, forward KL + CE prediction moves with the assumptions it hangs on."""
    print()
    print(
        "Sensitivity (N = 16384, forward_kl + CE; time ms of fusedkd fused / tile, Liger, TRL; auto / Liger):"
    )
    shapes = Shapes(FUSED_MEMORY_TOKENS)
    for hw in hw_list:
        variants = [
            ("defaults", hw, LIGER_ELEMENTWISE_BYTES),
            ("L2 7 TB/s", replace(hw, l2_bytes_per_s=7e12), LIGER_ELEMENTWISE_BYTES),
            ("L2 12 TB/s", replace(hw, l2_bytes_per_s=12e12), LIGER_ELEMENTWISE_BYTES),
            ("L2 usable 50%", replace(hw, l2_usable=0.5), LIGER_ELEMENTWISE_BYTES),
            ("Triton MMA 0.55", replace(hw, triton_mma_efficiency=0.55), LIGER_ELEMENTWISE_BYTES),
            ("Triton MMA 0.65", replace(hw, triton_mma_efficiency=0.65), LIGER_ELEMENTWISE_BYTES),
            ("fill 0.25 us", replace(hw, dot_fill_s=0.25e-6), LIGER_ELEMENTWISE_BYTES),
            ("fill 1.0 us", replace(hw, dot_fill_s=1.0e-6), LIGER_ELEMENTWISE_BYTES),
            ("cuBLAS MMA 0.70", replace(hw, cublas_mma_efficiency=0.70), LIGER_ELEMENTWISE_BYTES),
            ("cuBLAS MMA 0.80", replace(hw, cublas_mma_efficiency=0.80), LIGER_ELEMENTWISE_BYTES),
            ("Liger 16 B/entry", hw, 16),
            ("Liger 28 B/entry", hw, 28),
        ]
        for label, other, liger_bytes in variants:
            m = evaluate(shapes, other, tile_budget, liger_bytes)["methods"]
            tile = m.get("fusedkd_tile")
            tile_ms = f"{tile['time_s'] * 1e3:6.1f}" if tile else "     -"
            print(
                f"  {hw.name} {label:<17} fused {m['fusedkd_fused']['time_s'] * 1e3:6.1f}  tile {tile_ms}  "
                f"liger {m['liger']['time_s'] * 1e3:6.1f}  trl {m['trl']['time_s'] * 1e3:6.1f}  "
                f"auto/liger {m['fusedkd']['time_s'] / m['liger']['time_s']:.2f}"
            )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpus", default="H100,H200", help="comma-separated: H100, H200")
    parser.add_argument("--tokens", default="4096,16384,32768")
    parser.add_argument("--divergences", default="forward_kl,jsd")
    parser.add_argument("--l2-tbps", type=float, default=Hardware.l2_bytes_per_s / 1e12)
    parser.add_argument("--triton-efficiency", type=float, default=Hardware.triton_mma_efficiency)
    parser.add_argument(
        "--tile-budget-mib",
        type=float,
        default=TILE_BUDGET_BYTES / 2**20,
        help="the tile path's budget for a chunk's float32 tiles (0: auto runs the fused kernels)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per (gpu, n, divergence, method")
    parser.add_argument("--detail", action="store_true", help="every kernel's counts, bound and time")
    args = parser.parse_args(argv)
    hw_list = [
        replace(GPUS[name], l2_bytes_per_s=args.l2_tbps * 1e12, triton_mma_efficiency=args.triton_efficiency)
        for name in args.gpus.split(",")
    ]
    budget = args.tile_budget_mib * 2**20
    results = [
        evaluate(Shapes(int(n), divergence=d), hw, budget)
        for hw in hw_list
        for d in args.divergences.split(",")
        for n in args.tokens.split(",")
    ]
    if args.json:
        for result in results:
            for row in json_rows(result):
                print(json.dumps(row))
        return 0
    print_assumptions(hw_list, budget)
    print_headline(results)
    if args.detail:
        print_detail(results)
    print()
    for hw in hw_list:
        traffic = backward_traffic(Shapes(FUSED_MEMORY_TOKENS), hw)
        print(
            f"{hw.name}: fused path's backward HBM traffic at N = {FUSED_MEMORY_TOKENS}: "
            f"{traffic['hbm_bytes'] / GB:.1f} GB, {traffic['ratio']:.1f}x the unavoidable "
            f"{traffic['unavoidable_bytes'] / GB:.1f} GB "
            "(weights, hidden states, gradients once per 512 tokens)"
        )
    print_sensitivity(hw_list, budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
