"""The PyTorch backend's tile arithmetic when each rank holds a block of the vocabulary (docs/design.md §10).

`sharded_tile_terms` takes the place of `tiles.kd_tile_terms` in the backend's chunk loops
(`fused_linear_kd.stream`, `kd_logits.stream`): a chunk's logit tiles are this rank's columns only, and the
per-token numbers every token's loss needs from the whole vocabulary cross the ranks in two small
collectives per chunk:

1. each rank's row maxima and log-sums of exponentials relative to them (and the label's logit, on the
   rank that owns it) are gathered, and every rank combines them in rank order into the global
   log-normalizers: log q = (s - M_s) / T - log Z_a, log p = (t - M_t) / T - log Z_b, exactly as on
   one device;
2. each rank's sums over its columns of the divergence's terms (p (log p - log q), or for the JSD both
   KL(p || m) and KL(q || m)) are gathered and summed in rank order: the per-token divergence, equal
   on every rank.

G = dloss/dlogits of this rank's columns then follows from those global numbers alone (the reverse KL
and the JSD need the per-token divergence of step 2): it stays on the rank, which multiplies it into
its rows of the weight gradient and into its share of the hidden-state gradient (summed over the ranks
by the caller, once per call).
"""

from __future__ import annotations

import math

import torch

from fusedkd._options import KDOptions, head_chain_rule
from fusedkd._shard import VocabShard
from fusedkd.torch_backend.tiles import fill_gradient_rows, finish_head

# Fields of the first gather: per token, each model's maximum and log-sum of exponentials relative to it.
_M_STUDENT, _LOGZ_STUDENT_T, _LOGZ_STUDENT_PLAIN, _M_TEACHER, _LOGZ_TEACHER_T, _LABEL_LOGIT = range(6)


def _row_max(x: torch.Tensor) -> torch.Tensor:
    """Each row's maximum; -inf for rows of no column (a rank whose block lies past the vocabulary)."""
    if x.shape[1] == 0:
        return x.new_full((x.shape[0],), -math.inf)
    return x.amax(dim=-1)


def _log_sum_exp(x: torch.Tensor, shift: torch.Tensor, scale: float) -> torch.Tensor:
    """log sum_v exp((x_v - shift) * scale) per row (-inf for no column)."""
    if x.shape[1] == 0:
        return x.new_full((x.shape[0],), -math.inf)
    return torch.logsumexp((x - shift[:, None]) * scale, dim=-1)


def combine_maxima(
    m: torch.Tensor, logz: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ranks' ([world, c]) maxima and log-sums of exponentials relative to them (times `scale`)
    merged in rank order: (M [c], log Z [c] relative to M, bad [c]). `bad` marks the rows that are not
    distributions (§9): a NaN or +inf entry on any rank (a NaN or +inf maximum, or a NaN log-sum), or
    every entry -inf; their M is 0 and their log Z is not to be used."""
    m = torch.where(torch.isnan(logz), math.nan, m)
    big = m.amax(dim=0)  # NaN and +inf propagate
    usable = torch.where(torch.isnan(m) | (m == math.inf), -math.inf, m)
    top = usable.amax(dim=0)
    top = torch.where(torch.isfinite(top), top, 0.0)
    shifted = torch.where(usable == -math.inf, -math.inf, logz + (usable - top) * scale)
    return top, torch.logsumexp(shifted, dim=0), ~torch.isfinite(big)


def sharded_tile_terms(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    options: KDOptions,
    grad_weights: tuple[torch.Tensor, torch.Tensor | None] | None,
    *,
    shard: VocabShard,
    teacher_tempered: bool = False,
    scratch=None,
    folded: tuple[float, float] = (1.0, 1.0),
    valid: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`tiles.kd_tile_terms` for tiles of this rank's vocabulary columns (`shard`): (divergence [c],
    ce [c], G [c, shard.rows] or None), the first two equal on every rank. `labels` are global vocabulary
    indices (safe: ignored rows hold any valid id); every other argument as for `kd_tile_terms`
    (`scratch` and `grad_out` are not used: G stays in the compute dtype, as on the PyTorch backend).
    Two gathers of a few numbers per token; every rank must call it with the same rows."""
    del scratch, grad_out
    T = options.temperature
    c = s.shape[0]
    want_grad = grad_weights is not None
    derivative = None
    if want_grad:  # the head transform's chain rule, from the tile before the transform
        w_distill, w_ce, derivative = head_chain_rule(
            options.student_head, *grad_weights, tile=s, folded=folded[0]
        )
    finish_head(s, folded[0], options.student_logit_scale, options.student_softcap, 1.0)
    finish_head(
        t, folded[1], options.teacher_logit_scale, options.teacher_softcap, T if teacher_tempered else 1.0
    )
    teacher_scale = 1.0 if teacher_tempered else 1.0 / T  # t * teacher_scale = t / T

    # 1. Each rank's maxima and log-sums, gathered and merged: the global log-normalizers.
    local = s.new_zeros(6, c)
    local[_M_STUDENT] = m_s = _row_max(s)
    local[_M_TEACHER] = m_t = _row_max(t)
    m_s_safe = torch.where(torch.isfinite(m_s), m_s, 0.0)
    m_t_safe = torch.where(torch.isfinite(m_t), m_t, 0.0)
    local[_LOGZ_STUDENT_T] = _log_sum_exp(s, m_s_safe, 1.0 / T)
    local[_LOGZ_TEACHER_T] = _log_sum_exp(t, m_t_safe, teacher_scale)
    separate_ce = labels is not None and T != 1.0
    if separate_ce:
        local[_LOGZ_STUDENT_PLAIN] = _log_sum_exp(s, m_s_safe, 1.0)
    owned = None
    if labels is not None:
        owned = shard.owned(labels)
        rows = torch.arange(c, device=s.device)
        picked = s[rows, (labels - shard.offset).clamp(0, max(0, shard.rows - 1))] if shard.rows else None
        if picked is not None:
            local[_LABEL_LOGIT] = torch.where(owned, picked, 0.0)
    gathered = shard.gather(local)
    big_m_s, logz_a, student_bad = combine_maxima(
        gathered[:, _M_STUDENT], gathered[:, _LOGZ_STUDENT_T], 1.0 / T
    )
    big_m_t, logz_b, teacher_bad = combine_maxima(
        gathered[:, _M_TEACHER], gathered[:, _LOGZ_TEACHER_T], teacher_scale
    )
    if valid is not None:  # ignored rows are never read: no value of theirs reaches an output
        student_bad &= valid
        teacher_bad &= valid
    distill_bad = student_bad | teacher_bad
    if separate_ce:
        _, logz_plain, _ = combine_maxima(gathered[:, _M_STUDENT], gathered[:, _LOGZ_STUDENT_PLAIN], 1.0)
    else:
        logz_plain = logz_a

    # 2. This rank's log-probabilities, its sums of the divergence's terms, gathered and summed.
    s.sub_(big_m_s[:, None])  # s - M_s: the cross-entropy's softmax is exp(s - M_s - log Z_plain)
    log_q = torch.mul(s, 1.0 / T).sub_(logz_a[:, None])
    log_p = t.sub_(big_m_t[:, None]).mul_(teacher_scale)
    log_p.sub_(logz_b[:, None])
    beta = options.beta
    sums = s.new_zeros(2, c)
    if options.divergence == "forward_kl":
        p = log_p.exp()
        sums[0] = _weighted_sum(p, log_p - log_q)
    elif options.divergence == "reverse_kl":
        q = log_q.exp()
        sums[0] = _weighted_sum(q, log_q - log_p)
    else:
        log_m = torch.logaddexp(log_p + _log(beta), log_q + _log(1.0 - beta))
        p, q = log_p.exp(), log_q.exp()
        sums[0] = _weighted_sum(p, log_p - log_m)
        sums[1] = _weighted_sum(q, log_q - log_m)
    totals = shard.gather(sums).sum(dim=0)
    if options.divergence == "jsd":
        divergence = beta * totals[0] + (1.0 - beta) * totals[1]
    else:
        divergence = totals[0]
    if labels is None:
        ce = torch.zeros_like(divergence)
    else:  # C = log Z_plain + M_s - s_y
        label_logit = gathered[:, _LABEL_LOGIT].sum(dim=0)
        ce = logz_plain - (label_logit - big_m_s)
        ce = ce.masked_fill(student_bad, math.nan)
    divergence = divergence.masked_fill(distill_bad, math.nan)
    if valid is not None:
        divergence = divergence.masked_fill(~valid, 0.0)
        ce = ce.masked_fill(~valid, 0.0)
    if not want_grad:
        return divergence, ce, None

    # G of this rank's columns, from the global numbers (docs/design.md §4), with respect to z (the
    # weights carry the logit scale, `derivative` the soft cap's factor).
    if options.divergence == "forward_kl":  # (q - p) / T
        grad = log_q.exp_().sub_(p)
    elif options.divergence == "reverse_kl":  # q (log q - log p - D) / T
        grad = _centred(q, log_q - log_p, divergence)
    else:  # (1 - beta) q (log q - log m - KL(q || m)) / T
        grad = _centred(q, log_q - log_m, totals[1]).mul_(1.0 - beta)
    grad.mul_((w_distill / T)[:, None])
    if labels is not None and w_ce is not None:  # softmax(s) - onehot(y), at T = 1
        grad.add_(torch.exp(s.sub_(logz_plain[:, None])).mul_(w_ce[:, None]))
        if owned is not None and shard.rows:  # the one-hot, on the label's owner (no host sync)
            column = (labels - shard.offset).clamp(0, shard.rows - 1)[:, None]
            grad.scatter_add_(1, column, torch.where(owned, -w_ce, 0.0)[:, None].to(grad.dtype))
    if derivative is not None:
        grad.mul_(derivative)
    fill_gradient_rows(grad, distill_bad, valid)
    return divergence, ce, grad


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _weighted(weight: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """weight * log_ratio, 0 where the weight is 0 (0 log 0 = 0, even where the log-ratio is infinite); a
    NaN weight stays NaN (§9)."""
    return torch.where(weight == 0, 0.0, log_ratio).mul_(weight)


def _centred(q: torch.Tensor, log_ratio: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """q (log_ratio - mean), the log-ratio taken as 0 where q is 0: there the term is q * -mean, which is 0,
    or NaN when `mean` (the token's divergence) is infinite, as one device gives (§9)."""
    return torch.where(q == 0, 0.0, log_ratio).sub_(mean[:, None]).mul_(q)


def _weighted_sum(weight: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    return _weighted(weight, log_ratio).sum(dim=-1)
