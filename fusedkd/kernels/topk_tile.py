"""Two Triton passes for a chunk's student logit tile against a sparse top-k teacher.

The tiles backend of `fused_linear_topk_kd_loss` (`torch_backend.topk_kd.stream` with
`tile_terms=topk_tile_terms_triton`): per chunk of c tokens the student's logits are computed once, on
the GEMM, into a float32 `c x V` tile, and `topk_tile_terms_triton` replaces the torch element-wise
passes of `topk_kd._tile_chunk` (~25 kernels over the tile) by two launches that each read the tile
once; G = dloss/dz is written over the tile (float32) or into its own bytes in the weight's 16-bit
dtype, for the GEMMs dh = G W_s and dW_s += G^T h_s. Same arguments, results (to rounding) and
non-finite rule (docs/design.md §9) as `_tile_chunk`.

Per chunk (the teacher's k ids per token are distinct, `_values.check_topk_values`):

    torch   gather the k support logits and the label's, then mark the support in the tile: raw -inf
    pass 1  reads the tile, right to left: over the tail (the row less its support) the maximum m, and
            Z_1 = sum e^(s - m), Z_T = sum e^((s - m) / T); and the count of -inf entries
    torch   on [c, k]: the support through the head, the row maximum, the log-sum-exps of the tail and
            of the row, the divergence and its support gradient (`topk_kd._bucket_terms` /
            `_renormalized_terms`, the torch backend's own), the cross-entropy, each row's coefficients
    pass 2  reads the tile, writes G, left to right (when a gradient is wanted):
                G_v = (c_T e^((s_v - m) / T) + c_1 e^(s_v - m) - w_C [v = y]) h'(z_v)
            c_T = w_D c_tail / (T Z_T) (tail="bucket": the tail's softmax r_v, 0 for "renormalize"),
            c_1 = w_C e^(m - LSE(s)) (the cross-entropy's softmax), y the label when it is in the tail,
            h' the soft cap's derivative; a support entry gets 0 here
    torch   writes G on the support (k entries per row): w_D dD/da / T + w_C (softmax - onehot), times h'

The mark is a raw -inf in the tile, which every head maps to a zero probability (a scale keeps it -inf)
except a soft-capped one, which maps a raw -inf to -cap, a probability like any other: pass 1 counts the
row's raw -inf entries, and the count less the k marks (the tail's own raw -inf entries, all at -cap)
joins the tail's sums in torch. In pass 2 a marked or raw -inf entry gets 0 either way: e^(-inf) without
a cap, times the cap's derivative at -inf (0) with one. A row that does not count is never read: 0,
0 and a zero G row. The tile holds `folded * z` (z = W h + b), finished per block as `kd_tile` does.

Grid `(c,)`, one program per row, BLOCK_V columns per step. The float32 tile is read twice and G written
once: 10 bytes per (token, vocabulary entry) with a 16-bit G (12 with a float32 G), 4 without a gradient.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fusedkd._options import KDOptions, SupportOptions, head_chain_rule, head_factors
from fusedkd.kernels import INTERPRETER, launch_device
from fusedkd.kernels.kd_tile import GRAD_DTYPES, MAX_BLOCK_V, _head_and_derivative
from fusedkd.kernels.tl_utils import check_grad_storage, store_gradient, token_of, token_order


@triton.jit
def topk_tile_statistics_kernel(
    s_ptr,
    stride_s,
    token_index_ptr,
    num_valid_ptr,
    stats_ptr,
    vocab,
    mult,
    cap_mult,
    inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Pass 1, one program per row: stats[row] = (m, Z_1, Z_T, count of raw -inf entries) over the tail
    (raw -inf entries left out; m = -inf and sums 0 for an empty tail). A NaN or +inf makes the sums NaN."""
    row, counts = token_of(token_index_ptr, num_valid_ptr)
    out = stats_ptr + row * 4
    neg_inf = float("-inf")
    if not counts:
        tl.store(out, neg_inf)
        tl.store(out + 1, 0.0)
        tl.store(out + 2, 0.0)
        tl.store(out + 3, 0.0)
        return
    cols = tl.arange(0, BLOCK_V)
    num_blocks = tl.cdiv(vocab, BLOCK_V)
    s_row = s_ptr + row * stride_s
    zero = tl.zeros([], tl.float32)
    max_s = tl.full([], neg_inf, tl.float32)
    sum_1 = zero
    sum_t = zero
    raw_neg_inf = zero
    for i in range(0, num_blocks):
        v = (num_blocks - 1 - i) * BLOCK_V + cols  # right to left: pass 2 starts on the blocks read last
        in_vocab = v < vocab
        x = tl.load(s_row + v, mask=in_vocab, other=neg_inf)
        marked = x == neg_inf
        raw_neg_inf += tl.sum(tl.where(in_vocab & marked, 1.0, 0.0), 0)
        s, _derivative = _head_and_derivative(x, in_vocab, mult, cap_mult, HAS_SOFTCAP)
        s = tl.where(marked, neg_inf, s)  # the support's marks (and, capped, the tail's own -inf: counted)
        new_max = tl.maximum(max_s, tl.max(s, 0), propagate_nan=tl.PropagateNan.ALL)
        new_shift = tl.where(new_max == neg_inf, 0.0, new_max)
        sum_1 = sum_1 * tl.exp(max_s - new_shift) + tl.sum(tl.exp(s - new_shift), 0)
        sum_t = sum_t * tl.exp((max_s - new_shift) * inv_temperature) + tl.sum(
            tl.exp((s - new_shift) * inv_temperature), 0
        )
        max_s = new_max
    tl.store(out, max_s)
    tl.store(out + 1, sum_1)
    tl.store(out + 2, sum_t)
    tl.store(out + 3, raw_neg_inf)


@triton.jit
def topk_tile_gradient_kernel(
    s_ptr,
    g_ptr,
    stride_s,
    stride_g,
    token_index_ptr,
    num_valid_ptr,
    coef_ptr,
    label_ptr,
    vocab,
    mult,
    cap_mult,
    inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    G_IN_S: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Pass 2, one program per row: G's row off the support from coef[row] = (m, c_T, c_1, w_C, bad)
    and label[row] (-1: the label is on the support, or none; bad != 0: a NaN row). With G_IN_S, `g_ptr`
    is a 16-bit view of the tile's storage, walked left to right with a CTA barrier before each store
    (`kd_tile`)."""
    row, counts = token_of(token_index_ptr, num_valid_ptr)
    cols = tl.arange(0, BLOCK_V)
    num_blocks = tl.cdiv(vocab, BLOCK_V)
    g_row = g_ptr + row * stride_g
    if not counts:
        for i in range(0, num_blocks):
            v = i * BLOCK_V + cols
            tl.store(g_row + v, tl.zeros([BLOCK_V], g_ptr.dtype.element_ty), mask=v < vocab)
        return
    s_row = s_ptr + row * stride_s
    coef = coef_ptr + row * 5
    shift = tl.load(coef)
    coef_t = tl.load(coef + 1)
    coef_1 = tl.load(coef + 2)
    w_ce = tl.load(coef + 3)
    bad = tl.load(coef + 4) != 0.0
    label = tl.load(label_ptr + row)
    for i in range(0, num_blocks):
        v = i * BLOCK_V + cols
        in_vocab = v < vocab
        x = tl.load(s_row + v, mask=in_vocab, other=float("-inf"))
        s, cap_derivative = _head_and_derivative(x, in_vocab, mult, cap_mult, HAS_SOFTCAP)
        relative = s - shift
        g = coef_t * tl.exp(relative * inv_temperature) + coef_1 * tl.exp(relative)
        g -= tl.where(v == label, w_ce, 0.0)
        if HAS_SOFTCAP:
            g = g * cap_derivative  # 0 at a raw -inf (a mark, or the tail's own); uncapped: e^(-inf)
        g = tl.where(bad, float("nan"), g)
        store_gradient(g_row, v, g, in_vocab, ROUND_BF16, G_IN_S)


def topk_tile_terms_triton(
    s: torch.Tensor,
    ids: torch.Tensor,
    log_p: torch.Tensor,
    labels: torch.Tensor | None,
    options: KDOptions,
    support: SupportOptions,
    grad_weights: tuple[torch.Tensor, torch.Tensor | None] | None,
    scratch: object = None,
    folded: float = 1.0,
    valid: torch.Tensor | None = None,
    *,
    grad_out: torch.Tensor | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`topk_kd._tile_chunk` in two kernels: (divergence [c], ce [c], G [c, V] or None).

    `s`: the [c, V] float32 tile (unit column stride) holding `folded * z`, which this overwrites (the
    support's marks, then G); `ids`, `log_p`: [c, k] support ids (distinct per row) and the teacher's
    log-probabilities there; `labels`: [c] safe labels or None; `grad_weights`: None or
    (w_distill [c], w_ce [c] or None); `valid`: [c] bool or None (all count). G is written into
    `grad_out` when given ([c, V], float32, bfloat16 or float16: apart from `s`, or `s.view(dtype)[:, :V]`
    for a 16-bit dtype, G in the first half of each row's bytes), else over `s`. `scratch`: taken for a
    drop-in call of `_tile_chunk`, not needed here. `block_v`: columns per step (a power of two).
    """
    from fusedkd.torch_backend import tiles
    from fusedkd.torch_backend.topk_kd import _bucket_terms, _renormalized_terms

    if s.dtype != torch.float32 or s.dim() != 2:
        raise TypeError(f"the top-k tile kernels take a [c, V] float32 tile, got {s.dtype} {tuple(s.shape)}")
    c, vocab = s.shape
    k = ids.shape[1]
    if ids.shape != (c, k) or log_p.shape != (c, k):
        raise ValueError(f"ids and log_p must be [{c}, k], got {tuple(ids.shape)} and {tuple(log_p.shape)}")
    want_grad = grad_weights is not None
    if want_grad:
        if grad_out is None:
            grad_out = s
        elif grad_out.shape != s.shape or grad_out.dtype not in GRAD_DTYPES:
            raise ValueError(
                f"grad_out must be a {tuple(s.shape)} float32, bfloat16 or float16 tensor, "
                f"got {tuple(grad_out.shape)} {grad_out.dtype}"
            )
    for name, x in (("s", s), ("grad_out", grad_out if want_grad else None)):
        if x is not None and vocab > 1 and x.stride(1) != 1:
            raise ValueError(f"{name} must have unit column stride, got strides {x.stride()}")
    divergence = s.new_zeros(c)
    ce = s.new_zeros(c)
    if c == 0:
        return divergence, ce, grad_out if want_grad else None
    g_in_s = want_grad and check_grad_storage(grad_out, s)

    T = options.temperature
    head = options.student_head
    has_cap = options.student_softcap is not None
    need_ce = support.need_ce and labels is not None
    bucket = support.tail == "bucket"
    mult, cap_mult = head_factors(options.student_logit_scale, options.student_softcap, folded, 1.0)
    if block_v is None:
        block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    num_warps = 8 if block_v >= 2048 else 4
    token_index, num_valid = token_order(None if valid is None else valid.logical_not(), c, s.device)

    # The support's and the label's logits, before the marks; then the marks.
    raw_support = s.gather(1, ids)
    raw_label = s.gather(1, labels[:, None])[:, 0] if need_ce else None
    s.scatter_(1, ids, -math.inf)
    stats = torch.empty(c, 4, dtype=torch.float32, device=s.device)
    with launch_device(s):
        topk_tile_statistics_kernel[(c,)](
            s, s.stride(0), token_index, num_valid, stats, vocab, mult, cap_mult, 1.0 / T,
            HAS_SOFTCAP=has_cap, BLOCK_V=block_v, num_warps=num_warps,
        )  # fmt: skip
    tail_max, sum_1, sum_t, raw_neg_inf = stats.unbind(1)

    # On [c, k]: the support through the head; everything relative to the row maximum M (as the torch
    # backend's tile, after `tiles.subtract_row_max`), so that large logits keep their differences.
    support_logits = raw_support.clone()
    tiles.finish_head(support_logits, folded, options.student_logit_scale, options.student_softcap, 1.0)
    row_max = torch.maximum(tail_max, support_logits.amax(dim=1))
    shift = tiles.finite(row_max[:, None])[:, 0]
    log_z_tail_1 = (tail_max - shift) + sum_1.log()  # -inf for an empty tail
    log_z_tail_t = (tail_max - shift) / T + sum_t.log()
    if has_cap:  # the tail's own raw -inf entries, all at -cap: count - k of them
        own = (raw_neg_inf - k).clamp(min=0)
        at_cap = -cap_mult - shift
        log_z_tail_1 = torch.logaddexp(log_z_tail_1, own.log() + at_cap)
        log_z_tail_t = torch.logaddexp(log_z_tail_t, own.log() + at_cap / T)
    support_rel = support_logits - shift[:, None]
    a_support = support_rel / T
    lse_1 = torch.logaddexp(log_z_tail_1, torch.logsumexp(support_rel, dim=1))  # LSE(s) - M
    # Not a distribution (docs/design.md §9): a NaN or +inf anywhere, or every entry -inf.
    bad = ~torch.isfinite(lse_1) | ~torch.isfinite(row_max)
    if valid is not None:
        bad &= valid

    if bucket:
        terms = _bucket_terms(
            a_support, log_z_tail_t, log_p, options.divergence, k == vocab, support.precision, want_grad
        )
    else:
        terms = _renormalized_terms(a_support, log_p, options.divergence, want_grad)
    divergence.copy_(terms.divergence)
    if need_ce:
        label_logit = raw_label.clone()
        tiles.finish_head(label_logit, folded, options.student_logit_scale, options.student_softcap, 1.0)
        ce.copy_(lse_1 - (label_logit - shift))
    for x in (divergence, ce) if need_ce else (divergence,):  # no labels: C = 0, whatever the row
        x.masked_fill_(bad, math.nan)
        if valid is not None:
            x.masked_fill_(~valid, 0.0)
    if not want_grad:
        return divergence, ce, None

    # Row weights (the head's scale folded in, `head_chain_rule`) and pass 2's coefficients.
    w_distill, w_ce = grad_weights
    w_distill, w_ce, support_derivative = head_chain_rule(head, w_distill, w_ce, raw_support, folded)
    w_distill = w_distill.to(torch.float32)
    w_ce = w_ce.to(torch.float32) if (need_ce and w_ce is not None) else torch.zeros_like(w_distill)
    tail_shift = tiles.finite(tail_max[:, None])[:, 0]  # pass 2's: e^(s - m) <= 1 on the tail
    tail_rel = tail_shift - shift
    coef_t = torch.zeros_like(w_distill)
    if bucket:
        # r_v = e^((s_v - M) / T - LSE_tail) = e^((s_v - m) / T) e^((m - M) / T - LSE_tail)
        scale_t = torch.where(log_z_tail_t > -math.inf, (tail_rel / T - log_z_tail_t).exp(), 0.0)
        coef_t = w_distill / T * terms.c_tail * scale_t
    coef_1 = w_ce * (tail_rel - lse_1).exp()
    # A tail pass 1 left empty (every entry raw -inf: e^(s - m) is 0 there, or the cap's derivative is)
    # gets no coefficients: e^(-m) of m = -inf must not overflow into inf x 0.
    empty_tail = tail_max == -math.inf
    coef_t = coef_t.masked_fill(empty_tail, 0.0)
    coef_1 = coef_1.masked_fill(empty_tail, 0.0)
    label_tail = torch.full((c,), -1, dtype=torch.int64, device=s.device)
    if need_ce:  # the label's -w_C: here in the tail, with the support's entries on the support
        label_tail = torch.where((ids == labels[:, None]).any(dim=1), -1, labels.to(torch.int64))
    coef = torch.stack([tail_shift, coef_t, coef_1, w_ce, bad.to(torch.float32)], dim=1)
    with launch_device(s):
        topk_tile_gradient_kernel[(c,)](
            s, grad_out, s.stride(0), grad_out.stride(0), token_index, num_valid, coef, label_tail, vocab,
            mult, cap_mult, 1.0 / T,
            HAS_SOFTCAP=has_cap,
            ROUND_BF16=INTERPRETER and grad_out.dtype == torch.bfloat16,
            G_IN_S=g_in_s,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )  # fmt: skip

    # The support: w_D dD/da / T + w_C (softmax(s) - onehot(y)) on K, times the cap's derivative there;
    # plus 0 x the tail's coefficient, as the torch backend's G (the tail's r_v, 0 on K, times it): NaN
    # where that is not finite (an infinite divergence), as there.
    g_support = terms.g_support * (w_distill / T)[:, None]
    if bucket:
        g_support = g_support + 0.0 * (w_distill / T * terms.c_tail)[:, None]
    if need_ce:
        g_support = g_support + w_ce[:, None] * (support_rel - lse_1[:, None]).exp()
        g_support = g_support - torch.where(ids == labels[:, None], w_ce[:, None], 0.0)
    if support_derivative is not None:
        g_support = g_support * support_derivative
    g_support = g_support.masked_fill(bad[:, None], math.nan)
    if valid is not None:
        g_support = g_support.masked_fill(~valid[:, None], 0.0)
    grad_out.scatter_(1, ids, g_support.to(grad_out.dtype))
    return divergence, ce, grad_out
