"""JSD's second pass: with the final log-sum-exps known, sum KL(p || m) and KL(q || m) per token.

log m_v = logaddexp(log beta + log p_v, log(1 - beta) + log q_v) needs the normalized log-probabilities,
so the JSD cannot come out of the one-pass statistics (docs/design.md §3): this kernel recomputes the logit
tiles on the statistics kernel's grid (token blocks x vocabulary splits) and writes per-split partial
sums; the merge kernel adds the splits in order (deterministic) and finishes

    D = beta KL(p || m) + (1 - beta) KL(q || m)

keeping KL(q || m) for the gradient (docs/design.md §4).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from fusedkd.kernels.config import KernelConfig, combine_partials, statistics_layout
from fusedkd.kernels.statistics import (
    MERGE_BLOCK,
    STAT_DIVERGENCE,
    STAT_LOGZ_STUDENT_T,
    STAT_LOGZ_TEACHER_T,
    STAT_M_STUDENT,
    STAT_M_TEACHER,
)
from fusedkd.kernels.tl_utils import inverse_temperature, logaddexp, logits_tile, park_tile, unpark_tile

if TYPE_CHECKING:
    from fusedkd.kernels.fused_linear_kd import _Problem

# Fields of a split's partial sums: partial[split, field, position].
PARTIAL_KL_TEACHER_MIX: tl.constexpr = tl.constexpr(0)  # sum_v p_v (log p_v - log m_v)
PARTIAL_KL_STUDENT_MIX: tl.constexpr = tl.constexpr(1)  # sum_v q_v (log q_v - log m_v)
NUM_JSD_FIELDS: tl.constexpr = tl.constexpr(2)


# Token counts vary per batch: never specialized on, so a new batch size never recompiles.
@triton.jit(do_not_specialize=["num_tokens", "blocks_per_split", "num_splits"])
def jsd_kernel(
    student_hidden_ptr,
    student_weight_ptr,
    student_bias_ptr,
    teacher_hidden_ptr,
    teacher_weight_ptr,
    teacher_bias_ptr,
    token_index_ptr,
    num_valid_ptr,
    stats_ptr,
    partial_ptr,
    park_ptr,
    num_tokens,
    vocab_size,
    student_dim,
    teacher_dim,
    blocks_per_split,
    num_splits,
    stride_student_hidden_n,
    stride_student_hidden_h,
    stride_student_weight_v,
    stride_student_weight_h,
    stride_student_bias,
    stride_teacher_hidden_n,
    stride_teacher_hidden_h,
    stride_teacher_weight_v,
    stride_teacher_weight_h,
    stride_teacher_bias,
    inv_temperature,
    log_beta,
    log_one_minus_beta,
    student_logit_scale,
    student_softcap,
    teacher_logit_scale,
    teacher_softcap,
    STUDENT_SOFTCAP: tl.constexpr,
    TEACHER_SOFTCAP: tl.constexpr,
    HAS_STUDENT_BIAS: tl.constexpr,
    HAS_TEACHER_BIAS: tl.constexpr,
    EVEN_STUDENT_DIM: tl.constexpr,
    EVEN_TEACHER_DIM: tl.constexpr,
    STUDENT_UPCAST: tl.constexpr,
    TEACHER_UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    FOLD_V: tl.constexpr,
):
    # The statistics kernel's persistent grid and task order (statistics.py), and its parking.
    pid = tl.program_id(0)
    num_valid = tl.load(num_valid_ptr).to(tl.int32)
    num_tasks = tl.cdiv(num_valid, BLOCK_N) * num_splits
    park_teacher = park_ptr + pid.to(tl.int64) * (2 * BLOCK_N * BLOCK_V)
    park_student = park_teacher + BLOCK_N * BLOCK_V
    for task in range(pid, num_tasks, tl.num_programs(0)):
        token_block = task // num_splits
        split = task % num_splits
        positions = token_block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = positions < num_valid
        rows = tl.load(token_index_ptr + positions, mask=row_mask, other=0).to(tl.int64)
        m_student = tl.load(stats_ptr + STAT_M_STUDENT * num_tokens + positions, mask=row_mask, other=0.0)
        logz_student = tl.load(
            stats_ptr + STAT_LOGZ_STUDENT_T * num_tokens + positions, mask=row_mask, other=0.0
        )
        m_teacher = tl.load(stats_ptr + STAT_M_TEACHER * num_tokens + positions, mask=row_mask, other=0.0)
        logz_teacher = tl.load(
            stats_ptr + STAT_LOGZ_TEACHER_T * num_tokens + positions, mask=row_mask, other=0.0
        )

        kl_teacher_mix = tl.zeros([BLOCK_N], tl.float32)
        kl_student_mix = tl.zeros([BLOCK_N], tl.float32)
        num_vocab_blocks = tl.cdiv(vocab_size, BLOCK_V)
        first_block = split * blocks_per_split
        last_block = tl.minimum(first_block + blocks_per_split, num_vocab_blocks)
        offs_v = tl.arange(0, BLOCK_V)
        offs_fold = tl.arange(0, FOLD_V)
        for vocab_block in range(first_block, last_block):
            cols = vocab_block * BLOCK_V + offs_v
            col_mask = cols < vocab_size
            # Both tiles parked, then folded FOLD_V columns at a time (statistics.py).
            t = logits_tile(
                teacher_hidden_ptr, rows * stride_teacher_hidden_n, row_mask, stride_teacher_hidden_h,
                teacher_weight_ptr, cols, col_mask, stride_teacher_weight_v, stride_teacher_weight_h,
                teacher_bias_ptr, stride_teacher_bias, teacher_dim, HAS_TEACHER_BIAS, EVEN_TEACHER_DIM,
                TEACHER_UPCAST,
                DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H,
                teacher_logit_scale, teacher_softcap, TEACHER_SOFTCAP,
            )  # fmt: skip
            park_tile(park_teacher, t, BLOCK_N, BLOCK_V)
            s = logits_tile(
                student_hidden_ptr, rows * stride_student_hidden_n, row_mask, stride_student_hidden_h,
                student_weight_ptr, cols, col_mask, stride_student_weight_v, stride_student_weight_h,
                student_bias_ptr, stride_student_bias, student_dim, HAS_STUDENT_BIAS, EVEN_STUDENT_DIM,
                STUDENT_UPCAST,
                DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H,
                student_logit_scale, student_softcap, STUDENT_SOFTCAP,
            )  # fmt: skip
            park_tile(park_student, s, BLOCK_N, BLOCK_V)
            for fold in tl.static_range(0, BLOCK_V // FOLD_V):
                cols = vocab_block * BLOCK_V + fold * FOLD_V + offs_fold
                col_mask = cols < vocab_size
                t = unpark_tile(park_teacher, fold * FOLD_V, BLOCK_V, BLOCK_N, FOLD_V)
                s = unpark_tile(park_student, fold * FOLD_V, BLOCK_V, BLOCK_N, FOLD_V)
                # Padding columns are -inf, like masked entries: probability 0, no term.
                s = tl.where(col_mask[None, :], s, float("-inf"))
                t = tl.where(col_mask[None, :], t, float("-inf"))
                # log q = (s - m_s)/T - log Z_a,  log p = (t - m_t)/T - log Z_b  (relative to the row maxima)
                log_q = (s - m_student[:, None]) * inv_temperature - logz_student[:, None]
                log_p = (t - m_teacher[:, None]) * inv_temperature - logz_teacher[:, None]
                # log m = logaddexp(log beta + log p, log(1 - beta) + log q)
                log_m = logaddexp(log_beta + log_p, log_one_minus_beta + log_q)
                # 0 log 0 = 0 where a probability is exactly 0 (no 0 * inf); a NaN one stays NaN.
                p = tl.exp(log_p)
                q = tl.exp(log_q)
                kl_teacher_mix += tl.sum(p * tl.where(p > 0, log_p - log_m, 0.0), axis=1)
                kl_student_mix += tl.sum(q * tl.where(q > 0, log_q - log_m, 0.0), axis=1)

        out = partial_ptr + split.to(tl.int64) * NUM_JSD_FIELDS * num_tokens + positions
        tl.store(out + PARTIAL_KL_TEACHER_MIX * num_tokens, kl_teacher_mix, mask=row_mask)
        tl.store(out + PARTIAL_KL_STUDENT_MIX * num_tokens, kl_student_mix, mask=row_mask)


# Token counts vary per batch: never specialized on, so a new batch size never recompiles.
@triton.jit(do_not_specialize=["num_tokens", "num_splits"])
def merge_jsd_kernel(
    partial_ptr,
    stats_ptr,
    token_index_ptr,
    num_valid_ptr,
    distill_ptr,
    num_tokens,
    num_splits,
    beta,
    BLOCK: tl.constexpr,
):
    """Sum the splits in order; D = beta KL(p || m) + (1 - beta) KL(q || m); keep KL(q || m)."""
    positions = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = positions < tl.load(num_valid_ptr)
    kl_teacher_mix = tl.zeros([BLOCK], tl.float32)
    kl_student_mix = tl.zeros([BLOCK], tl.float32)
    for split in range(0, num_splits):
        part = partial_ptr + split * NUM_JSD_FIELDS * num_tokens + positions
        kl_teacher_mix += tl.load(part + PARTIAL_KL_TEACHER_MIX * num_tokens, mask=mask, other=0.0)
        kl_student_mix += tl.load(part + PARTIAL_KL_STUDENT_MIX * num_tokens, mask=mask, other=0.0)
    divergence = beta * kl_teacher_mix + (1.0 - beta) * kl_student_mix
    tl.store(stats_ptr + STAT_DIVERGENCE * num_tokens + positions, kl_student_mix, mask=mask)
    rows = tl.load(token_index_ptr + positions, mask=mask, other=0)
    tl.store(distill_ptr + rows, divergence, mask=mask)


def launch_jsd(problem: _Problem, config: KernelConfig, stats, distill, park) -> None:
    """The JSD's pass 2 and its merge, for N > 0 tokens, after `statistics.launch_statistics` (whose
    `stats` it completes, whose parking scratch `park` it reuses): writes D into `distill` [N]."""
    n, beta, tile = problem.num_tokens, problem.options.beta, config.statistics
    sms = problem.multiprocessors
    vocab = problem.vocab_size  # 0 on a rank of a vocabulary-parallel head whose block counts no row
    splits, blocks_per_split, programs = statistics_layout(n, vocab, config, sms) if vocab else (0, 0, 1)
    sizes = (n, vocab, problem.student_hidden.shape[1], problem.teacher_hidden.shape[1])
    student, teacher, student_strides, teacher_strides = problem.tile_args()
    jsd_partial = torch.empty((splits, NUM_JSD_FIELDS, n), dtype=torch.float32, device=problem.device)
    if vocab:
        jsd_kernel[(programs,)](
            *student, *teacher, problem.token_index, problem.num_valid, stats, jsd_partial, park, *sizes,
            blocks_per_split, splits, *student_strides, *teacher_strides,
            inverse_temperature(problem.options), math.log(beta), math.log1p(-beta), FOLD_V=tile.fold_v,
            **problem.tile_flags(tile),
        )  # fmt: skip
    if problem.shard is not None:  # every rank's sums, added below like this rank's own splits
        jsd_partial = combine_partials(problem, config, jsd_partial, (0.0, 0.0))
        splits = jsd_partial.shape[0]
    merge_jsd_kernel[(triton.cdiv(n, MERGE_BLOCK),)](
        jsd_partial, stats, problem.token_index, problem.num_valid, distill, n, splits, beta,
        BLOCK=MERGE_BLOCK,
    )  # fmt: skip
