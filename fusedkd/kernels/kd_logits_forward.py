"""Statistics kernel of the logits-level KD loss: one program per token row, streaming the vocabulary.

With a = s / T and b = t / T, one pass of online log-sum-exp (docs/design.md §3) gives LSE(a), LSE(b), the
plain LSE(s) of the cross-entropy and the one-pass KL accumulator. JSD needs the final log-sum-exps
first, so it takes a second pass. When the gradient is wanted for an output gradient of 1 (reductions
"mean" and "sum"), the kernel goes on to the gradient pass of kd_logits_backward.py while the row is
still warm in cache. Nothing is written but a few numbers per row, and G when asked.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fusedkd.kernels.kd_logits_backward import (
    NUM_STATS,
    STAT_AUX,
    STAT_LOGZ_PLAIN,
    STAT_LOGZ_STUDENT,
    STAT_LOGZ_TEACHER,
    STAT_SHIFT_STUDENT,
    STAT_SHIFT_TEACHER,
    kd_logits_grad_row,
)
from fusedkd.kernels.tl_utils import (
    FORWARD_KL,
    REVERSE_KL,
    head_logits,
    logaddexp,
    running_max,
    token_of,
    zero_row,
)


@triton.jit
def kd_logits_forward_kernel(
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
    divergence_ptr,
    ce_ptr,
    grad_ptr,
    w_distill_ptr,
    w_ce_ptr,
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
    FUSE_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    STUDENT_SOFTCAP: tl.constexpr,
    TEACHER_SOFTCAP: tl.constexpr,
):
    """Per row: stats [N, NUM_STATS], D [N] and C [N]; with FUSE_GRAD also G, with one-element weights.

    Rows are addressed through int64 element offsets, so any leading-dimension strides work (a
    `logits[:, :-1]` view needs no copy). Labels are contiguous int64 (kd_logits.py makes them so).
    Program p takes token `token_index[p]`, which counts iff p < num_valid (`tl_utils.token_order`,
    the fused kernels' convention); ignored rows get zeros everywhere.
    """
    row, counts = token_of(token_index_ptr, num_valid_ptr)
    stats_row = stats_ptr + row * NUM_STATS
    grad_row = grad_ptr + row * grad_cols
    zero = tl.zeros([], ACC_DTYPE)
    inv_t = (tl.zeros([], tl.float64) + inv_temperature).to(ACC_DTYPE)  # 1/T, rounded once to ACC_DTYPE
    if not counts:
        for column in range(0, NUM_STATS):
            tl.store(stats_row + column, zero)
        tl.store(divergence_ptr + row, zero)
        tl.store(ce_ptr + row, zero)
        if FUSE_GRAD:
            zero_row(grad_row, grad_cols, BLOCK_V)
        return
    label = -1
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)

    student_row = student_ptr + tl.load(student_row_offsets_ptr + row)
    teacher_row = teacher_ptr + tl.load(teacher_row_offsets_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")

    # Pass 1: running maxima and shifts c_s, c_t of s and t; scaled sums Z_a = sum e^((s - c_s) / T),
    # Z_b = sum e^((t - c_t) / T), Z_s = sum e^(s - c_s); and the KL accumulator, taken relative to the
    # shifts (a - c_a = (s - c_s) / T) so that it never subtracts logits of magnitude 1e4:
    #   forward A = sum_v e^(b_v - c_b) ((b_v - c_b) - (a_v - c_a)),  KL(p || q) = A / Z_b - log Z_b + log Z_a
    #   reverse A = sum_v e^(a_v - c_a) ((a_v - c_a) - (b_v - c_b)),  KL(q || p) = A / Z_a - log Z_a + log Z_b
    # When the shifts move by (d_a, d_b), the old terms become e^(-d_b) (A - Z_b (d_b - d_a)) (forward).
    max_s, shift_s, sum_a, sum_s = tl.full([], neg_inf, ACC_DTYPE), zero, zero, zero
    max_t, shift_t, sum_b = tl.full([], neg_inf, ACC_DTYPE), zero, zero
    kl_acc = zero
    for start in range(0, vocab_size, BLOCK_V):
        v = (start + cols).to(tl.int64)
        in_vocab = v < vocab_size
        s = tl.load(student_row + v * student_stride_v, mask=in_vocab, other=neg_inf).to(ACC_DTYPE)
        t = tl.load(teacher_row + v * teacher_stride_v, mask=in_vocab, other=neg_inf).to(ACC_DTYPE)
        s = head_logits(s, in_vocab, student_logit_scale, student_softcap, STUDENT_SOFTCAP)
        t = head_logits(t, in_vocab, teacher_logit_scale, teacher_softcap, TEACHER_SOFTCAP)
        new_max_s, new_shift_s = running_max(max_s, s)
        new_max_t, new_shift_t = running_max(max_t, t)
        a_shifted = (s - new_shift_s) * inv_t
        b_shifted = (t - new_shift_t) * inv_t
        exp_a = tl.exp(a_shifted)
        exp_b = tl.exp(b_shifted)
        rescale_a = tl.exp((max_s - new_shift_s) * inv_t)  # 0 while max_s is -inf
        rescale_b = tl.exp((max_t - new_shift_t) * inv_t)
        drift = ((new_shift_t - shift_t) - (new_shift_s - shift_s)) * inv_t  # d_b - d_a
        # A weight of exactly 0 makes a term 0 even when its log-ratio is infinite (masked entries); a
        # NaN weight (a NaN or +inf logit) stays NaN.
        if DIVERGENCE == FORWARD_KL:
            kl_acc = rescale_b * (kl_acc - sum_b * drift)
            kl_acc += tl.sum(exp_b * tl.where(exp_b > 0, b_shifted - a_shifted, 0.0), 0)
        if DIVERGENCE == REVERSE_KL:
            kl_acc = rescale_a * (kl_acc + sum_a * drift)
            kl_acc += tl.sum(exp_a * tl.where(exp_a > 0, a_shifted - b_shifted, 0.0), 0)
        sum_a = sum_a * rescale_a + tl.sum(exp_a, 0)
        sum_b = sum_b * rescale_b + tl.sum(exp_b, 0)
        if HAS_LABELS:
            sum_s = sum_s * tl.exp(max_s - new_shift_s) + tl.sum(tl.exp(s - new_shift_s), 0)
        max_s, shift_s = new_max_s, new_shift_s
        max_t, shift_t = new_max_t, new_shift_t
    logz_a = tl.log(sum_a)
    logz_b = tl.log(sum_b)

    aux = zero
    if DIVERGENCE == FORWARD_KL:
        divergence = kl_acc / sum_b - logz_b + logz_a
    elif DIVERGENCE == REVERSE_KL:
        divergence = kl_acc / sum_a - logz_a + logz_b
        aux = divergence
    else:
        # Pass 2 (JSD): m = beta p + (1 - beta) q,  D = beta KL(p || m) + (1 - beta) KL(q || m),
        # log m = logaddexp(log beta + log p, log(1 - beta) + log q)
        beta_acc = tl.zeros([], ACC_DTYPE) + beta  # works for a float32 argument and a Python float
        log_beta = tl.log(beta_acc)
        log1m_beta = tl.log(1.0 - beta_acc)
        kl_teacher_mix = zero
        kl_student_mix = zero
        for start in range(0, vocab_size, BLOCK_V):
            v = (start + cols).to(tl.int64)
            in_vocab = v < vocab_size
            s = tl.load(student_row + v * student_stride_v, mask=in_vocab, other=neg_inf).to(ACC_DTYPE)
            t = tl.load(teacher_row + v * teacher_stride_v, mask=in_vocab, other=neg_inf).to(ACC_DTYPE)
            s = head_logits(s, in_vocab, student_logit_scale, student_softcap, STUDENT_SOFTCAP)
            t = head_logits(t, in_vocab, teacher_logit_scale, teacher_softcap, TEACHER_SOFTCAP)
            log_q = (s - shift_s) * inv_t - logz_a
            log_p = (t - shift_t) * inv_t - logz_b
            log_m = logaddexp(log_p + log_beta, log_q + log1m_beta)
            p = tl.exp(log_p)
            q = tl.exp(log_q)
            # 0 log 0 = 0 where a probability is exactly 0; a NaN one (a row that is not a
            # distribution) stays NaN.
            kl_teacher_mix += tl.sum(p * tl.where(p > 0, log_p - log_m, 0.0), 0)
            kl_student_mix += tl.sum(q * tl.where(q > 0, log_q - log_m, 0.0), 0)
        divergence = beta_acc * kl_teacher_mix + (1.0 - beta_acc) * kl_student_mix
        aux = kl_student_mix

    logz_s = zero
    ce = zero
    if HAS_LABELS:
        # C = LSE(s) - s_y = log Z_s - (s_y - c_s)
        logz_s = tl.log(sum_s)
        label_logit = tl.load(student_row + label * student_stride_v).to(ACC_DTYPE)
        label_logit = head_logits(label_logit, True, student_logit_scale, student_softcap, STUDENT_SOFTCAP)
        ce = logz_s - (label_logit - shift_s)

    tl.store(stats_row + STAT_SHIFT_STUDENT, shift_s)
    tl.store(stats_row + STAT_LOGZ_STUDENT, logz_a)
    tl.store(stats_row + STAT_SHIFT_TEACHER, shift_t)
    tl.store(stats_row + STAT_LOGZ_TEACHER, logz_b)
    tl.store(stats_row + STAT_LOGZ_PLAIN, logz_s)
    tl.store(stats_row + STAT_AUX, aux)
    tl.store(divergence_ptr + row, divergence)
    tl.store(ce_ptr + row, ce)

    if FUSE_GRAD:
        kd_logits_grad_row(
            student_row,
            student_stride_v,
            teacher_row,
            teacher_stride_v,
            grad_row,
            label,
            shift_s,
            logz_a,
            shift_t,
            logz_b,
            logz_s,
            aux,
            tl.load(w_distill_ptr).to(ACC_DTYPE),
            tl.load(w_ce_ptr).to(ACC_DTYPE),
            vocab_size,
            grad_cols,
            inv_t,
            beta,
            student_logit_scale,
            student_softcap,
            teacher_logit_scale,
            teacher_softcap,
            DIVERGENCE,
            HAS_LABELS,
            ACC_DTYPE,
            BLOCK_V,
            STUDENT_SOFTCAP,
            TEACHER_SOFTCAP,
        )
