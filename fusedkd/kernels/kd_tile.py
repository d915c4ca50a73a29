"""One Triton kernel for a chunk's two logit tiles: per-token divergence, cross-entropy and G.

The GPU tile path of the fused linear loss (`torch_backend.fused_linear_kd.stream`) computes each
chunk's student and teacher logits once, on cuBLAS, into float32 `c x V` tiles; `kd_tile_terms_triton`
replaces `tiles.kd_tile_terms` (~15 element-wise torch kernels) by one launch that reads both tiles and
writes D [c], C [c] and G = dloss/dz [c, V] for the cuBLAS products dh = G W_s and dW_s += G^T h_s.
Same arguments, results (to rounding) and non-finite rule (docs/design.md §9).

Grid and passes. One program per row (grid `(c,)`), walking its vocabulary in BLOCK_V columns:

    pass 1  reads s, t         running maxima, Z_a, Z_b (Z_s), the one-pass KL accumulator A (§3),
                               the student's top column (JSD) -> D (forward / reverse KL) and C
                               (right to left; JSD: left to right, ties keep the first column)
    pass 2  reads s, t         JSD only, right to left: KL(p || m), KL(q || m) (the final LSEs, §3)
    pass 3  reads s, t, writes G   left to right, only when `grad_weights` is given (§4)

plus one scalar load per row of the label's logit (labels) and of s, t at the top column (JSD); a row
that does not count reads nothing and writes its zero G row. So a float32 tile element is read 2
times (KL) or 3 times (JSD) and G written once: 20 bytes per (token, vocabulary entry) for the KL with
a float32 G (18 with a 16-bit G), 8 without a gradient, 28 (26) for the JSD, 16 without. Successive
passes walk the row in opposite directions, each starting on the blocks the previous one read last.

G in the student tile's own bytes. A 16-bit G may be written into the storage of `s` itself
(`grad_out = s.view(torch.bfloat16)[:, :V]`: row r of G is the first half of row r's bytes, row
stride 2V), so that a chunk costs its two float32 tiles and nothing more. Pass 3 walks left to right:
block j of G lands on the float32 columns of blocks j/2 to (j + 1)/2, which the program read in that
pass's iterations j/2 to j; but a thread stores over other threads' columns, so each store waits at a
CTA barrier until every thread has made the loads of its iteration (`G_IN_S`).

The math, per row (docs/design.md §2-§4). The tiles hold `folded * z` (z = W h + b, `tiles.gemm_scales`);
each head is finished as `tiles.finish_head` does:

    s = (lambda_s / f_s) x_s                 or  s = c_s tanh((lambda_s / c_s / f_s) x_s)
    t = (lambda_t / T_h / f_t) x_t           or  t = (c_t / T_h) tanh((lambda_t / c_t / f_t) x_t)

with T_h = T when `teacher_tempered` (the teacher's tile already holds z_t lambda_t / T), else 1. With
m_s, m_t the row maxima, a = (s - m_s) / T, b = (t - m_t) / T' (T' = 1 when tempered, else T):

    Z_a = sum e^a,  Z_b = sum e^b,  Z_s = sum e^(s - m_s)  (T = 1 softmax of the CE; Z_a when T = 1)
    forward_kl  A = sum e^b (b - a)           D = A / Z_b - log Z_b + log Z_a
    reverse_kl  A = sum e^a (a - b) = K Z_a   D = K - log Z_a + log Z_b
    jsd(beta)   m = beta p + (1 - beta) q,  d = log p - log q,
                L_q = log m - log q = logaddexp(log beta + d, log(1 - beta)),  L_p = L_q - d
                D = beta KL(p || m) + (1 - beta) KL(q || m) = -beta sum p L_p - (1 - beta) sum q L_q
    ce          C = log Z_s - (s_y - m_s)

The maxima and sums are online (docs/design.md §3, `tl_utils.running_max`): relative to a running shift,
rescaled when it moves; A moves with the shifts as e^(-d_w) (A -/+ Z_w (d_b - d_a)). Gradients (§4),
with the weights w_D, w_C times lambda_s (G is linear in them) and, for a soft-capped student, times
d head / d(lambda z) = 1 / cosh^2 of tanh's argument (the head's chain rule: `_options.head_chain_rule`
in the launcher, `tl_utils.soft_cap_derivative` here):

    forward_kl  dD/ds = (q - p) / T
    reverse_kl  dD/ds = q ((a - b) - K) / T
    jsd         dD/ds = (1 - beta) q (log q - log m - KL(q || m)) / T = (1 - beta) q (K' - (L_q - L_q*)) / T
                with K' = sum q (L_q - L_q*) = -KL(q || m) - L_q*, L_q* at the student's top token
                (exactly 0 there: no cancellation for a peaked q, as the fused reverse KL, §3)
    ce          dC/ds = softmax(s) - onehot(y)

Non-finite rows (§9), as `tiles.subtract_row_max` / `fill_gradient_rows`: a row that does not count
(`valid` False) is never read: 0, 0 and a zero G row. A counted row whose transformed student logits
hold a NaN or +inf, or are all -inf, gets D = C = NaN and a NaN G row; one whose teacher's do gets
D = NaN and a NaN G row, C as computed. The test: a row is a distribution iff its sum of exponentials
relative to its maximum is >= 1/2 (>= 1 for one: the maximum's own term is e^0); a NaN entry makes the
sum NaN (whether or not `tl.max` drops it, as it does on the GPU and under the interpreter), +inf
makes it NaN (inf - inf), a row of -inf 0. The running maximum is merged with `tl.maximum(...,
propagate_nan=ALL)`, so a NaN that reaches it stays. -inf entries are exact zero probabilities: a term
of weight 0 is 0 (`tl.where(weight > 0, ...)`), as in `tiles`.

Specialization: T, beta, the scales and the caps are runtime float32 arguments, the constexprs the
structural flags; the chunk's row count is the grid, so a new chunk size never recompiles. V and the
row strides keep Triton's divisibility-by-16 specialization on purpose (vectorized masked row loads;
both fixed by the model: at most two variants per run).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fusedkd._options import KDOptions, head_chain_rule, head_factors
from fusedkd.kernels import INTERPRETER, launch_device
from fusedkd.kernels.tl_utils import (
    DIVERGENCE_CODES,
    FORWARD_KL,
    JSD,
    REVERSE_KL,
    accurate_tanh,
    check_grad_storage,
    soft_cap_derivative,
    store_gradient,
    token_of,
    token_order,
)

# Vocabulary columns per step, and warps, as `kd_logits` (up to 2048 on 8 warps); not yet timed on a GPU.
MAX_BLOCK_V = 2048
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _head_and_derivative(x, in_vocab, mult, cap_mult, HAS_SOFTCAP: tl.constexpr):
    """A tile block through its model's head transform: `mult` x, or `cap_mult` tanh(`mult` x) for a
    soft-capped head (entries past the vocabulary, loaded as -inf, stay -inf; an in-vocabulary -inf
    becomes -cap, as the capped head computes it), and the cap's derivative 1 / cosh^2 of tanh's
    argument (the block itself, unused, without a cap)."""
    u = x * mult
    if HAS_SOFTCAP:
        derivative = soft_cap_derivative(u, 1.0)  # d tanh(u) / du
        return tl.where(in_vocab, cap_mult * accurate_tanh(u), float("-inf")), derivative
    else:
        return u, u


@triton.jit
def _head(x, in_vocab, mult, cap_mult, HAS_SOFTCAP: tl.constexpr):
    """`_head_and_derivative`'s logits alone."""
    y, _derivative = _head_and_derivative(x, in_vocab, mult, cap_mult, HAS_SOFTCAP)
    return y


@triton.jit
def _block_start(i, num_blocks, BLOCK_V: tl.constexpr, REVERSE: tl.constexpr):
    """First column of a pass's i-th block: left to right, or right to left when REVERSE."""
    if REVERSE:
        return (num_blocks - 1 - i) * BLOCK_V
    else:
        return i * BLOCK_V


@triton.jit
def _mix_over_q(d, log_beta, log1m_beta, log_odds):
    """L_q = log m - log q = logaddexp(log beta + d, log(1 - beta)), d = log p - log q (JSD)."""
    return tl.maximum(log_beta + d, log1m_beta) + tl.log(1.0 + tl.exp(-tl.abs(d + log_odds)))


@triton.jit
def _running_shift(old_max, block_max):
    """Online maximum step: the new maximum (NaN kept: `propagate_nan=ALL`) and the shift sums are taken
    relative to (the maximum, or 0 while every value so far is -inf, so no exp(-inf - (-inf)))."""
    new_max = tl.maximum(old_max, block_max, propagate_nan=tl.PropagateNan.ALL)
    return new_max, tl.where(new_max == float("-inf"), 0.0, new_max)


@triton.jit
def kd_tile_kernel(
    s_ptr,
    t_ptr,
    g_ptr,
    stride_s,
    stride_t,
    stride_g,
    labels_ptr,
    token_index_ptr,
    num_valid_ptr,
    w_distill_ptr,
    w_ce_ptr,
    divergence_ptr,
    ce_ptr,
    vocab,
    student_mult,
    student_cap_mult,
    teacher_mult,
    teacher_cap_mult,
    temperature,
    teacher_temperature,
    beta,
    log_beta,
    log1m_beta,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    SEPARATE_CE: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    HAS_CE_GRAD: tl.constexpr,
    HAS_SOFTCAP_S: tl.constexpr,
    HAS_SOFTCAP_T: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    G_IN_S: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row of the [c, V] tiles: D [c], C [c] and, when WANT_GRAD, the row of G.

    `g_ptr` may be `s_ptr` or `t_ptr` (G in place of a tile): each block of G is stored after its
    block of s and t was read, by the one program that reads that row. With G_IN_S, `g_ptr` is a
    16-bit view of s's storage, G's row r in the first half of s's row r (module docstring).
    """
    row, counts = token_of(token_index_ptr, num_valid_ptr)  # `valid` as `tl_utils.token_order`
    cols = tl.arange(0, BLOCK_V)
    num_blocks = tl.cdiv(vocab, BLOCK_V)
    neg_inf = float("-inf")
    g_row = g_ptr + row * stride_g

    if not counts:  # never read: 0, 0 and a zero G row
        tl.store(divergence_ptr + row, 0.0)
        tl.store(ce_ptr + row, 0.0)
        if WANT_GRAD:
            for i in range(0, num_blocks):
                v = i * BLOCK_V + cols
                tl.store(g_row + v, tl.zeros([BLOCK_V], g_ptr.dtype.element_ty), mask=v < vocab)
        return

    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t

    # Pass 1. Shifts c_s, c_t (running maxima, 0 while -inf); a - c_a = (s - c_s) / T,
    # b - c_b = (t - c_t) / T'. Sums Z_a = sum e^(a - c_a), Z_b = sum e^(b - c_b), Z_s = sum e^(s - c_s).
    # KL accumulator relative to the shifts (docs/design.md §3):
    #   forward A = sum e^(b - c_b) ((b - c_b) - (a - c_a));  shifts moving by (d_a, d_b):
    #           A <- e^(-d_b) (A - Z_b (d_b - d_a))
    #   reverse A = sum e^(a - c_a) ((a - c_a) - (b - c_b));  A <- e^(-d_a) (A + Z_a (d_b - d_a))
    zero = tl.zeros([], tl.float32)
    max_s = tl.full([], neg_inf, tl.float32)
    max_t = tl.full([], neg_inf, tl.float32)
    shift_s = zero
    shift_t = zero
    sum_a = zero
    sum_b = zero
    sum_s = zero
    kl_acc = zero
    top_s = tl.zeros([], tl.int32)  # JSD: the column of the student's (first) maximum
    for i in range(0, num_blocks):
        # Right to left, so that pass 3 (left to right) starts on the blocks read last; the JSD's pass
        # 1 left to right (ties of the student's maximum keep the first column), its pass 2 right to left.
        v = _block_start(i, num_blocks, BLOCK_V, DIVERGENCE != JSD) + cols
        in_vocab = v < vocab
        x_s = tl.load(s_row + v, mask=in_vocab, other=neg_inf)
        x_t = tl.load(t_row + v, mask=in_vocab, other=neg_inf)
        s = _head(x_s, in_vocab, student_mult, student_cap_mult, HAS_SOFTCAP_S)
        t = _head(x_t, in_vocab, teacher_mult, teacher_cap_mult, HAS_SOFTCAP_T)
        block_max_s = tl.max(s, 0)
        new_max_s, new_shift_s = _running_shift(max_s, block_max_s)
        new_max_t, new_shift_t = _running_shift(max_t, tl.max(t, 0))
        if DIVERGENCE == JSD:
            block_top = tl.min(tl.where(s == block_max_s, v, vocab), 0)
            top_s = tl.where(block_max_s > max_s, block_top, top_s)
        a_rel = (s - new_shift_s) / temperature
        b_rel = (t - new_shift_t) / teacher_temperature
        exp_a = tl.exp(a_rel)
        exp_b = tl.exp(b_rel)
        rescale_a = tl.exp((max_s - new_shift_s) / temperature)  # 0 while max_s is -inf
        rescale_b = tl.exp((max_t - new_shift_t) / teacher_temperature)
        drift = (new_shift_t - shift_t) / teacher_temperature - (new_shift_s - shift_s) / temperature
        # A term of weight 0 is 0, even where its log-ratio is infinite or NaN (-inf entries).
        if DIVERGENCE == FORWARD_KL:
            kl_acc = rescale_b * (kl_acc - sum_b * drift)
            kl_acc += tl.sum(tl.where(exp_b > 0.0, exp_b * (b_rel - a_rel), 0.0), 0)
        if DIVERGENCE == REVERSE_KL:
            kl_acc = rescale_a * (kl_acc + sum_a * drift)
            kl_acc += tl.sum(tl.where(exp_a > 0.0, exp_a * (a_rel - b_rel), 0.0), 0)
        sum_a = sum_a * rescale_a + tl.sum(exp_a, 0)
        sum_b = sum_b * rescale_b + tl.sum(exp_b, 0)
        if SEPARATE_CE:
            sum_s = sum_s * tl.exp(max_s - new_shift_s) + tl.sum(tl.exp(s - new_shift_s), 0)
        max_s, shift_s = new_max_s, new_shift_s
        max_t, shift_t = new_max_t, new_shift_t
    if not SEPARATE_CE:
        sum_s = sum_a  # T = 1 (or no labels): the CE's softmax is q
    log_za = tl.log(sum_a)
    log_zb = tl.log(sum_b)
    # Not a distribution (NaN, +inf, or all -inf): the sum is NaN or 0, not >= 1 (the maximum's own term
    # e^0); 1/2 leaves room for an approximate exp (ex2.approx on the GPU).
    student_good = sum_a >= 0.5
    distill_good = student_good & (sum_b >= 0.5)

    aux = zero  # the G pass's constant: K = A / Z_a (reverse KL), K' (JSD)
    if DIVERGENCE == FORWARD_KL:
        divergence = kl_acc / sum_b - log_zb + log_za  # D = A / Z_b - log Z_b + log Z_a
    elif DIVERGENCE == REVERSE_KL:
        aux = kl_acc / sum_a
        divergence = aux - log_za + log_zb  # D = K - log Z_a + log Z_b
    else:
        # Pass 2 (JSD), right to left. In the log-ratio d = log p - log q = (b - c_b) - (a - c_a) +
        # (log Z_a - log Z_b), rather than from log q and log p (whose roundings, eps |log q| ~ eps log V,
        # would not cancel: 3x to 10x the error on the gradient):
        #   L_q = log m - log q = logaddexp(log beta + d, log(1 - beta))
        #   L_p = log m - log p = logaddexp(log beta, log(1 - beta) - d)
        # sharing log(1 + e^(-|r|)), r = d + log(beta / (1 - beta)) (both pairs differ by r);
        #   D = beta KL(p || m) + (1 - beta) KL(q || m) = -beta sum p L_p - (1 - beta) sum q L_q
        # The student's top token v* is the reference of KL(q || m) (as the fused reverse KL's, §3):
        #   K' = sum q (L_q - L_q*),  KL(q || m) = -L_q* - K',  dD/ds = (1 - beta) q (K' - (L_q - L_q*)) / T
        # with L_q - L_q* exactly 0 at v*, so that G at v* does not cancel (for a peaked q it is
        # O(1 - q*), where the plain form subtracts two numbers of size |log(1 - beta)|).
        log_odds = log_beta - log1m_beta
        log_ratio_z = log_za - log_zb
        top_s = tl.minimum(tl.maximum(top_s, 0), vocab - 1)  # in range even for a row that is not read
        s_top = _head(tl.load(s_row + top_s), True, student_mult, student_cap_mult, HAS_SOFTCAP_S)
        t_top = _head(tl.load(t_row + top_s), True, teacher_mult, teacher_cap_mult, HAS_SOFTCAP_T)
        d_top = ((t_top - shift_t) / teacher_temperature - (s_top - shift_s) / temperature) + log_ratio_z
        mix_over_q_top = _mix_over_q(d_top, log_beta, log1m_beta, log_odds)
        inv_za = 1.0 / sum_a
        inv_zb = 1.0 / sum_b
        kl_teacher_mix = zero
        kl_student_mix = zero
        for i in range(0, num_blocks):
            v = _block_start(i, num_blocks, BLOCK_V, True) + cols
            in_vocab = v < vocab
            x_s = tl.load(s_row + v, mask=in_vocab, other=neg_inf)
            x_t = tl.load(t_row + v, mask=in_vocab, other=neg_inf)
            s = _head(x_s, in_vocab, student_mult, student_cap_mult, HAS_SOFTCAP_S)
            t = _head(x_t, in_vocab, teacher_mult, teacher_cap_mult, HAS_SOFTCAP_T)
            a_rel = (s - shift_s) / temperature
            b_rel = (t - shift_t) / teacher_temperature
            q = tl.exp(a_rel) * inv_za
            p = tl.exp(b_rel) * inv_zb
            d = (b_rel - a_rel) + log_ratio_z
            softplus = tl.log(1.0 + tl.exp(-tl.abs(d + log_odds)))
            mix_over_q = tl.maximum(log_beta + d, log1m_beta) + softplus  # L_q
            mix_over_p = tl.maximum(log_beta, log1m_beta - d) + softplus  # L_p
            relative = tl.where(v == top_s, 0.0, mix_over_q - mix_over_q_top)  # L_q - L_q*
            # Weight 0 (p or q = 0: d = -inf, +inf or NaN) gives 0.
            kl_teacher_mix -= tl.sum(tl.where(p > 0.0, p * mix_over_p, 0.0), 0)
            kl_student_mix += tl.sum(tl.where(q > 0.0, q * relative, 0.0), 0)  # K'
        aux = kl_student_mix
        kl_student_mix = -mix_over_q_top - kl_student_mix
        divergence = beta * kl_teacher_mix + (1.0 - beta) * kl_student_mix
    tl.store(divergence_ptr + row, tl.where(distill_good, divergence, float("nan")))

    label = 0
    if HAS_LABELS:
        # C = LSE(s) - s_y = log Z_s - (s_y - c_s)
        label = tl.load(labels_ptr + row)
        x_y = tl.load(s_row + label)
        s_y = _head(x_y, True, student_mult, student_cap_mult, HAS_SOFTCAP_S)
        ce = tl.log(sum_s) - (s_y - shift_s)
        tl.store(ce_ptr + row, tl.where(student_good, ce, float("nan")))
    else:
        tl.store(ce_ptr + row, 0.0)

    if WANT_GRAD:
        # Pass 3, left to right (against the previous pass; G_IN_S needs it). G = w_D dD/ds + w_C dC/ds,
        # the weights times lambda_s (by the launcher), the whole times the student cap's derivative; a
        # NaN row where D is NaN.
        w_scaled = tl.load(w_distill_ptr + row).to(tl.float32)
        coef_q = w_scaled / (temperature * sum_a)  # w_D / (T Z_a): e^(a - c_a) times it is w_D q / T
        w_ce = zero
        coef_plain = zero
        if HAS_CE_GRAD:
            w_ce = tl.load(w_ce_ptr + row).to(tl.float32)
            coef_plain = w_ce / sum_s
        if DIVERGENCE == FORWARD_KL:
            coef_p = w_scaled / (temperature * sum_b)
        for i in range(0, num_blocks):
            v = _block_start(i, num_blocks, BLOCK_V, False) + cols
            in_vocab = v < vocab
            x_s = tl.load(s_row + v, mask=in_vocab, other=neg_inf)
            x_t = tl.load(t_row + v, mask=in_vocab, other=neg_inf)
            s, cap_derivative = _head_and_derivative(
                x_s, in_vocab, student_mult, student_cap_mult, HAS_SOFTCAP_S
            )
            t = _head(x_t, in_vocab, teacher_mult, teacher_cap_mult, HAS_SOFTCAP_T)
            a_rel = (s - shift_s) / temperature
            b_rel = (t - shift_t) / teacher_temperature
            exp_a = tl.exp(a_rel)
            if DIVERGENCE == FORWARD_KL:
                # dD/ds = (q - p) / T
                g = exp_a * coef_q - tl.exp(b_rel) * coef_p
            elif DIVERGENCE == REVERSE_KL:
                # dD/ds = q ((a - b) - K) / T; where q = 0, 0 * K: 0, or NaN when the divergence K is
                # infinite (as autograd of the definition, and `tiles.kd_tile_terms`)
                g = tl.where(exp_a > 0.0, exp_a * ((a_rel - b_rel) - aux), 0.0 * aux) * coef_q
            else:
                # dD/ds = (1 - beta) q (log q - log m - KL(q || m)) / T
                #       = (1 - beta) q (K' - (L_q - L_q*)) / T, 0 where q = 0; as in pass 2
                d = (b_rel - a_rel) + log_ratio_z
                relative = _mix_over_q(d, log_beta, log1m_beta, log_odds) - mix_over_q_top
                relative = tl.where(v == top_s, 0.0, relative)
                g = tl.where(exp_a > 0.0, exp_a * (aux - relative), 0.0) * ((1.0 - beta) * coef_q)
            if HAS_CE_GRAD:
                # dC/ds = softmax(s) - onehot(y)
                if SEPARATE_CE:
                    g += tl.exp(s - shift_s) * coef_plain
                else:
                    g += exp_a * coef_plain
                g -= tl.where(v == label, w_ce, 0.0)
            if HAS_SOFTCAP_S:
                g = g * cap_derivative
            g = tl.where(distill_good, g, float("nan"))
            store_gradient(g_row, v, g, in_vocab, ROUND_BF16, G_IN_S)


def kd_tile_terms_triton(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    options: KDOptions,
    grad_weights: tuple[torch.Tensor, torch.Tensor | None] | None,
    *,
    teacher_tempered: bool = False,
    folded: tuple[float, float] = (1.0, 1.0),
    valid: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    block_v: int | None = None,
    scratch: object = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`tiles.kd_tile_terms` in one kernel: (divergence [c], ce [c], G [c, V] or None).

    `s`, `t`: [c, V] float32 tiles with unit column stride, holding `folded[0] z_s` and `folded[1] z_t`;
    `labels`: [c] safe labels (an ignored row holds any valid id) or None; `grad_weights`: None or
    (w_distill [c], w_ce [c] or None); `teacher_tempered`, `folded`, `valid` as `kd_tile_terms`.
    G is written into `grad_out` ([c, V], float32, bfloat16 or float16, cast on store) when given, else
    over `tiles.grad_tile(options, s, t)` (the student's tile for forward KL, the teacher's otherwise),
    and returned. `grad_out` may be a separate tensor, or `s.view(dtype)[:, :V]` for a 16-bit dtype: G
    in the first half of each row of the student's tile (which it leaves undefined; module docstring).
    Unlike `kd_tile_terms`, the tiles themselves are otherwise left as they are.
    `block_v`: vocabulary columns per step (a power of two; default min(MAX_BLOCK_V, V rounded up)).
    `scratch`: `kd_tile_terms`' scratch blocks, taken for a drop-in call and not needed here.
    """
    if s.dtype != torch.float32 or t.dtype != torch.float32:
        raise TypeError(f"the tile kernel takes float32 tiles, got {s.dtype} and {t.dtype}")
    if s.dim() != 2 or s.shape != t.shape:
        raise ValueError(f"s and t must be [c, V] tiles of one shape, got {tuple(s.shape)}, {tuple(t.shape)}")
    c, vocab = s.shape
    want_grad = grad_weights is not None
    if want_grad:
        if grad_out is None:
            grad_out = s if options.divergence == "forward_kl" else t  # tiles.grad_tile
        elif grad_out.shape != s.shape or grad_out.dtype not in GRAD_DTYPES:
            raise ValueError(
                f"grad_out must be a {tuple(s.shape)} float32, bfloat16 or float16 tensor, "
                f"got {tuple(grad_out.shape)} {grad_out.dtype}"
            )
    for name, x in (("s", s), ("t", t), ("grad_out", grad_out if want_grad else None)):
        if x is not None and vocab > 1 and x.stride(1) != 1:
            raise ValueError(f"{name} must have unit column stride, got strides {x.stride()}")
    divergence = torch.empty(c, dtype=torch.float32, device=s.device)
    ce = torch.empty(c, dtype=torch.float32, device=s.device)
    if c == 0:
        return divergence, ce, grad_out if want_grad else None
    g_in_s = want_grad and check_grad_storage(grad_out, s, t)

    T = options.temperature
    has_labels = labels is not None
    w_distill, w_ce = grad_weights if want_grad else (None, None)
    has_ce_grad = want_grad and has_labels and w_ce is not None
    if want_grad:  # the student's logit scale, into the weights; the kernel applies its cap's derivative
        w_distill, w_ce, _ = head_chain_rule(options.student_head, w_distill, w_ce)
    student_mult, student_cap_mult = head_factors(
        options.student_logit_scale, options.student_softcap, folded[0], 1.0
    )
    teacher_mult, teacher_cap_mult = head_factors(
        options.teacher_logit_scale, options.teacher_softcap, folded[1], T if teacher_tempered else 1.0
    )
    beta = options.beta if options.divergence == "jsd" else 0.5  # unused outside the JSD
    if block_v is None:
        block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    # Tensors a flag leaves unread get a stand-in pointer.
    labels_arg = labels.to(torch.int64).contiguous() if has_labels else divergence
    token_index, num_valid = token_order(None if valid is None else valid.logical_not(), c, s.device)
    w_distill_arg = w_distill.contiguous() if want_grad else divergence
    w_ce_arg = w_ce.contiguous() if has_ce_grad else divergence
    g_arg = grad_out if want_grad else s
    with launch_device(s):
        kd_tile_kernel[(c,)](
            s, t, g_arg, s.stride(0), t.stride(0), g_arg.stride(0), labels_arg, token_index, num_valid,
            w_distill_arg, w_ce_arg, divergence, ce, vocab, student_mult, student_cap_mult, teacher_mult,
            teacher_cap_mult,
            T, 1.0 if teacher_tempered else T, beta, math.log(beta), math.log1p(-beta),
            DIVERGENCE=DIVERGENCE_CODES[options.divergence],
            HAS_LABELS=has_labels,
            SEPARATE_CE=has_labels and T != 1.0,
            WANT_GRAD=want_grad,
            HAS_CE_GRAD=has_ce_grad,
            HAS_SOFTCAP_S=options.student_softcap is not None,
            HAS_SOFTCAP_T=options.teacher_softcap is not None,
            ROUND_BF16=INTERPRETER and want_grad and grad_out.dtype == torch.bfloat16,
            G_IN_S=g_in_s,
            BLOCK_V=block_v,
            num_warps=8 if block_v >= 2048 else 4,
        )  # fmt: skip
    return divergence, ce, grad_out if want_grad else None
