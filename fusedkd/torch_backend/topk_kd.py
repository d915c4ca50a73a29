r"""`fused_linear_topk_kd_loss` on the PyTorch backend: the loss against a sparse top-k teacher and its
autograd Function.

The student's logits are computed per token chunk into one reused `c x V` tile (`gemm.project`); the
divergence on the teacher's support K and its gradient follow `fusedkd.topk`'s docstring. With
tail="renormalize" and no cross-entropy only the k head rows ``W_s[ids]`` of each token are read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fusedkd._autograd import gradient_scale
from fusedkd._options import KDOptions, SupportOptions, apply_head, compute_dtype, head_chain_rule
from fusedkd.torch_backend import streamed, tiles
from fusedkd.torch_backend.gemm import gradient_products, project
from fusedkd.torch_backend.tiles import (
    MAX_CHUNK,
    MIN_CHUNK,
    Scratch,
    Tokens,
    default_chunk_size,
    finite,
    select_rows,
)


def _xlogy_ratio(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """x (log x - log y), and 0 where x = 0 (whatever log y is); a NaN stays NaN."""
    return torch.where(x == 0, 0.0, x * (log_x - log_y))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0, accurate near 0 and far below; -inf for x >= 0."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass
class _TopKTerms:
    """Per-token divergence and its gradient on the support (g_support [c, k]) and the tail (c_tail [c]).

    dD/da_v = g_support[j] for v = ids[j];  dD/da_v = r_v c_tail for v outside the support, with
    r = softmax of a over the tail (bucket only; c_tail is None for renormalize).
    """

    divergence: torch.Tensor
    g_support: torch.Tensor | None
    c_tail: torch.Tensor | None


def _bucket_terms(
    a_support: torch.Tensor,
    lse_tail: torch.Tensor,
    log_p: torch.Tensor,
    divergence: str,
    full_support: bool,
    precision: float,
    want_grad: bool,
) -> _TopKTerms:
    """tail="bucket": D over the k + 1 outcomes (K, tail), from a = s / T on K and LSE(a) over the tail."""
    lse_all = torch.logaddexp(lse_tail, torch.logsumexp(a_support, dim=-1))  # LSE(a), full vocabulary
    log_q = a_support - lse_all[:, None]
    q = log_q.exp()
    p = log_p.exp()
    lse_p = torch.logsumexp(log_p, dim=-1)
    if full_support:  # k = V: no tail outcome
        log_q_tail = log_p_tail = torch.full_like(lse_all, -math.inf)
    else:
        log_q_tail = lse_tail - lse_all  # log of the student's mass outside K, never 1 - sum_K q
        # p_tail = max(1 - sum_K p, tau): below tau = eps (1 + sum_K p |log p|), the rounding error of
        # 1 - sum_K p, the stored log-probabilities do not resolve the tail (and reverse KL stays finite).
        entropy_part = torch.where(p > 0, -p * log_p, torch.zeros_like(p)).sum(-1)  # sum_K p |log p|
        resolution = precision * (1.0 + entropy_part)
        log_p_tail = torch.maximum(_log1mexp(lse_p), resolution.log())
    q_tail, p_tail = log_q_tail.exp(), log_p_tail.exp()
    if divergence == "forward_kl":
        # D = sum_K p log(p / q) + p_tail log(p_tail / q_tail)
        value = _xlogy_ratio(p, log_p, log_q).sum(-1) + _xlogy_ratio(p_tail, log_p_tail, log_q_tail)
        if not want_grad:
            return _TopKTerms(value, None, None)
        # dD/da = M_p q_v - p_v on K;  q_v M_p - p_tail r_v = r_v (M_p q_tail - p_tail) outside K
        mass_p = lse_p.exp() + p_tail
        return _TopKTerms(value, mass_p[:, None] * q - p, mass_p * q_tail - p_tail)
    # reverse: D = sum_K q log(q / p) + q_tail log(q_tail / p_tail)
    value = _xlogy_ratio(q, log_q, log_p).sum(-1) + _xlogy_ratio(q_tail, log_q_tail, log_p_tail)
    if not want_grad:
        return _TopKTerms(value, None, None)
    # dD/da_v = q_v (log q~_v - log p~_v - D): on K per token, outside K r_v q_tail (log q_tail/p_tail - D)
    g_support = _xlogy_ratio(q, log_q, log_p) - q * value[:, None]
    c_tail = _xlogy_ratio(q_tail, log_q_tail, log_p_tail) - q_tail * value
    return _TopKTerms(value, g_support, c_tail)


def _renormalized_terms(
    a_support: torch.Tensor, log_p: torch.Tensor, divergence: str, want_grad: bool
) -> _TopKTerms:
    """tail="renormalize": D between the two distributions restricted to K and renormalized."""
    log_q = a_support - torch.logsumexp(a_support, dim=-1, keepdim=True)  # log q^
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)  # log p^
    q, p = log_q.exp(), log_p.exp()
    if divergence == "forward_kl":
        # D = sum p^ log(p^ / q^);  dD/da = q^ - p^ on K
        value = _xlogy_ratio(p, log_p, log_q).sum(-1)
        return _TopKTerms(value, (q - p) if want_grad else None, None)
    # D = sum q^ log(q^ / p^);  dD/da = q^ (log q^ - log p^ - D) on K
    value = _xlogy_ratio(q, log_q, log_p).sum(-1)
    g_support = (_xlogy_ratio(q, log_q, log_p) - q * value[:, None]) if want_grad else None
    return _TopKTerms(value, g_support, None)


def _tile_chunk(
    s: torch.Tensor,
    ids: torch.Tensor,
    log_p: torch.Tensor,
    labels: torch.Tensor | None,
    options: KDOptions,
    support: SupportOptions,
    grad_weights: tuple[torch.Tensor, torch.Tensor | None] | None,
    scratch: Scratch,
    folded: float = 1.0,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One token chunk through its `c x V` student logits tile `s`, which it overwrites:
    (divergence [c], ce [c], G [c, V] (in `s`) or None).

    `labels` are safe (ignored rows hold a valid id; their weights are 0). G = w_distill dD/ds + w_ce dC/ds.
    The element-wise passes run on groups of `scratch.rows` rows, in place (as `tiles.kd_tile_terms`).
    `folded`: the factor `s` already carries relative to W h + b (`tiles.gemm_scales`). `valid` ([c] bool
    or None: all): rows that do not count get 0 and a zero G row; a counted row whose logits are not a
    distribution (a NaN or +inf, or only -inf) gets NaN (docs/design.md §9).
    """
    c = s.shape[0]
    divergence = s.new_empty(c)
    ce = s.new_empty(c)
    for rows in scratch.groups(c):
        _tile_group(
            s[rows],
            ids[rows],
            log_p[rows],
            select_rows(labels, rows),
            options,
            support,
            select_rows(grad_weights, rows),
            scratch,
            divergence[rows],
            ce[rows],
            folded,
            select_rows(valid, rows),
        )
    return divergence, ce, None if grad_weights is None else s


def _tile_group(
    s: torch.Tensor,
    ids: torch.Tensor,
    log_p: torch.Tensor,
    labels: torch.Tensor | None,
    options: KDOptions,
    support: SupportOptions,
    grad_weights: tuple[torch.Tensor, torch.Tensor | None] | None,
    scratch: Scratch,
    divergence_out: torch.Tensor,
    ce_out: torch.Tensor,
    folded: float,
    valid: torch.Tensor | None,
) -> None:
    """`_tile_chunk` on one group of rows; G, when wanted, is left in `s`."""
    T = options.temperature
    n = s.shape[0]
    want_grad = grad_weights is not None
    w_distill, w_ce = grad_weights if want_grad else (None, None)
    rows = torch.arange(n, device=s.device)

    # The student's head transform (logit scale, soft cap), finished on the tile `project` scaled by
    # `tiles.gemm_scales`; its chain rule (`head_chain_rule`) from the tile before: the scale into the
    # row weights, the cap's derivative into a block of the group.
    cap_derivative = None
    if want_grad:
        out = scratch.block(3, n) if options.student_softcap is not None else None
        w_distill, w_ce, cap_derivative = head_chain_rule(
            options.student_head, w_distill, w_ce, s, folded, out
        )
    tiles.finish_head(s, folded, options.student_logit_scale, options.student_softcap, 1.0)

    # Relative to the row maximum (docs/design.md §6); `bad`: the row is not a distribution (§9).
    bad = tiles.subtract_row_max(s)
    if valid is not None:
        bad &= valid

    need_ce = support.need_ce and labels is not None  # as the Triton launcher's

    def finish_values() -> None:
        divergence_out.masked_fill_(bad, math.nan)
        if need_ce:  # no cross-entropy: C = 0, whatever the row
            ce_out.masked_fill_(bad, math.nan)
        if valid is not None:
            divergence_out.masked_fill_(~valid, 0.0)
            ce_out.masked_fill_(~valid, 0.0)

    plain = z_plain = None
    ce_out.zero_()
    if need_ce:
        # C = LSE(s) - s_y;  dC/ds = softmax(s) - onehot(y)
        plain = torch.exp(s, out=scratch.block(0, n))
        z_plain = plain.sum(-1)
        ce_out.copy_(z_plain.log() - s[rows, labels])
    if T != 1.0:
        s.div_(T)  # a = s / T, relative to its maximum
    a_support = s.gather(1, ids)
    full_support = ids.shape[1] == s.shape[1]

    if support.tail == "bucket":
        s.scatter_(1, ids, -math.inf)  # a outside K
        tail_max = finite(s.amax(dim=-1, keepdim=True))
        tail = s.sub_(tail_max).exp_()  # exp(a - max over the tail), 0 on K
        z_tail = tail.sum(-1)
        lse_tail = z_tail.log() + tail_max[:, 0]  # -inf when k = V
        terms = _bucket_terms(
            a_support, lse_tail, log_p, options.divergence, full_support, support.precision, want_grad
        )
        divergence_out.copy_(terms.divergence)
        finish_values()
        if not want_grad:
            return
        # Outside K: r_v c_tail with r = softmax over the tail (0 on K).
        safe_z_tail = torch.where(z_tail > 0, z_tail, torch.ones_like(z_tail))
        grad = tail.mul_((w_distill / T * terms.c_tail / safe_z_tail)[:, None])
    else:
        terms = _renormalized_terms(a_support, log_p, options.divergence, want_grad)
        divergence_out.copy_(terms.divergence)
        finish_values()
        if not want_grad:
            return
        grad = s.zero_()
    if plain is not None and w_ce is not None:
        grad.addcmul_(plain, (w_ce / z_plain)[:, None])
        grad[rows, labels] -= w_ce
    grad.scatter_add_(1, ids, terms.g_support.mul_((w_distill / T)[:, None]))
    if cap_derivative is not None:
        grad.mul_(cap_derivative)
    tiles.fill_gradient_rows(grad, bad, valid)


def _sparse_chunk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    log_p: torch.Tensor,
    options: KDOptions,
    grad_weights: tuple[torch.Tensor, torch.Tensor | None] | None,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
    rows: slice,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """tail="renormalize" without cross-entropy: only the k rows W_s[ids] of the head are touched.

    s_j = W_s[ids_j] . h (+ b), O(k H) per token; G lives on K only, so grad_h = G_K W_s[ids] and
    grad_W[ids_j] += G_K,j h. Accumulates into `grads` (for `rows`) and returns the divergence [c].
    """
    dtype = compute_dtype(hidden.dtype)
    T = options.temperature
    support_weight = weight[ids]  # [c, k, H]
    s_support = torch.bmm(support_weight, hidden[:, :, None])[:, :, 0]
    if bias is not None:
        s_support = s_support + bias[ids]
    # The student's head transform on the k logits z: s = c tanh(scale z / c) (or scale z).
    s_support = s_support.to(dtype)
    if grads is not None:  # its chain rule: d/dz = scale (1 - tanh^2) d/ds
        w_distill, _, cap_derivative = head_chain_rule(options.student_head, grad_weights[0], None, s_support)
    s_support = apply_head(s_support, options.student_logit_scale, options.student_softcap)
    a_support = s_support / T
    terms = _renormalized_terms(a_support, log_p, options.divergence, grads is not None)
    if grads is not None:
        grad_hidden, grad_weight, grad_bias = grads
        g_support = terms.g_support.mul_((w_distill / T)[:, None])
        if cap_derivative is not None:
            g_support.mul_(cap_derivative)  # [c, k]
        if valid is not None:  # rows that do not count feed nothing, whatever they hold
            g_support.masked_fill_(~valid[:, None], 0.0)
        grad_hidden[rows] = torch.bmm(g_support.to(weight.dtype)[:, None, :], support_weight)[:, 0]
        flat_ids = ids.reshape(-1)
        outer = (g_support[:, :, None] * hidden.to(dtype)[:, None, :]).reshape(-1, hidden.shape[1])
        grad_weight.index_add_(0, flat_ids, outer)
        if grad_bias is not None:
            grad_bias.index_add_(0, flat_ids, g_support.reshape(-1))
    return terms.divergence


def stream(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    options: KDOptions,
    support: SupportOptions,
    chunk_size: int | None,
    grad_weights: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    need_bias_grad: bool = False,
    valid: torch.Tensor | None = None,
    tile_terms: Callable | None = None,
    grad_in_weight_dtype: bool = False,
):
    """Stream over token chunks. Returns (divergence [N], ce [N], grads or None).

    `tile_terms` computes a chunk's divergence, cross-entropy and G from its logit tile: `_tile_chunk`
    (torch element-wise passes, the default), or the tiles backend's two Triton passes
    (`fusedkd.kernels.topk_tile.topk_tile_terms_triton`), which write G in a 16-bit weight's dtype
    (`grad_in_weight_dtype`) into the tile's own bytes, so that both gradient products run as 16-bit
    GEMMs (fp16: G times a power of two, divided out of the products, as the dense tiles backend).

    grads = (grad_hidden [N, H] input dtype, grad_weight [V, H] compute dtype, grad_bias [V] or None).
    `valid` ([N] bool or None): which tokens count when ignored ones are streamed too
    (`Tokens.uncompacted_valid`); their hidden states must then be zero rows (`Tokens.zero_ignored`).
    """
    n, k = ids.shape
    dtype = compute_dtype(hidden.dtype)
    device = hidden.device
    divergence = torch.zeros(n, dtype=dtype, device=device)
    ce = torch.zeros(n, dtype=dtype, device=device)
    grads = None
    sparse = support.sparse
    if grad_weights is not None:
        # The tile path's first chunk writes grad_weight whole (no zero fill); the sparse path adds rows.
        allocate = torch.zeros if sparse or n == 0 else torch.empty
        grads = (
            torch.zeros_like(hidden),
            allocate(weight.shape, dtype=dtype, device=device),
            torch.zeros(weight.shape[0], dtype=dtype, device=device) if need_bias_grad else None,
        )
    if chunk_size is None:
        if sparse:  # the working set is the gathered [c, k, H] head rows
            per_token = k * hidden.shape[1] * hidden.element_size()
            chunk_size = int(min(MAX_CHUNK, max(MIN_CHUNK, tiles.TILE_BYTES // max(1, per_token))))
        else:  # one c x V tile, as one of the two of the dense fused loss
            chunk_size = default_chunk_size(
                weight.shape[0], torch.finfo(dtype).bits // 8, tiles.LINEAR_TILE_BYTES
            )
    student_scale = tiles.gemm_scales(options, temper_teacher=False)[0]
    tile_terms = _tile_chunk if tile_terms is None else tile_terms
    g_dtype = weight.dtype if grad_in_weight_dtype and grad_weights is not None and not sparse else None
    g_dtype = g_dtype if g_dtype in (torch.bfloat16, torch.float16) else None
    g_scale = None
    if g_dtype == torch.float16:
        g_scale = gradient_scale(options, *head_chain_rule(options.student_head, *grad_weights)[:2], g_dtype)
        grad_weights = tuple(None if w is None else w * g_scale for w in grad_weights)
    if not sparse and n > 0:
        # The logits tile and the scratch are allocated once and reused by every chunk.
        tile = torch.empty(min(n, chunk_size), weight.shape[0], dtype=dtype, device=device)
        # Row groups 8x larger than the dense loss's: each group also runs ~40 small [rows, k] ops.
        scratch = Scratch(tile.shape[0], weight.shape[0], dtype, device, 8 * tiles.GROUP_BYTES)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(n, start + chunk_size))
        chunk_weights = select_rows(grad_weights, rows)
        log_p = logprobs[rows].to(dtype)
        if sparse:
            divergence[rows] = _sparse_chunk(
                hidden[rows], weight, bias, ids[rows], log_p, options, chunk_weights, grads, rows,
                select_rows(valid, rows),
            )  # fmt: skip
            continue
        s = project(tile[: rows.stop - rows.start], hidden[rows], weight, bias, student_scale)
        extra = {"grad_out": s.view(g_dtype)[:, : s.shape[1]]} if g_dtype is not None else {}
        chunk_divergence, chunk_ce, grad = tile_terms(
            s,
            ids[rows],
            log_p,
            select_rows(labels, rows),
            options,
            support,
            chunk_weights,
            scratch,
            student_scale,
            select_rows(valid, rows),
            **extra,
        )
        divergence[rows] = chunk_divergence
        ce[rows] = chunk_ce
        if grad is not None:
            gradient_products(grad, hidden[rows], weight, grads, rows, dtype=dtype, g_scale=g_scale)
        del grad
    if grads is not None and g_scale is not None:  # exact: a power of two
        for grad in grads[1:]:
            if grad is not None:
                grad.div_(g_scale)
    return divergence, ce, grads


def _compact_stream(
    student_hidden,
    student_weight,
    student_bias,
    ids,
    logprobs,
    tokens: Tokens,
    options: KDOptions,
    support: SupportOptions,
    chunk_size,
    grad_weights=None,
    need_bias_grad=False,
    tile_terms: Callable | None = None,
):
    """`stream` over the tokens that count (`tokens`), per-token results scattered back to all N."""
    n = student_hidden.shape[0]
    divergence, ce, grads = stream(
        tokens.take(tokens.zero_ignored(student_hidden)),
        student_weight,
        student_bias,
        tokens.take(ids),
        tokens.take(logprobs),
        tokens.take(tokens.safe_labels),
        options,
        support,
        chunk_size,
        None if grad_weights is None else tuple(tokens.take(w) for w in grad_weights),
        need_bias_grad=need_bias_grad,
        valid=tokens.uncompacted_valid,
        tile_terms=tile_terms,
        grad_in_weight_dtype=tile_terms is not None,  # the tiles backend's kernels write G in 16 bits
    )
    divergence = torch.where(tokens.valid, tokens.put(divergence, n), 0.0)
    ce = torch.where(tokens.valid, tokens.put(ce, n), 0.0)
    if grads is not None:
        grads = (tokens.zero_ignored(tokens.put(grads[0], n)), grads[1], grads[2])
    return divergence, ce, grads


def fused_linear_topk_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    options: KDOptions,
    support: SupportOptions,
    *,
    chunk_size: int | None = None,
    tile_terms: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend entry point: checked, flattened inputs -> (loss, distill, ce), reduced per `options`.

    As `fusedkd._inputs.prepare_topk_kd` hands them: [N, H] hidden states, the [V, H] head, a [V] bias,
    [N, k] int64 ids and [N, k] log-probabilities, [N] int64 labels or None. `support.need_ce=False`
    skips the cross-entropy (returned as zeros) when neither the loss nor the caller uses it; with
    tail="renormalize" the loss then touches only the k head rows W_s[ids] per token. `tile_terms`: the
    per-chunk arithmetic of the tile path (`stream`); the tiles backend passes its Triton kernels here
    and its own chunk size.
    """

    def stream_chunks(tensors, tokens: Tokens, options: KDOptions, weights, needs):
        student_hidden, student_weight, student_bias, ids, logprobs, _ = tensors
        return _compact_stream(
            student_hidden,
            student_weight,
            student_bias,
            ids,
            logprobs,
            tokens,
            options,
            support,
            chunk_size,
            weights,
            need_bias_grad=student_bias is not None and needs[2],
            tile_terms=tile_terms,
        )

    loss = streamed.Streamed(stream_chunks, students=(0, 1, 2), labels=5)
    tensors = (student_hidden, student_weight, student_bias, ids.detach(), logprobs.detach(), labels)
    return streamed.run(loss, options, tensors)
