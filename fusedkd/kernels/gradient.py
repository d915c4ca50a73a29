"""Pass 2: the gradient kernel. Recomputes the logit tiles, forms the tile of G = dloss/ds from the saved
per-token statistics (docs/design.md §4) and multiplies it straight into the student's gradients:

    grad_student_hidden = G W_s      grad_student_weight = G^T h_s      grad_student_bias = sum_i G

No [N, V] buffer exists: a tile of G lives in registers and in a small per-program staging scratch
(an update's tokens x one vocabulary group), never more. The logits are computed once here, so the
pass costs 2 N V (H_t + H_s) for the recomputation plus 4 N V H_s for the two gradient products
(docs/design.md §5). benchmarks/gpu_model.py models what each step moves; `python -m
fusedkd.kernels.compile_check` shows what the compiler made of it.

Work split:

* A persistent grid of `num_programs` programs (one per SM); each owns whole vocabulary groups of
  GROUP_V = VOCAB_SUB_BLOCKS * BLOCK_V columns (vg = pid, pid + P, ...) and, for each, walks *all*
  tokens. The weight-gradient rows of an owned group therefore have a single writer: they are
  accumulated in float32 by plain read-modify-writes into a per-program scratch of [GROUP_V, H_s]
  (P * GROUP_V * H_s floats in all, independent of N and V), then cast once into the output; with
  float32 weights the output itself is the accumulator. This makes grad_student_weight and
  grad_student_bias deterministic and needs no float32 [V, H_s] buffer (for Qwen3-0.6B that buffer
  alone would be 622 MB), which atomics on the weight side would.
* Tokens are taken SUB_BLOCKS token blocks at a time (an "update", 1024 tokens on a GPU).
  (a) For each (token block, vocabulary block) tile the teacher's logits are computed and parked
  (tl_utils.park_tile), then the student's, so only one float32 accumulator is in registers during a
  dot (128 x 128 tiles); G is formed on the tile's two column halves (the student's split in
  registers, the teacher's read back by halves) and staged, in the dtype of the products
  (bf16/fp16; float32 for float32 inputs or under the interpreter), in a per-program
  [SUB_BLOCKS * BLOCK_N, GROUP_V] scratch. (b) Then the two products run as GEMMs over the staged
  G, each with one float32 accumulator: grad_W[group] += G^T h_s in [PRODUCT_M, PRODUCT_H] tiles with
  K = the update's tokens, so the float32 rows are read and written once per update; grad_h[rows] +=
  G W_s[group] in [BLOCK_N, PRODUCT_H] tiles with K = the group's columns.
* grad_student_hidden ([N, H_s], the small one) is accumulated with float32 atomic adds (relaxed
  ordering: no fences) into a float32 [N, H_s] buffer: each element receives one add per vocabulary
  group, so its summation order, and its last bits, may vary from run to run. TOKEN_GROUPS > 1 starts
  the programs of different groups at different updates (programs of one group walk the tokens in
  step, so a hidden-state tile read from HBM serves the whole group through the L2).
* L2: a program's own weight rows are re-read once per token block and its float32 weight-gradient
  rows once per update, each long after the L2 would have evicted them (132 programs stream distinct
  vocabulary groups), so they are loaded with the evict_first hint, which keeps them from displacing
  what is re-read soon: the parked tile, the staged G, the hidden states.
* fp16: G is multiplied by a power of two before its cast (`_autograd.gradient_scale`) and the
  products are divided by it in float32, so G does not underflow fp16 at N >= 16k under "mean".
* The alternative, one pass owning token blocks for grad_student_hidden and one owning vocabulary
  blocks for grad_student_weight, would be deterministic but recomputes both models' logits twice:
  2 N V (3 H_t + 5 H_s) FLOPs instead of 2 N V (2 H_t + 4 H_s), +39% at Qwen3-4B -> 0.6B shapes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from fusedkd._autograd import gradient_scale
from fusedkd._options import head_chain_rule
from fusedkd.kernels import INTERPRETER
from fusedkd.kernels.config import KernelConfig, gradient_group_width, gradient_programs, staging_dtype
from fusedkd.kernels.statistics import (
    STAT_DIVERGENCE,
    STAT_LOGZ_STUDENT_PLAIN,
    STAT_LOGZ_STUDENT_T,
    STAT_LOGZ_TEACHER_T,
    STAT_M_STUDENT,
    STAT_M_TEACHER,
    STAT_TEACHER_AT_TOP,
)
from fusedkd.kernels.tl_utils import (
    DIVERGENCE_CODES,
    FORWARD_KL,
    REVERSE_KL,
    dot,
    inverse_temperature,
    logaddexp,
    logits_tile,
    park_tile,
    soft_cap,
    soft_cap_derivative,
    unpark_tile,
)

if TYPE_CHECKING:
    from fusedkd.kernels.fused_linear_kd import _Problem


@triton.jit
def gradient_tile(
    s,
    t,
    cols,
    col_mask,
    row_mask,
    labels,
    stats,
    num_tokens,
    weight_distill,
    weight_ce,
    inv_temperature,
    beta,
    log_beta,
    log_one_minus_beta,
    DIVERGENCE: tl.constexpr,
    HAS_CE_GRAD: tl.constexpr,
    SEPARATE_CE: tl.constexpr,
):
    """G = w_D dD/ds + w_C dC/ds on one tile (float32), zero outside the valid rows and columns.

    `stats` points at the tile's positions in the [fields, positions] statistics.
    """
    m_student = tl.load(stats + STAT_M_STUDENT * num_tokens, mask=row_mask, other=0.0)
    logz_student = tl.load(stats + STAT_LOGZ_STUDENT_T * num_tokens, mask=row_mask, other=0.0)
    m_teacher = tl.load(stats + STAT_M_TEACHER * num_tokens, mask=row_mask, other=0.0)
    logz_teacher = tl.load(stats + STAT_LOGZ_TEACHER_T * num_tokens, mask=row_mask, other=0.0)

    # Padding columns take the row maxima (finite, no overflow); G is zeroed there at the end.
    s = tl.where(col_mask[None, :], s, m_student[:, None])
    t = tl.where(col_mask[None, :], t, m_teacher[:, None])
    # log q = (s - m_s)/T - log Z_a,  log p = (t - m_t)/T - log Z_b: relative to the row maxima, so the
    # likely tokens' probabilities are exact even for huge logits.
    student_shifted = s - m_student[:, None]
    log_q = student_shifted * inv_temperature - logz_student[:, None]
    q = tl.exp(log_q)
    if DIVERGENCE == FORWARD_KL:
        # dD/ds = (q - p) / T
        log_p = (t - m_teacher[:, None]) * inv_temperature - logz_teacher[:, None]
        grad = (q - tl.exp(log_p)) * (weight_distill * inv_temperature)[:, None]
    elif DIVERGENCE == REVERSE_KL:
        # dD/ds = q (log q - log p - D) / T = q ((s - m_s)/T - (t - t_*)/T - D_*) / T, relative to the
        # student's top token (statistics.py): exact where q is large.
        divergence_top = tl.load(stats + STAT_DIVERGENCE * num_tokens, mask=row_mask, other=0.0)
        teacher_at_top = tl.load(stats + STAT_TEACHER_AT_TOP * num_tokens, mask=row_mask, other=0.0)
        # Where q = 0 (a -inf logit) it is q D_*: 0, or NaN when D_* is not finite (autograd's
        # q (g - sum q g) there is 0 * inf), never q times an infinite log-ratio.
        log_ratio = student_shifted * inv_temperature - (t - teacher_at_top[:, None]) * inv_temperature
        divergence_top = divergence_top[:, None]
        grad = q * tl.where(q > 0, log_ratio - divergence_top, divergence_top)
        grad = grad * (weight_distill * inv_temperature)[:, None]
    else:
        log_p = (t - m_teacher[:, None]) * inv_temperature - logz_teacher[:, None]
        # dD/ds = (1 - beta) q (log q - log m - KL(q || m)) / T,  log m = logaddexp(log beta + log p, ...)
        kl_student_mix = tl.load(stats + STAT_DIVERGENCE * num_tokens, mask=row_mask, other=0.0)
        log_m = logaddexp(log_beta + log_p, log_one_minus_beta + log_q)
        weight = weight_distill * ((1.0 - beta) * inv_temperature)
        # Where q = 0 it is q KL(q || m) (as the reverse KL's).
        kl_student_mix = kl_student_mix[:, None]
        grad = q * tl.where(q > 0, log_q - log_m - kl_student_mix, kl_student_mix) * weight[:, None]
    if HAS_CE_GRAD:
        # dC/ds = softmax(s) - onehot(y); softmax(s) is q itself when T = 1.
        if SEPARATE_CE:
            logz_plain = tl.load(stats + STAT_LOGZ_STUDENT_PLAIN * num_tokens, mask=row_mask, other=0.0)
            q_plain = tl.exp(student_shifted - logz_plain[:, None])
        else:
            q_plain = q
        onehot = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
        grad += weight_ce[:, None] * (q_plain - onehot)
    return tl.where(row_mask[:, None] & col_mask[None, :], grad, 0.0)


# Token counts vary per batch: never specialized on, so a new batch size never recompiles.
@triton.jit(do_not_specialize=["num_tokens"])
def gradient_kernel(
    student_hidden_ptr, student_weight_ptr, student_bias_ptr,
    teacher_hidden_ptr, teacher_weight_ptr, teacher_bias_ptr,
    labels_ptr, stride_labels, token_index_ptr, num_valid_ptr, stats_ptr,
    weight_distill_ptr, weight_ce_ptr, grad_scale_ptr, staging_ptr, park_ptr,
    grad_hidden_ptr, grad_weight_acc_ptr, grad_weight_ptr, grad_bias_ptr,
    num_tokens, vocab_size, student_dim, teacher_dim,
    stride_student_hidden_n, stride_student_hidden_h, stride_student_weight_v, stride_student_weight_h,
    stride_student_bias,
    stride_teacher_hidden_n, stride_teacher_hidden_h, stride_teacher_weight_v, stride_teacher_weight_h,
    stride_teacher_bias,
    inv_temperature, beta, log_beta, log_one_minus_beta,
    DIVERGENCE: tl.constexpr, HAS_CE_GRAD: tl.constexpr, SEPARATE_CE: tl.constexpr,
    student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap,
    STUDENT_SOFTCAP: tl.constexpr, TEACHER_SOFTCAP: tl.constexpr,
    HAS_STUDENT_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
    EVEN_STUDENT_DIM: tl.constexpr, EVEN_TEACHER_DIM: tl.constexpr,
    STUDENT_UPCAST: tl.constexpr, TEACHER_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    GRAD_HIDDEN: tl.constexpr, GRAD_WEIGHT: tl.constexpr, GRAD_BIAS: tl.constexpr,
    WEIGHT_SCRATCH: tl.constexpr, TOKEN_GROUPS: tl.constexpr,
    SUB_BLOCKS: tl.constexpr, VOCAB_SUB_BLOCKS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    PRODUCT_M: tl.constexpr, PRODUCT_H: tl.constexpr, PRODUCT_K: tl.constexpr,
    PRODUCT_STAGES: tl.constexpr, EVEN_PRODUCT_DIM: tl.constexpr,
):  # fmt: skip
    """A program owns vocabulary groups of GROUP_V = VOCAB_SUB_BLOCKS * BLOCK_V columns: the logits
    and G are formed BLOCK_V columns at a time, the gradient products run over the whole group.

    grad_hidden_ptr: float32 [N, H_s], zeroed (atomics). grad_weight_acc_ptr: float32, the output [V, H_s]
    itself (WEIGHT_SCRATCH False) or a [num_programs * GROUP_V, H_s] scratch whose rows are cast into
    grad_weight_ptr [V, H_s]. grad_bias_ptr: float32 [V], zeroed (read-modify-written by the owner of the
    columns). staging_ptr: a per-program [SUB_BLOCKS * BLOCK_N, GROUP_V] scratch for the G tiles of one
    update, in the dtype the gradient products run in. park_ptr: a per-program float32 [BLOCK_N *
    BLOCK_V] scratch for the parked teacher tile. grad_scale_ptr: a power of two G is multiplied by
    before that cast and divided by after the products (fp16: keeps G above fp16's underflow; 1
    otherwise). All gradient and scratch buffers are contiguous. PRODUCT_M divides GROUP_V; PRODUCT_K
    divides GROUP_V and SUB_BLOCKS * BLOCK_N; BLOCK_V is even."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_valid = tl.load(num_valid_ptr).to(tl.int32)
    num_token_blocks = tl.cdiv(num_valid, BLOCK_N)
    num_updates = tl.cdiv(num_token_blocks, SUB_BLOCKS)
    rotation = ((pid % TOKEN_GROUPS) * num_updates) // TOKEN_GROUPS
    GROUP_V: tl.constexpr = VOCAB_SUB_BLOCKS * BLOCK_V
    num_vocab_groups = tl.cdiv(vocab_size, GROUP_V)
    offs_n = tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, BLOCK_V)
    offs_g = tl.arange(0, GROUP_V)
    offs_h = tl.arange(0, BLOCK_H)
    grad_scale = tl.load(grad_scale_ptr)
    inv_grad_scale = 1.0 / grad_scale
    staging = staging_ptr + pid.to(tl.int64) * (SUB_BLOCKS * BLOCK_N * GROUP_V)
    park_teacher = park_ptr + pid.to(tl.int64) * (BLOCK_N * BLOCK_V)
    HALF_V: tl.constexpr = BLOCK_V // 2
    offs_half = tl.arange(0, HALF_V)
    offs_ph = tl.arange(0, PRODUCT_H)
    offs_pk = tl.arange(0, PRODUCT_K)
    staged_dtype = staging_ptr.dtype.element_ty

    for vocab_group in range(pid, num_vocab_groups, num_programs):
        group_cols = vocab_group * GROUP_V + offs_g
        group_mask = group_cols < vocab_size
        group_cols_64 = group_cols.to(tl.int64)
        if WEIGHT_SCRATCH:
            acc_rows = (pid * GROUP_V + offs_g).to(tl.int64) * student_dim
        else:
            acc_rows = group_cols_64 * student_dim

        for update in range(0, num_updates):
            first_block = ((update + rotation) % num_updates) * SUB_BLOCKS
            # (a) The G tiles of SUB_BLOCKS token blocks x VOCAB_SUB_BLOCKS vocabulary blocks, formed
            # from recomputed logits and staged.
            for tile in range(0, SUB_BLOCKS * VOCAB_SUB_BLOCKS):
                sub = tile // VOCAB_SUB_BLOCKS
                vocab_sub = tile % VOCAB_SUB_BLOCKS
                token_block = first_block + sub
                cols = vocab_group * GROUP_V + vocab_sub * BLOCK_V + offs_v
                col_mask = cols < vocab_size
                if token_block < num_token_blocks:
                    positions = token_block * BLOCK_N + offs_n
                    row_mask = positions < num_valid
                    rows = tl.load(token_index_ptr + positions, mask=row_mask, other=0).to(tl.int64)
                    # One accumulator in registers at a time: the teacher's tile is parked
                    # (tl_utils.park_tile) while the student's is computed; G is then formed on the
                    # two column halves of the tile (the student's split in registers, the teacher's
                    # read back by halves), which halves the elementwise phase's live registers.
                    t = logits_tile(
                        teacher_hidden_ptr, rows * stride_teacher_hidden_n, row_mask, stride_teacher_hidden_h,
                        teacher_weight_ptr, cols, col_mask, stride_teacher_weight_v, stride_teacher_weight_h,
                        teacher_bias_ptr, stride_teacher_bias, teacher_dim, HAS_TEACHER_BIAS,
                        EVEN_TEACHER_DIM, TEACHER_UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H,
                        teacher_logit_scale, teacher_softcap, TEACHER_SOFTCAP, "evict_first",
                    )  # fmt: skip
                    park_tile(park_teacher, t, BLOCK_N, BLOCK_V)
                    # The student's logits before its soft cap (the cap and its derivative come below).
                    s = logits_tile(
                        student_hidden_ptr, rows * stride_student_hidden_n, row_mask, stride_student_hidden_h,
                        student_weight_ptr, cols, col_mask, stride_student_weight_v, stride_student_weight_h,
                        student_bias_ptr, stride_student_bias, student_dim, HAS_STUDENT_BIAS,
                        EVEN_STUDENT_DIM, STUDENT_UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H,
                        student_logit_scale, student_softcap, False, "evict_first",
                    )  # fmt: skip
                    s_low, s_high = tl.split(tl.permute(tl.reshape(s, [BLOCK_N, 2, HALF_V]), [0, 2, 1]))
                    weight_distill = tl.load(weight_distill_ptr + rows, mask=row_mask, other=0.0)
                    if HAS_CE_GRAD:
                        weight_ce = tl.load(weight_ce_ptr + rows, mask=row_mask, other=0.0)
                        labels = tl.load(labels_ptr + rows * stride_labels, mask=row_mask, other=0)
                    else:
                        weight_ce = weight_distill
                        labels = rows
                    for half in tl.static_range(0, 2):
                        half_cols = vocab_group * GROUP_V + vocab_sub * BLOCK_V + half * HALF_V + offs_half
                        half_mask = half_cols < vocab_size
                        t = unpark_tile(park_teacher, half * HALF_V, BLOCK_V, BLOCK_N, HALF_V)
                        if half == 0:
                            s = s_low
                        else:
                            s = s_high
                        if STUDENT_SOFTCAP:  # s = c tanh(x / c) of x = scale z; G picks up dx/ds below
                            cap_derivative = soft_cap_derivative(s, student_softcap)
                            s = soft_cap(s, student_softcap)
                        grad = gradient_tile(
                            s, t, half_cols, half_mask, row_mask, labels, stats_ptr + positions, num_tokens,
                            weight_distill, weight_ce, inv_temperature, beta, log_beta, log_one_minus_beta,
                            DIVERGENCE, HAS_CE_GRAD, SEPARATE_CE,
                        )  # fmt: skip
                        if STUDENT_SOFTCAP:
                            # dloss/dx = G (1 - tanh^2); the logit scale (dx/dz) is in the token weights.
                            # Padding columns stay 0 (x = h . 0 there: NaN for an infinite h).
                            grad = tl.where(half_mask[None, :], grad * cap_derivative, 0.0)
                        if GRAD_BIAS:
                            # The program owns these columns: a read-modify-write of the float32 sums.
                            bias_ptrs = grad_bias_ptr + half_cols
                            bias = tl.load(bias_ptrs, mask=half_mask, other=0.0)
                            tl.store(bias_ptrs, bias + tl.sum(grad, axis=0), mask=half_mask)
                        # The gradient products run at the input precision (G rounded to the input
                        # dtype, float32 accumulation), as the matmuls of a materialized-logits recipe
                        # would.
                        staged = (
                            staging
                            + (sub * BLOCK_N + offs_n)[:, None] * GROUP_V
                            + (vocab_sub * BLOCK_V + half * HALF_V + offs_half)[None, :]
                        )
                        tl.store(staged, (grad * grad_scale).to(staged_dtype))
                        if GRAD_BIAS:
                            # The next tile of these columns reads the sums back (other threads, maybe).
                            tl.debug_barrier()
            # The staged tiles are read back below by other threads of the CTA (the compiler picks
            # the layouts): a CTA barrier orders the stores before the loads (once per update).
            tl.debug_barrier()

            # (b) The student's gradient products over the staged tokens, as two GEMMs with one float32
            # accumulator each, PRODUCT_H hidden units by PRODUCT_K at a time:
            # grad_W[cols] += G^T h_s with K = SUB_BLOCKS * BLOCK_N tokens per read-modify-write of
            # the float32 rows, then grad_h[rows] += G W_s[cols], one atomic add per token and unit.
            if GRAD_WEIGHT:
                for tile in range(0, (GROUP_V // PRODUCT_M) * tl.cdiv(student_dim, PRODUCT_H)):
                    offs_m = (tile % (GROUP_V // PRODUCT_M)) * PRODUCT_M + tl.arange(0, PRODUCT_M)
                    h = (tile // (GROUP_V // PRODUCT_M)) * PRODUCT_H + offs_ph
                    if EVEN_PRODUCT_DIM:
                        in_h = offs_ph < PRODUCT_H
                    else:
                        in_h = h < student_dim
                    contribution = tl.zeros([PRODUCT_M, PRODUCT_H], tl.float32)
                    for k in tl.range(0, SUB_BLOCKS * BLOCK_N, PRODUCT_K, num_stages=PRODUCT_STAGES):
                        positions = first_block * BLOCK_N + k + offs_pk
                        row_mask = positions < num_valid
                        rows = tl.load(token_index_ptr + positions, mask=row_mask, other=0).to(tl.int64)
                        # G^T, loaded transposed ([PRODUCT_M, PRODUCT_K]); rows past num_valid are stale.
                        staged_t = tl.load(
                            staging + (k + offs_pk)[None, :] * GROUP_V + offs_m[:, None],
                            mask=row_mask[None, :],
                            other=0.0,
                        )
                        hidden = tl.load(
                            student_hidden_ptr
                            + rows[:, None] * stride_student_hidden_n
                            + h[None, :] * stride_student_hidden_h,
                            mask=row_mask[:, None] & in_h[None, :],
                            other=0.0,
                        )
                        contribution = dot(staged_t, hidden, contribution, STUDENT_UPCAST, DOT_PRECISION)
                    # The program's own rows (the first update starts from zero).
                    if WEIGHT_SCRATCH:
                        tile_rows = (pid * GROUP_V + offs_m).to(tl.int64) * student_dim
                    else:
                        tile_rows = (vocab_group * GROUP_V + offs_m).to(tl.int64) * student_dim
                    acc_ptrs = grad_weight_acc_ptr + tile_rows[:, None] + h[None, :]
                    acc_mask = (vocab_group * GROUP_V + offs_m < vocab_size)[:, None] & in_h[None, :]
                    # Streamed (a program's rows come back one update later, long evicted): evict first.
                    acc = tl.load(
                        acc_ptrs, mask=acc_mask & (update > 0), other=0.0, eviction_policy="evict_first"
                    )
                    tl.store(
                        acc_ptrs,
                        acc + contribution * inv_grad_scale,
                        mask=acc_mask,
                        eviction_policy="evict_first",
                    )
            if GRAD_HIDDEN:
                for tile in range(0, SUB_BLOCKS * tl.cdiv(student_dim, PRODUCT_H)):
                    sub = tile % SUB_BLOCKS
                    h = (tile // SUB_BLOCKS) * PRODUCT_H + offs_ph
                    in_h = h < student_dim
                    token_block = first_block + sub
                    if token_block < num_token_blocks:
                        positions = token_block * BLOCK_N + offs_n
                        row_mask = positions < num_valid
                        rows = tl.load(token_index_ptr + positions, mask=row_mask, other=0).to(tl.int64)
                        partial = tl.zeros([BLOCK_N, PRODUCT_H], tl.float32)
                        for k in tl.range(0, GROUP_V, PRODUCT_K, num_stages=PRODUCT_STAGES):
                            # Stale rows (past num_valid) only reach their own output rows: masked below.
                            staged_g = tl.load(
                                staging + (sub * BLOCK_N + offs_n)[:, None] * GROUP_V + (k + offs_pk)[None, :]
                            )
                            weight = tl.load(
                                student_weight_ptr
                                + (vocab_group * GROUP_V + k + offs_pk).to(tl.int64)[:, None]
                                * stride_student_weight_v
                                + h[None, :] * stride_student_weight_h,
                                mask=(vocab_group * GROUP_V + k + offs_pk < vocab_size)[:, None]
                                & in_h[None, :],
                                other=0.0,
                            )
                            partial = dot(staged_g, weight, partial, STUDENT_UPCAST, DOT_PRECISION)
                        tl.atomic_add(
                            grad_hidden_ptr + rows[:, None] * student_dim + h[None, :],
                            partial * inv_grad_scale,
                            mask=row_mask[:, None] & in_h[None, :],
                            sem="relaxed",
                        )
            # The next update overwrites the staged tiles and reads these rows back: order them.
            tl.debug_barrier()

        if GRAD_WEIGHT and WEIGHT_SCRATCH:
            # Cast the finished float32 rows into the output (zeros when no token is valid); the barrier
            # after the copy orders it before the next vocabulary block overwrites the scratch.
            accumulated_dim = tl.where(num_token_blocks > 0, student_dim, 0)
            for start in range(0, student_dim, BLOCK_H):
                h = start + offs_h
                mask = group_mask[:, None] & (h < student_dim)[None, :]
                acc = tl.load(
                    grad_weight_acc_ptr + acc_rows[:, None] + h[None, :],
                    mask=group_mask[:, None] & (h < accumulated_dim)[None, :],
                    other=0.0,
                )
                tl.store(
                    grad_weight_ptr + group_cols_64[:, None] * student_dim + h[None, :],
                    acc.to(grad_weight_ptr.dtype.element_ty),
                    mask=mask,
                )
            tl.debug_barrier()


def launch_gradient(
    problem: _Problem,
    config: KernelConfig,
    stats: torch.Tensor,
    weight_distill: torch.Tensor,
    weight_ce: torch.Tensor | None,
    wanted: tuple[bool, bool, bool],
):
    """The gradient pass: (grad_student_hidden, grad_student_weight, grad_student_bias), None where not
    wanted. `weight_distill`, `weight_ce`: [N] float32 per-token weights of dD/ds and dC/ds (token order).
    """
    options, n, device = problem.options, problem.num_tokens, problem.device
    want_hidden, want_weight, want_bias = wanted
    # s = scale z (then capped): dloss/dz = scale dloss/ds, G being linear in the token weights; the
    # kernel applies the cap's derivative.
    weight_distill, weight_ce, _ = head_chain_rule(options.student_head, weight_distill, weight_ce)
    tile = config.gradient
    hidden, weight = problem.student_hidden, problem.student_weight
    vocab, student_dim = problem.vocab_size, hidden.shape[1]
    group_width = gradient_group_width(config, tile)
    programs = gradient_programs(vocab, group_width, problem.multiprocessors, INTERPRETER)
    f32 = dict(dtype=torch.float32, device=device)
    # float32 accumulators: the outputs themselves for float32 tensors.
    grad_hidden_acc = torch.zeros((n, student_dim), **f32) if want_hidden else None
    weight_scratch = want_weight and weight.dtype != torch.float32
    if not want_weight:
        grad_weight = grad_weight_acc = None
    elif weight_scratch:
        grad_weight = torch.empty((vocab, student_dim), dtype=weight.dtype, device=device)
        grad_weight_acc = torch.empty((programs * group_width, student_dim), **f32)
    else:
        grad_weight = grad_weight_acc = torch.zeros((vocab, student_dim), **f32)
    grad_bias = torch.zeros(vocab, **f32) if want_bias else None
    staged_dtype = staging_dtype(hidden.dtype, INTERPRETER)
    staging = torch.empty(
        (programs, config.gradient_sub_blocks * tile.block_n, group_width), dtype=staged_dtype, device=device
    )
    grad_scale = gradient_scale(options, weight_distill, weight_ce, staged_dtype)
    # Each program's parking place for its teacher logit tile (tl_utils.park_tile).
    park = torch.empty((programs, tile.block_n * tile.block_v), **f32)
    beta = options.beta if options.divergence == "jsd" else 0.5
    # The pointers of the weights and outputs that are not computed: never touched, any tensor will do.
    weight_ce_arg = stats if weight_ce is None else weight_ce
    outputs = [stats if x is None else x for x in (grad_hidden_acc, grad_weight_acc, grad_weight, grad_bias)]
    sizes = (n, vocab, student_dim, problem.teacher_hidden.shape[1])
    student, teacher, student_strides, teacher_strides = problem.tile_args()
    gradient_kernel[(programs,)](
        *student, *teacher, *problem.label_args(), problem.token_index, problem.num_valid, stats,
        weight_distill, weight_ce_arg, grad_scale, staging, park, *outputs, *sizes, *student_strides,
        *teacher_strides, inverse_temperature(options), beta, math.log(beta), math.log1p(-beta),
        DIVERGENCE=DIVERGENCE_CODES[options.divergence], HAS_CE_GRAD=weight_ce is not None,
        SEPARATE_CE=problem.separate_ce, GRAD_HIDDEN=want_hidden, GRAD_WEIGHT=want_weight,
        GRAD_BIAS=want_bias, WEIGHT_SCRATCH=weight_scratch, TOKEN_GROUPS=config.token_groups,
        SUB_BLOCKS=config.gradient_sub_blocks, VOCAB_SUB_BLOCKS=config.gradient_vocab_sub_blocks,
        PRODUCT_M=min(config.gradient_product_m, group_width), PRODUCT_H=config.gradient_product_h,
        PRODUCT_K=config.gradient_product_k, PRODUCT_STAGES=config.gradient_product_stages,
        EVEN_PRODUCT_DIM=student_dim % config.gradient_product_h == 0, **problem.tile_flags(tile),
    )  # fmt: skip
    grad_hidden = None if grad_hidden_acc is None else grad_hidden_acc.to(hidden.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(problem.student_bias.dtype)
    return grad_hidden, grad_weight, grad_bias
