"""Pass 1: the per-token statistics kernel (lm_head projections + online log-sum-exp + one-pass KL).

A task takes one block of BLOCK_N tokens and walks the vocabulary blocks of its split; for each (token
x vocab) tile it computes the teacher and the student logit tiles with `tl.dot` over the hidden
dimension (two hidden sizes) and folds them into per-token online states (docs/design.md §3), all merged
exactly across blocks:

    student:  m_s = max_v s_v,  Z_a = sum_v e^((s_v - m_s)/T),  Z_s = sum_v e^(s_v - m_s)  (CE, T != 1)
    teacher:  m_t = max_v t_v,  Z_b = sum_v e^((t_v - m_t)/T)
    KL(p||q): A = sum_v e^(b_v - m_b) ((b_v - m_b) - (a_v - m_a))      (a = s/T, b = t/T)
    KL(q||p): A = sum_v e^(a_v - m_a) ((a_v - m_a) - (b_v - b_*)),   b_* = b at the student's top token
    CE:       the label logit s_y

Only these O(N) numbers are written, one row per split ([splits, fields, N] float32); the merge kernel
combines the splits and finishes the per-token divergence and cross-entropy:

    KL(p || q) = A / Z_b - log Z_b + log Z_a        CE = (m_s - s_y) + log Z_s
    KL(q || p) = D_* + c,  D_* = A / Z_a,  c = (log q - log p)(v*) = log Z_b - log Z_a - (b_* - m_b)

The reverse KL is kept relative to the student's top token v*: its gradient q (log q - log p - D) / T
cancels almost exactly at v* when q is peaked, so the gradient pass forms it as
q ((a - m_a) - (b - b_*) - D_*) / T, where both terms vanish at v* exactly and D_* is small and exact.

Persistent programs (one per multiprocessor) take the tasks (token block, split) in order, the splits
of a token block on consecutive programs. Per tile the teacher's logits are computed and parked in
the program's own scratch (tl_utils.park_tile), then the student's, parked too, so that one float32
accumulator is in registers during a dot (256 x 128 tiles on 16 warps on a GPU); the parked tiles are
then folded into the states FOLD_V columns at a time (`fold_statistics`). Splitting the vocabulary
keeps the GPU busy when there are few token blocks; the split states are merged deterministically
(no atomics). Tokens are visited in "position" order: `token_index` lists the valid (not ignored)
tokens first, and the tasks of blocks past `num_valid` are never taken, so ignored tokens cost nothing
and no host sync is needed to know how many there are.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from fusedkd.kernels.config import KernelConfig, combine_partials, statistics_layout
from fusedkd.kernels.tl_utils import (
    DIVERGENCE_CODES,
    FORWARD_KL,
    JSD,
    NEG_FLT_MAX,
    REVERSE_KL,
    inverse_temperature,
    logits_tile,
    lse_shift,
    merge_lse,
    park_tile,
    shift_kl_accumulator,
    unpark_tile,
)

if TYPE_CHECKING:
    from fusedkd.kernels.fused_linear_kd import _Problem

MERGE_BLOCK = 256  # tokens per program of the (cheap, O(N)) merge kernels

# Fields of a split's partial state: partial[split, field, position].
PARTIAL_M_STUDENT: tl.constexpr = tl.constexpr(0)
PARTIAL_Z_STUDENT_T: tl.constexpr = tl.constexpr(1)
PARTIAL_Z_STUDENT_PLAIN: tl.constexpr = tl.constexpr(2)
PARTIAL_M_TEACHER: tl.constexpr = tl.constexpr(3)
PARTIAL_Z_TEACHER_T: tl.constexpr = tl.constexpr(4)
PARTIAL_KL_ACC: tl.constexpr = tl.constexpr(5)
PARTIAL_LABEL_LOGIT: tl.constexpr = tl.constexpr(6)
PARTIAL_TEACHER_AT_TOP: tl.constexpr = tl.constexpr(7)
NUM_PARTIAL_FIELDS: tl.constexpr = tl.constexpr(8)
# The partial state of no vocabulary entry (`empty_states`), field by field.
EMPTY_PARTIAL = (-math.inf, 0.0, 0.0, -math.inf, 0.0, 0.0, 0.0, 0.0)

# Fields of the merged statistics saved for the backward: stats[field, position].
STAT_M_STUDENT: tl.constexpr = tl.constexpr(0)  # max_v s_v
STAT_LOGZ_STUDENT_T: tl.constexpr = tl.constexpr(1)  # log sum_v e^((s_v - m_s)/T)
STAT_LOGZ_STUDENT_PLAIN: tl.constexpr = tl.constexpr(2)  # log sum_v e^(s_v - m_s)
STAT_M_TEACHER: tl.constexpr = tl.constexpr(3)  # max_v t_v
STAT_LOGZ_TEACHER_T: tl.constexpr = tl.constexpr(4)  # log sum_v e^((t_v - m_t)/T)
STAT_DIVERGENCE: tl.constexpr = tl.constexpr(5)  # D_* (reverse KL) or KL(q || m) (JSD)
STAT_TEACHER_AT_TOP: tl.constexpr = tl.constexpr(6)  # t at the student's top token (reverse KL)
NUM_STAT_FIELDS: tl.constexpr = tl.constexpr(7)


@triton.jit
def empty_states(BLOCK: tl.constexpr):
    """The eight per-token states (statistics_kernel's partial fields, in order) of no vocabulary entry."""
    zeros = tl.zeros([BLOCK], tl.float32)
    neg_inf = tl.full([BLOCK], float("-inf"), tl.float32)
    return neg_inf, zeros, zeros, neg_inf, zeros, zeros, zeros, zeros


@triton.jit
def merge_states(
    m_student,
    z_student_t,
    z_student_plain,
    m_teacher,
    z_teacher_t,
    kl_acc,
    label_logit,
    teacher_at_top,
    part_m_student,
    part_z_student_t,
    part_z_student_plain,
    part_m_teacher,
    part_z_teacher_t,
    part_kl,
    part_label_logit,
    part_teacher_at_top,
    inv_temperature,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    SEPARATE_CE: tl.constexpr,
):
    """The per-token states of two disjoint sets of vocabulary entries merged exactly (docs/design.md §3):
    a running state and a slice's (`fold_statistics`) or a split's (`merge_statistics_kernel`).
    Fields the options leave unused are passed through."""
    new_m_student = tl.maximum(m_student, part_m_student)
    new_m_teacher = tl.maximum(m_teacher, part_m_teacher)
    if DIVERGENCE == FORWARD_KL:
        kl_acc = shift_kl_accumulator(
            kl_acc, z_teacher_t, m_teacher, m_student, new_m_teacher, new_m_student, inv_temperature
        ) + shift_kl_accumulator(
            part_kl, part_z_teacher_t, part_m_teacher, part_m_student, new_m_teacher, new_m_student,
            inv_temperature,
        )  # fmt: skip
    elif DIVERGENCE == REVERSE_KL:
        # The teacher's logits relative to t at the student's top token (finite: fold_statistics).
        # Ties keep the earlier column, like argmax.
        new_teacher_at_top = tl.where(part_m_student > m_student, part_teacher_at_top, teacher_at_top)
        kl_acc = shift_kl_accumulator(
            kl_acc, z_student_t, m_student, teacher_at_top, new_m_student, new_teacher_at_top, inv_temperature
        ) + shift_kl_accumulator(
            part_kl, part_z_student_t, part_m_student, part_teacher_at_top, new_m_student, new_teacher_at_top,
            inv_temperature,
        )  # fmt: skip
        teacher_at_top = new_teacher_at_top
    if SEPARATE_CE:
        _, z_student_plain = merge_lse(m_student, z_student_plain, part_m_student, part_z_student_plain, 1.0)
    if HAS_LABELS:
        label_logit += part_label_logit
    _, z_student_t = merge_lse(m_student, z_student_t, part_m_student, part_z_student_t, inv_temperature)
    _, z_teacher_t = merge_lse(m_teacher, z_teacher_t, part_m_teacher, part_z_teacher_t, inv_temperature)
    return (
        new_m_student, z_student_t, z_student_plain, new_m_teacher, z_teacher_t, kl_acc, label_logit,
        teacher_at_top,
    )  # fmt: skip


@triton.jit
def fold_statistics(
    m_student,
    z_student_t,
    z_student_plain,
    m_teacher,
    z_teacher_t,
    kl_acc,
    label_logit,
    teacher_at_top,
    s,
    t,
    cols,
    col_mask,
    labels,
    inv_temperature,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    SEPARATE_CE: tl.constexpr,
    FOLD_V: tl.constexpr,
):
    """Fold one [BLOCK_N, FOLD_V] slice of logits (student s, teacher t; columns `cols`) into the
    per-token online states, merged exactly (docs/design.md §3). Returns the eight states."""
    neg_inf = float("-inf")
    offs_fold = tl.arange(0, FOLD_V)
    tile_label_logit = tl.zeros_like(m_student)
    if HAS_LABELS:
        # s_y: exactly one slice holds the label column.
        tile_label_logit = tl.sum(tl.where(cols[None, :] == labels[:, None], s, 0.0), axis=1)
    # The slice's own states, relative to its maxima: a = (s - max s)/T, b = (t - max t)/T. Padding
    # columns past vocab_size are -inf, like masked entries: e^a = e^b = 0 there. A row of -inf only
    # (an empty state) takes the maximum -FLT_MAX, not -inf, so that no -inf - (-inf) arises here or in
    # the merges (its Z is 0 all the same, and a NaN logit still makes Z NaN). The KL terms leave out
    # the entries of weight exactly 0 (no 0 * inf; a NaN weight, from a NaN or +inf logit, stays NaN).
    s = tl.where(col_mask[None, :], s, neg_inf)
    t = tl.where(col_mask[None, :], t, neg_inf)
    tile_m_student = tl.maximum(tl.max(s, axis=1), NEG_FLT_MAX)
    tile_m_teacher = tl.maximum(tl.max(t, axis=1), NEG_FLT_MAX)
    a = (s - tile_m_student[:, None]) * inv_temperature
    b = (t - tile_m_teacher[:, None]) * inv_temperature
    exp_a = tl.exp(a)
    exp_b = tl.exp(b)
    tile_z_student_t = tl.sum(exp_a, axis=1)
    tile_z_teacher_t = tl.sum(exp_b, axis=1)
    tile_teacher_at_top = tl.zeros_like(m_student)
    tile_kl = tl.zeros_like(m_student)
    if DIVERGENCE == FORWARD_KL:
        # A = sum_v e^(b_v) (b_v - a_v): weighted by the teacher.
        tile_kl = tl.sum(exp_b * tl.where(exp_b > 0, b - a, 0.0), axis=1)
    elif DIVERGENCE == REVERSE_KL:
        # A = sum_v e^(a_v) (a_v - (t_v - t_*)/T): weighted by the student, relative to its top token. A
        # teacher's -inf there (p = 0 where q is largest: D = +inf) is taken as 0, so that A is +inf, not
        # NaN; the saved t_* is that same value, which is all the merge and the gradient need.
        # NaN entries left out of the argmax (the row's sums are NaN anyway, so is its loss): on the GPU
        # tl.argmax skips them by its comparisons, Triton's interpreter raises on an all-NaN row.
        tile_top = tl.argmax(tl.where(s == s, s, neg_inf), axis=1)
        tile_teacher_at_top = lse_shift(
            tl.sum(tl.where(offs_fold[None, :] == tile_top[:, None], t, 0.0), axis=1)
        )
        tile_kl = tl.sum(
            exp_a * tl.where(exp_a > 0, a - (t - tile_teacher_at_top[:, None]) * inv_temperature, 0.0), axis=1
        )
    tile_z_student_plain = tl.zeros_like(m_student)
    if SEPARATE_CE:
        # Cross-entropy softmax at T = 1 (when T != 1): Z_s = sum_v e^(s_v - m_s).
        tile_z_student_plain = tl.sum(tl.exp(s - tile_m_student[:, None]), axis=1)
    return merge_states(
        m_student, z_student_t, z_student_plain, m_teacher, z_teacher_t, kl_acc, label_logit, teacher_at_top,
        tile_m_student, tile_z_student_t, tile_z_student_plain, tile_m_teacher, tile_z_teacher_t, tile_kl,
        tile_label_logit, tile_teacher_at_top, inv_temperature, DIVERGENCE, HAS_LABELS, SEPARATE_CE,
    )  # fmt: skip


# Token counts vary per batch: never specialized on, so a new batch size never recompiles.
@triton.jit(do_not_specialize=["num_tokens", "blocks_per_split", "num_splits"])
def statistics_kernel(
    student_hidden_ptr,
    student_weight_ptr,
    student_bias_ptr,
    teacher_hidden_ptr,
    teacher_weight_ptr,
    teacher_bias_ptr,
    labels_ptr,
    stride_labels,
    token_index_ptr,
    num_valid_ptr,
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
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    SEPARATE_CE: tl.constexpr,
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
    # Persistent programs (one per multiprocessor) take the tasks (token block, split) in order:
    # task = pid, pid + P, ... Consecutive tasks are the splits of one token block (grouped raster,
    # config.statistics_task), so the programs running together share a few hidden-state
    # tiles (L2-resident) and walk the splits' weight tiles in step (each read from HBM once per
    # wave, then from L2). Both logit tiles are parked in the program's own scratch.
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
        student_rows = rows * stride_student_hidden_n
        teacher_rows = rows * stride_teacher_hidden_n
        if HAS_LABELS:
            labels = tl.load(labels_ptr + rows * stride_labels, mask=row_mask, other=0)
        else:
            labels = rows  # never read

        (
            m_student, z_student_t, z_student_plain, m_teacher, z_teacher_t, kl_acc, label_logit,
            teacher_at_top,
        ) = empty_states(BLOCK_N)  # fmt: skip

        num_vocab_blocks = tl.cdiv(vocab_size, BLOCK_V)
        first_block = split * blocks_per_split
        last_block = tl.minimum(first_block + blocks_per_split, num_vocab_blocks)
        offs_v = tl.arange(0, BLOCK_V)
        offs_fold = tl.arange(0, FOLD_V)
        for vocab_block in range(first_block, last_block):
            cols = vocab_block * BLOCK_V + offs_v
            col_mask = cols < vocab_size
            # Both logit tiles are computed with one accumulator in registers at a time and parked
            # (tl_utils.park_tile); they are then folded into the states FOLD_V columns at a time.
            t = logits_tile(
                teacher_hidden_ptr, teacher_rows, row_mask, stride_teacher_hidden_h,
                teacher_weight_ptr, cols, col_mask, stride_teacher_weight_v, stride_teacher_weight_h,
                teacher_bias_ptr, stride_teacher_bias, teacher_dim, HAS_TEACHER_BIAS, EVEN_TEACHER_DIM,
                TEACHER_UPCAST,
                DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H,
                teacher_logit_scale, teacher_softcap, TEACHER_SOFTCAP,
            )  # fmt: skip
            park_tile(park_teacher, t, BLOCK_N, BLOCK_V)
            s = logits_tile(
                student_hidden_ptr, student_rows, row_mask, stride_student_hidden_h,
                student_weight_ptr, cols, col_mask, stride_student_weight_v, stride_student_weight_h,
                student_bias_ptr, stride_student_bias, student_dim, HAS_STUDENT_BIAS, EVEN_STUDENT_DIM,
                STUDENT_UPCAST,
                DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H,
                student_logit_scale, student_softcap, STUDENT_SOFTCAP,
            )  # fmt: skip
            park_tile(park_student, s, BLOCK_N, BLOCK_V)
            for fold in tl.static_range(0, BLOCK_V // FOLD_V):
                # A slice wholly past the vocabulary (in the last block) adds nothing.
                if vocab_block * BLOCK_V + fold * FOLD_V < vocab_size:
                    fold_cols = vocab_block * BLOCK_V + fold * FOLD_V + offs_fold
                    (
                        m_student, z_student_t, z_student_plain, m_teacher, z_teacher_t, kl_acc, label_logit,
                        teacher_at_top,
                    ) = fold_statistics(
                        m_student, z_student_t, z_student_plain, m_teacher, z_teacher_t, kl_acc, label_logit,
                        teacher_at_top,
                        unpark_tile(park_student, fold * FOLD_V, BLOCK_V, BLOCK_N, FOLD_V),
                        unpark_tile(park_teacher, fold * FOLD_V, BLOCK_V, BLOCK_N, FOLD_V),
                        fold_cols, fold_cols < vocab_size, labels, inv_temperature,
                        DIVERGENCE, HAS_LABELS, SEPARATE_CE, FOLD_V,
                    )  # fmt: skip

        out = partial_ptr + split.to(tl.int64) * NUM_PARTIAL_FIELDS * num_tokens + positions
        tl.store(out + PARTIAL_M_STUDENT * num_tokens, m_student, mask=row_mask)
        tl.store(out + PARTIAL_Z_STUDENT_T * num_tokens, z_student_t, mask=row_mask)
        tl.store(out + PARTIAL_Z_STUDENT_PLAIN * num_tokens, z_student_plain, mask=row_mask)
        tl.store(out + PARTIAL_M_TEACHER * num_tokens, m_teacher, mask=row_mask)
        tl.store(out + PARTIAL_Z_TEACHER_T * num_tokens, z_teacher_t, mask=row_mask)
        tl.store(out + PARTIAL_KL_ACC * num_tokens, kl_acc, mask=row_mask)
        tl.store(out + PARTIAL_LABEL_LOGIT * num_tokens, label_logit, mask=row_mask)
        tl.store(out + PARTIAL_TEACHER_AT_TOP * num_tokens, teacher_at_top, mask=row_mask)


# Token counts vary per batch: never specialized on, so a new batch size never recompiles.
@triton.jit(do_not_specialize=["num_tokens", "num_splits"])
def merge_statistics_kernel(
    partial_ptr,
    stats_ptr,
    token_index_ptr,
    num_valid_ptr,
    distill_ptr,
    ce_ptr,
    num_tokens,
    num_splits,
    inv_temperature,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    SEPARATE_CE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Merge the splits' states (in split order: deterministic), finish D (KL) and CE per token.

    Writes the statistics the backward needs ([fields, positions]) and the per-token divergence and
    cross-entropy at the tokens' original indices (ignored tokens keep their zeros).
    """
    positions = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    num_valid = tl.load(num_valid_ptr)
    mask = positions < num_valid
    (
        m_student, z_student_t, z_student_plain, m_teacher, z_teacher_t, kl_acc, label_logit,
        teacher_at_top,
    ) = empty_states(BLOCK)  # fmt: skip
    for split in range(0, num_splits):
        part = partial_ptr + split * NUM_PARTIAL_FIELDS * num_tokens + positions
        # Positions past num_valid load finite stand-ins (m = 0, Z = 1) and are never stored. Fields
        # the options leave unused are not read.
        rkl = DIVERGENCE == REVERSE_KL
        (
            m_student, z_student_t, z_student_plain, m_teacher, z_teacher_t, kl_acc, label_logit,
            teacher_at_top,
        ) = merge_states(
            m_student, z_student_t, z_student_plain, m_teacher, z_teacher_t, kl_acc, label_logit,
            teacher_at_top,
            tl.load(part + PARTIAL_M_STUDENT * num_tokens, mask=mask, other=0.0),
            tl.load(part + PARTIAL_Z_STUDENT_T * num_tokens, mask=mask, other=1.0),
            tl.load(part + PARTIAL_Z_STUDENT_PLAIN * num_tokens, mask=mask & SEPARATE_CE, other=1.0),
            tl.load(part + PARTIAL_M_TEACHER * num_tokens, mask=mask, other=0.0),
            tl.load(part + PARTIAL_Z_TEACHER_T * num_tokens, mask=mask, other=1.0),
            tl.load(part + PARTIAL_KL_ACC * num_tokens, mask=mask, other=0.0),
            tl.load(part + PARTIAL_LABEL_LOGIT * num_tokens, mask=mask & HAS_LABELS, other=0.0),
            tl.load(part + PARTIAL_TEACHER_AT_TOP * num_tokens, mask=mask & rkl, other=0.0),
            inv_temperature, DIVERGENCE, HAS_LABELS, SEPARATE_CE,
        )  # fmt: skip

    logz_student_t = tl.log(z_student_t)
    logz_teacher_t = tl.log(z_teacher_t)
    if SEPARATE_CE:
        logz_student_plain = tl.log(z_student_plain)
    else:
        logz_student_plain = logz_student_t
    divergence = tl.zeros([BLOCK], tl.float32)
    saved_divergence = divergence
    if DIVERGENCE == FORWARD_KL:
        # KL(p || q) = A / Z_b - log Z_b + log Z_a
        divergence = kl_acc / z_teacher_t - logz_teacher_t + logz_student_t
    elif DIVERGENCE == REVERSE_KL:
        # KL(q || p) = D_* + c,  D_* = A / Z_a,  c = log Z_b - log Z_a - (t_* - m_t) / T
        saved_divergence = kl_acc / z_student_t
        top_log_ratio = (logz_teacher_t - logz_student_t) - (teacher_at_top - m_teacher) * inv_temperature
        divergence = saved_divergence + top_log_ratio

    stats = stats_ptr + positions
    tl.store(stats + STAT_M_STUDENT * num_tokens, m_student, mask=mask)
    tl.store(stats + STAT_LOGZ_STUDENT_T * num_tokens, logz_student_t, mask=mask)
    tl.store(stats + STAT_LOGZ_STUDENT_PLAIN * num_tokens, logz_student_plain, mask=mask)
    tl.store(stats + STAT_M_TEACHER * num_tokens, m_teacher, mask=mask)
    tl.store(stats + STAT_LOGZ_TEACHER_T * num_tokens, logz_teacher_t, mask=mask)
    tl.store(stats + STAT_DIVERGENCE * num_tokens, saved_divergence, mask=mask)
    tl.store(stats + STAT_TEACHER_AT_TOP * num_tokens, teacher_at_top, mask=mask)

    rows = tl.load(token_index_ptr + positions, mask=mask, other=0)
    if DIVERGENCE != JSD:  # the JSD's divergence comes from its own pass (jsd.py)
        tl.store(distill_ptr + rows, divergence, mask=mask)
    if HAS_LABELS:
        # CE = LSE(s) - s_y = (m_s - s_y) + log Z_s
        tl.store(ce_ptr + rows, (m_student - label_logit) + logz_student_plain, mask=mask)


def launch_statistics(problem: _Problem, config: KernelConfig):
    """Pass 1 and its merge, for N > 0 tokens: (stats [fields, N], distill [N], ce [N]), float32, and
    the programs' parking scratch (which the JSD's pass 2 reuses)."""
    options, n, device = problem.options, problem.num_tokens, problem.device
    tile = config.statistics
    sms = problem.multiprocessors
    vocab = problem.vocab_size  # 0 on a rank of a vocabulary-parallel head whose block counts no row
    splits, blocks_per_split, programs = statistics_layout(n, vocab, config, sms) if vocab else (0, 0, 1)
    inv_temperature = inverse_temperature(options)
    sizes = (n, problem.vocab_size, problem.student_hidden.shape[1], problem.teacher_hidden.shape[1])
    student, teacher, student_strides, teacher_strides = problem.tile_args()
    flags = dict(
        DIVERGENCE=DIVERGENCE_CODES[options.divergence],
        HAS_LABELS=problem.labels is not None,
        SEPARATE_CE=problem.separate_ce,
    )
    f32 = dict(dtype=torch.float32, device=device)
    partial = torch.empty((splits, NUM_PARTIAL_FIELDS, n), **f32)
    # Each program's parking place for its two logit tiles (tl_utils.park_tile).
    park = torch.empty((programs, 2, tile.block_n * tile.block_v), **f32)
    if vocab:
        statistics_kernel[(programs,)](
            *student, *teacher, *problem.label_args(), problem.token_index, problem.num_valid, partial, park,
            *sizes, blocks_per_split, splits, *student_strides, *teacher_strides, inv_temperature,
            FOLD_V=tile.fold_v, **flags, **problem.tile_flags(tile),
        )  # fmt: skip
    if problem.shard is not None:  # every rank's splits, merged below like this rank's own
        partial = combine_partials(problem, config, partial, EMPTY_PARTIAL)
        splits = partial.shape[0]
    stats = torch.empty((NUM_STAT_FIELDS, n), **f32)
    distill, ce = torch.zeros(n, **f32), torch.zeros(n, **f32)
    merge_statistics_kernel[(triton.cdiv(n, MERGE_BLOCK),)](
        partial, stats, problem.token_index, problem.num_valid, distill, ce, n, splits, inv_temperature,
        BLOCK=MERGE_BLOCK, **flags,
    )  # fmt: skip
    return stats, distill, ce, park
