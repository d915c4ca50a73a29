"""`kd_loss` on the Triton backend for logits sharded by vocabulary over ranks (docs/design.md §10).

Each rank holds a block of every row's vocabulary. The row kernels of kd_logits.py run on the block:

1. `kd_logits_forward_kernel` (no G) gives each row's block statistics: shifts (maxima) and log-sums of
   exponentials. They are gathered from every rank (6 numbers per row, with the label's logit from the
   rank that owns it) and merged in rank order into the global ones (as `torch_backend.vocab_parallel`
   merges them);
2. `kd_logits_sums_kernel` sums the divergence's terms over the block with the global statistics
   (p (log p - log q), q (log q - log p), or the JSD's two KL terms against the mixture); gathered and
   summed in rank order (2 numbers per row): the row's divergence, equal on every rank;
3. `kd_logits_backward_kernel` forms G of the block from the global statistics (in the forward for
   reductions "mean" and "sum", as kd_logits.py does; in the backward otherwise).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from fusedkd._autograd import (
    EagerGradients,
    gradient_weights,
    input_grads,
    no_output_grad,
    once_differentiable,
    reduce,
    reduction_scale,
    unit_gradient_weights,
)
from fusedkd._options import KDOptions, apply_head, head_chain_rule
from fusedkd._shard import VocabShard
from fusedkd.kernels import launch_device
from fusedkd.kernels.kd_logits import _acc_dtype, _launch_args
from fusedkd.kernels.kd_logits_backward import (
    NUM_STATS,
    STAT_AUX,
    STAT_LOGZ_PLAIN,
    STAT_LOGZ_STUDENT,
    STAT_LOGZ_TEACHER,
    STAT_SHIFT_STUDENT,
    STAT_SHIFT_TEACHER,
    kd_logits_backward_kernel,
)
from fusedkd.kernels.kd_logits_forward import kd_logits_forward_kernel
from fusedkd.kernels.tl_utils import FORWARD_KL, REVERSE_KL, head_logits, label_order, logaddexp, token_of
from fusedkd.torch_backend.vocab_parallel import combine_maxima

# The statistics' columns as Python ints, for indexing them from torch.
SHIFT_STUDENT, LOGZ_STUDENT, LOGZ_PLAIN = (
    int(c.value) for c in (STAT_SHIFT_STUDENT, STAT_LOGZ_STUDENT, STAT_LOGZ_PLAIN)
)
SHIFT_TEACHER, LOGZ_TEACHER, AUX = (int(c.value) for c in (STAT_SHIFT_TEACHER, STAT_LOGZ_TEACHER, STAT_AUX))


@triton.jit
def kd_logits_sums_kernel(
    student_ptr,
    student_row_offsets_ptr,
    student_stride_v,
    teacher_ptr,
    teacher_row_offsets_ptr,
    teacher_stride_v,
    labels_ptr,
    token_index_ptr,
    num_valid_ptr,
    stats_ptr,
    sums_ptr,
    vocab_size,
    grad_cols,
    inv_temperature: tl.float64,
    beta,
    student_logit_scale,
    student_softcap,
    teacher_logit_scale,
    teacher_softcap,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    STUDENT_SOFTCAP: tl.constexpr,
    TEACHER_SOFTCAP: tl.constexpr,
):
    """One program per row: the sums over this block's columns of the divergence's terms, with the
    global statistics `stats_ptr` ([N, NUM_STATS]): sums[row] = (sum p (log p - log q), 0) (forward KL),
    (sum q (log q - log p), 0) (reverse KL) or (sum p (log p - log m), sum q (log q - log m)) (JSD).
    Ignored rows get zeros. (`grad_cols` is part of the shared argument list and not used.)"""
    row, counts = token_of(token_index_ptr, num_valid_ptr)
    out = sums_ptr + row * 2
    zero = tl.zeros([], ACC_DTYPE)
    if not counts:
        tl.store(out, zero)
        tl.store(out + 1, zero)
        return
    inv_t = (tl.zeros([], tl.float64) + inv_temperature).to(ACC_DTYPE)
    stats_row = stats_ptr + row * NUM_STATS
    shift_s = tl.load(stats_row + STAT_SHIFT_STUDENT)
    logz_a = tl.load(stats_row + STAT_LOGZ_STUDENT)
    shift_t = tl.load(stats_row + STAT_SHIFT_TEACHER)
    logz_b = tl.load(stats_row + STAT_LOGZ_TEACHER)
    beta_acc = zero + beta
    log_beta = tl.log(beta_acc)
    log1m_beta = tl.log(1.0 - beta_acc)
    student_row = student_ptr + tl.load(student_row_offsets_ptr + row)
    teacher_row = teacher_ptr + tl.load(teacher_row_offsets_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    first, second = zero, zero
    for start in range(0, vocab_size, BLOCK_V):
        v = (start + cols).to(tl.int64)
        in_vocab = v < vocab_size
        s = tl.load(student_row + v * student_stride_v, mask=in_vocab, other=float("-inf")).to(ACC_DTYPE)
        t = tl.load(teacher_row + v * teacher_stride_v, mask=in_vocab, other=float("-inf")).to(ACC_DTYPE)
        s = head_logits(s, in_vocab, student_logit_scale, student_softcap, STUDENT_SOFTCAP)
        t = head_logits(t, in_vocab, teacher_logit_scale, teacher_softcap, TEACHER_SOFTCAP)
        log_q = (s - shift_s) * inv_t - logz_a
        log_p = (t - shift_t) * inv_t - logz_b
        # 0 log 0 = 0 where a probability is exactly 0; a NaN one stays NaN (docs/design.md §9).
        if DIVERGENCE == FORWARD_KL:
            p = tl.exp(log_p)
            first += tl.sum(p * tl.where(p > 0, log_p - log_q, 0.0), 0)
        elif DIVERGENCE == REVERSE_KL:
            q = tl.exp(log_q)
            first += tl.sum(q * tl.where(q > 0, log_q - log_p, 0.0), 0)
        else:
            log_m = logaddexp(log_p + log_beta, log_q + log1m_beta)
            p = tl.exp(log_p)
            q = tl.exp(log_q)
            first += tl.sum(p * tl.where(p > 0, log_p - log_m, 0.0), 0)
            second += tl.sum(q * tl.where(q > 0, log_q - log_m, 0.0), 0)
    tl.store(out, first)
    tl.store(out + 1, second)


def _block_options(options: KDOptions, shard: VocabShard) -> KDOptions:
    """`options` for the row kernels on this rank's block: its counted columns as the vocabulary."""
    return dataclasses.replace(options, vocab_size=shard.rows)


def _label_logits(student_logits, labels, options: KDOptions, shard: VocabShard, dtype) -> torch.Tensor:
    """[N]: the label's logit (head transform applied) on the rank that owns it, 0 elsewhere."""
    owned = shard.owned(labels)
    index = (labels - shard.offset).clamp(0, shard.rows - 1)
    # One entry per row, by multi-index: views such as logits[:, :-1] are read in place, not copied.
    if student_logits.dim() == 1:  # one row
        z = student_logits[index]
    else:
        leading = student_logits.shape[:-1]
        rows = torch.unravel_index(torch.arange(labels.numel(), device=labels.device), leading)
        z = student_logits[(*rows, index)]
    z = apply_head(z.to(dtype), options.student_logit_scale, options.student_softcap)
    return torch.where(owned, z, 0.0)


def _global_statistics(student_logits, teacher_logits, labels, options: KDOptions, shard: VocabShard, order):
    """(stats [N, NUM_STATS] with the global shifts and log-sums, label logits [N] or None, student bad
    [N], teacher bad [N]): passes 1 and its gather."""
    n = math.prod(student_logits.shape[:-1])
    dtype = _acc_dtype(student_logits.dtype)[0]
    device = student_logits.device
    local = torch.zeros(6, n, dtype=dtype, device=device)
    local[1], local[2], local[4] = -math.inf, -math.inf, -math.inf  # no column: empty log-sums
    if shard.rows and n:
        block = _block_options(options, shard)
        # The forward kernel reads the label's logit: a label another rank owns is clamped into the block
        # (its value is not used; the label's logit comes from `_label_logits`).
        kernel_labels = None
        if labels is not None:
            kernel_labels = torch.where(
                labels == options.ignore_index, labels, (labels - shard.offset).clamp(0, shard.rows - 1)
            )
        leading, scalars, flags = _launch_args(student_logits, teacher_logits, kernel_labels, block, order)
        stats = torch.empty(n, NUM_STATS, dtype=dtype, device=device)
        scratch = torch.empty(n, dtype=dtype, device=device)
        with launch_device(student_logits):
            kd_logits_forward_kernel[(n,)](
                *leading,
                stats,
                scratch,
                scratch,
                scratch,
                scratch,
                scratch,
                *scalars,
                FUSE_GRAD=False,
                **flags,
            )
        # A block whose entries are all -inf has shift 0 and log-sum -inf: its maximum is -inf.
        local[0] = torch.where(stats[:, LOGZ_STUDENT] == -math.inf, -math.inf, stats[:, SHIFT_STUDENT])
        local[1] = stats[:, LOGZ_STUDENT]
        local[2] = stats[:, LOGZ_PLAIN] if labels is not None else local[1]
        local[3] = torch.where(stats[:, LOGZ_TEACHER] == -math.inf, -math.inf, stats[:, SHIFT_TEACHER])
        local[4] = stats[:, LOGZ_TEACHER]
        if labels is not None:
            local[5] = _label_logits(student_logits, labels, options, shard, dtype)
    gathered = shard.gather(local)
    inv_t = 1.0 / options.temperature
    m_s, logz_a, student_bad = combine_maxima(gathered[:, 0], gathered[:, 1], inv_t)
    _, logz_plain, _ = combine_maxima(gathered[:, 0], gathered[:, 2], 1.0)
    m_t, logz_b, teacher_bad = combine_maxima(gathered[:, 3], gathered[:, 4], inv_t)
    stats = torch.zeros(n, NUM_STATS, dtype=dtype, device=device)
    # Rows that are not distributions get NaN statistics: every value and G entry of theirs is NaN (§9).
    stats[:, SHIFT_STUDENT] = m_s.masked_fill(student_bad, math.nan)
    stats[:, LOGZ_STUDENT] = logz_a
    stats[:, LOGZ_PLAIN] = logz_plain
    stats[:, SHIFT_TEACHER] = m_t.masked_fill(teacher_bad, math.nan)
    stats[:, LOGZ_TEACHER] = logz_b
    label_logit = None if labels is None else gathered[:, 5].sum(dim=0)
    return stats, label_logit


def _divergence(student_logits, teacher_logits, labels, options: KDOptions, shard: VocabShard, stats, order):
    """Pass 2 and its gather: the per-row divergence [N] (equal on every rank); completes `stats`' AUX."""
    n = stats.shape[0]
    sums = torch.zeros(n, 2, dtype=stats.dtype, device=stats.device)
    if shard.rows and n:
        leading, scalars, flags = _launch_args(
            student_logits, teacher_logits, labels, _block_options(options, shard), order
        )
        with launch_device(student_logits):
            kd_logits_sums_kernel[(n,)](*leading, stats, sums, *scalars, **flags)
    totals = shard.gather(sums).sum(dim=0)
    if options.divergence == "jsd":
        stats[:, AUX] = totals[:, 1]
        return options.beta * totals[:, 0] + (1.0 - options.beta) * totals[:, 1]
    stats[:, AUX] = totals[:, 0]  # D, which the reverse KL's gradient needs
    return totals[:, 0]


def _gradient(
    student_logits, teacher_logits, labels, options, shard, stats, order, w_distill, w_ce, w_stride
):
    """Pass 3: G of this rank's block, in the student logits' dtype and shape."""
    grad = torch.zeros(student_logits.shape, dtype=student_logits.dtype, device=student_logits.device)
    n = stats.shape[0]
    if shard.rows and n:
        w_distill, w_ce, _ = head_chain_rule(options.student_head, w_distill, w_ce)  # the cap: in the kernel
        if w_ce is None:
            w_ce = torch.zeros_like(w_distill)
        leading, scalars, flags = _launch_args(
            student_logits, teacher_logits, labels, _block_options(options, shard), order
        )
        with launch_device(student_logits):
            kd_logits_backward_kernel[(n,)](
                *leading, stats, grad, w_distill, w_ce, w_stride, *scalars, **flags
            )
    return grad


class ShardedKDLogitsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, options: KDOptions, shard: VocabShard):
        n = math.prod(student_logits.shape[:-1])
        device = student_logits.device
        # The tokens that count, in the kernels' order: once for every launch, forward and backward.
        order = label_order(labels, options.ignore_index, n, device)
        stats, label_logit = _global_statistics(student_logits, teacher_logits, labels, options, shard, order)
        # The backward kernel forms the one-hot by comparing columns with the label: a label another rank
        # owns becomes an index no column matches.
        block_labels = shard.local_labels(labels, options.ignore_index)
        divergence = _divergence(student_logits, teacher_logits, block_labels, options, shard, stats, order)
        valid = (
            torch.ones(n, dtype=torch.bool, device=device)
            if labels is None
            else labels != options.ignore_index
        )
        if labels is None:
            ce = torch.zeros_like(divergence)
        else:  # C = log Z_plain + M_s - s_y
            ce = stats[:, LOGZ_PLAIN] + stats[:, SHIFT_STUDENT] - label_logit
        divergence = torch.where(valid, divergence, 0.0)
        ce = torch.where(valid, ce, 0.0)
        scale = reduction_scale(valid.sum(), options.reduction, stats.dtype)
        grad = None
        if ctx.needs_input_grad[0] and options.reduction != "none":
            weights = unit_gradient_weights(options, scale, num_tokens=1, dtype=stats.dtype)
            grad = _gradient(
                student_logits, teacher_logits, block_labels, options, shard, stats, order, *weights, 0
            )
        loss = options.distill_weight * divergence + options.ce_weight * ce
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(student_logits, teacher_logits, block_labels, stats, scale, *order)
        ctx.options, ctx.shard = options, shard
        ctx.eager = EagerGradients(None if grad is None else [grad])
        return tuple(reduce(x, options.reduction, scale) for x in (loss, divergence, ce))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_divergence, grad_ce):
        student_logits, teacher_logits, labels, stats, scale, *order = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or no_output_grad(grad_loss, grad_divergence, grad_ce):
            return input_grads(ctx.needs_input_grad, {})
        eager = ctx.eager.take(grad_loss, grad_divergence, grad_ce)
        if eager is not None:
            return input_grads(ctx.needs_input_grad, {0: eager[0]})
        weights = gradient_weights(
            ctx.options,
            scale,
            grad_loss,
            grad_divergence,
            grad_ce,
            num_tokens=stats.shape[0],
            dtype=stats.dtype,
        )
        grad = _gradient(
            student_logits, teacher_logits, labels, ctx.options, ctx.shard, stats, order, *weights, 1
        )
        return input_grads(ctx.needs_input_grad, {0: grad})


def sharded_kd_logits(student_logits, teacher_logits, labels, options: KDOptions, shard: VocabShard):
    """Backend entry point of vocabulary-parallel `kd_loss` on Triton: this rank's blocks of the logits
    ([..., V/P], any strides), global int64 [N] labels or None -> (loss, distill, ce), equal on every rank,
    reduced per `options`; the gradient is the student block's, in its dtype."""
    teacher_logits = teacher_logits.detach()
    if torch.is_grad_enabled() and student_logits.requires_grad:
        return ShardedKDLogitsFunction.apply(student_logits, teacher_logits, labels, options, shard)
    with torch.no_grad():
        return ShardedKDLogitsFunction.apply(student_logits.detach(), teacher_logits, labels, options, shard)
