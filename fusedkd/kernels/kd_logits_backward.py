"""Gradient kernel of the logits-level KD loss: G = dloss/dstudent_logits, one program per token row.

Given the per-row statistics of the forward kernel (kd_logits_forward.py), one more pass over the
vocabulary forms each block of G (docs/design.md §4) and writes it in the student-logits dtype. With
a = s / T, b = t / T, q = softmax(a), p = softmax(b):

    forward_kl : dD/ds_v = (q_v - p_v) / T
    reverse_kl : dD/ds_v = q_v (log q_v - log p_v - D) / T
    jsd(beta)  : dD/ds_v = (1 - beta) q_v (log q_v - log m_v - KL(q || m)) / T
    ce         : dC/ds_v = softmax(s)_v - [v == y]
    G_v        = w_distill dD/ds_v + w_ce dC/ds_v

The weights carry alpha T^2 (resp. 1 - alpha), the reduction scale and the output gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fusedkd.kernels.tl_utils import (
    FORWARD_KL,
    REVERSE_KL,
    head_logits,
    logaddexp,
    soft_cap_derivative,
    token_of,
    zero_row,
)

# Columns of the per-row statistics [N, NUM_STATS]. Each log-sum-exp is kept as a shift and a log-sum:
# c_s = max(s), c_t = max(t) and LSE(s / T) = c_s / T + log Z_a, LSE(t / T) = c_t / T + log Z_b,
# LSE(s) = c_s + log Z_s. Then log q = (s - c_s) / T - log Z_a is exact for the likely tokens even for
# logits of magnitude 1e4 (docs/design.md §6). AUX is D (reverse_kl) or KL(q || m) (jsd).
STAT_SHIFT_STUDENT = tl.constexpr(0)
STAT_LOGZ_STUDENT = tl.constexpr(1)
STAT_SHIFT_TEACHER = tl.constexpr(2)
STAT_LOGZ_TEACHER = tl.constexpr(3)
STAT_LOGZ_PLAIN = tl.constexpr(4)
STAT_AUX = tl.constexpr(5)
NUM_STATS = tl.constexpr(8)


@triton.jit
def kd_logits_grad_row(
    student_row,
    student_stride_v,
    teacher_row,
    teacher_stride_v,
    grad_row,
    label,
    shift_student,
    logz_student,
    shift_teacher,
    logz_teacher,
    logz_plain,
    aux,
    w_distill,
    w_ce,
    vocab_size,
    grad_cols,
    inv_temperature,
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
    """Write G for one row: `grad_cols` contiguous entries, zero past `vocab_size` (padded vocabulary).

    `inv_temperature` is 1/T in ACC_DTYPE (the kernels take it as a float64 argument, so a float64 row
    multiplies by 1/T rounded once, in float64); `beta` arrives as a float32 kernel argument, so a
    float64 row is exact to float64 rounding whenever beta is a float32 number.
    """
    cols = tl.arange(0, BLOCK_V)
    w_distill_over_t = w_distill * inv_temperature
    beta_acc = tl.zeros([], ACC_DTYPE) + beta  # works for a float32 argument and a Python float
    log_beta = tl.log(beta_acc)
    log1m_beta = tl.log(1.0 - beta_acc)
    for start in range(0, grad_cols, BLOCK_V):
        v = start + cols
        in_vocab = v < vocab_size
        v64 = v.to(tl.int64)
        s = tl.load(student_row + v64 * student_stride_v, mask=in_vocab, other=float("-inf")).to(ACC_DTYPE)
        t = tl.load(teacher_row + v64 * teacher_stride_v, mask=in_vocab, other=float("-inf")).to(ACC_DTYPE)
        if STUDENT_SOFTCAP:  # G is taken wrt the scaled logits x = scale s: times d cap(x) / dx below
            cap_derivative = soft_cap_derivative(s * student_logit_scale, student_softcap)
        s = head_logits(s, in_vocab, student_logit_scale, student_softcap, STUDENT_SOFTCAP)
        t = head_logits(t, in_vocab, teacher_logit_scale, teacher_softcap, TEACHER_SOFTCAP)
        log_q = (s - shift_student) * inv_temperature - logz_student
        log_p = (t - shift_teacher) * inv_temperature - logz_teacher
        q = tl.exp(log_q)
        if DIVERGENCE == FORWARD_KL:
            # dD/ds = (q - p) / T
            grad = q - tl.exp(log_p)
        elif DIVERGENCE == REVERSE_KL:
            # dD/ds = q (log q - log p - D) / T. Where q = 0 it is q D: 0, or NaN when D is not finite
            # (autograd's q (g - sum q g) there is 0 * inf), never q times an infinite log-ratio.
            grad = q * tl.where(q > 0, log_q - log_p - aux, aux)
        else:
            # dD/ds = (1 - beta) q (log q - log m - KL(q || m)) / T, and q KL(q || m) where q = 0 (as
            # the reverse KL's), with
            # log m = logaddexp(log beta + log p, log(1 - beta) + log q)
            log_m = logaddexp(log_p + log_beta, log_q + log1m_beta)
            grad = (1.0 - beta_acc) * (q * tl.where(q > 0, log_q - log_m - aux, aux))
        grad = grad * w_distill_over_t
        if HAS_LABELS:
            # dC/ds = softmax(s) - onehot(y)
            plain_probs = tl.exp((s - shift_student) - logz_plain)
            grad += w_ce * (plain_probs - tl.where(v == label, 1.0, 0.0))
        if STUDENT_SOFTCAP:
            grad = grad * cap_derivative
        tl.store(grad_row + v, grad.to(grad_row.dtype.element_ty), mask=v < grad_cols)


@triton.jit
def kd_logits_backward_kernel(
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
    grad_ptr,
    w_distill_ptr,
    w_ce_ptr,
    w_stride,
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
    """One program per token row: G from the saved statistics, with per-row weights (w_stride 0 or 1).

    `grad_ptr` is a contiguous [N, grad_cols] tensor; ignored rows get zeros. Tokens by
    `tl_utils.token_order`, as the forward kernel.
    """
    row, counts = token_of(token_index_ptr, num_valid_ptr)
    grad_row = grad_ptr + row * grad_cols
    if not counts:
        zero_row(grad_row, grad_cols, BLOCK_V)
        return
    label = -1
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
    stats_row = stats_ptr + row * NUM_STATS
    kd_logits_grad_row(
        student_ptr + tl.load(student_row_offsets_ptr + row),
        student_stride_v,
        teacher_ptr + tl.load(teacher_row_offsets_ptr + row),
        teacher_stride_v,
        grad_row,
        label,
        tl.load(stats_row + STAT_SHIFT_STUDENT),
        tl.load(stats_row + STAT_LOGZ_STUDENT),
        tl.load(stats_row + STAT_SHIFT_TEACHER),
        tl.load(stats_row + STAT_LOGZ_TEACHER),
        tl.load(stats_row + STAT_LOGZ_PLAIN),
        tl.load(stats_row + STAT_AUX),
        tl.load(w_distill_ptr + row * w_stride).to(ACC_DTYPE),
        tl.load(w_ce_ptr + row * w_stride).to(ACC_DTYPE),
        vocab_size,
        grad_cols,
        (tl.zeros([], tl.float64) + inv_temperature).to(ACC_DTYPE),  # 1/T, rounded once to ACC_DTYPE
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
