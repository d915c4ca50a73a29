r"""Sparse top-k teacher for offline distillation: `teacher_topk` and `fused_linear_topk_kd_loss`.

`teacher_topk` runs the teacher's lm_head once, block by block over the vocabulary, and keeps each
token's k most likely ids and their log-probabilities, normalized over the full vocabulary (a running
top-k merge and an online log-sum-exp; no ``[N, V]`` tensor). They can be stored compactly
(`fusedkd.topk_cache`) and later distilled into a student with `fused_linear_topk_kd_loss`, which
fuses the student's lm_head with its full-vocabulary log-sum-exp and compares the two distributions on
the teacher's support.

The divergence on a top-k support K (ids of one token, log-probabilities log p_j, j in K), with
q = softmax(s / T) the student's full-vocabulary distribution (DESIGN.md §2 for the rest):

* ``tail="bucket"``: all tokens outside K are merged into one extra outcome, the tail, with the
  teacher's mass p_tail = max(1 - sum_K p_j, tau) and the student's q_tail = sum_{v not in K} q_v
  (computed as such, never as 1 - sum_K q_j). D is the exact KL between these coarse-grained
  distributions over k + 1 outcomes:
      forward_kl: D = sum_K p_j log(p_j / q_j) + p_tail log(p_tail / q_tail)
      reverse_kl: D = sum_K q_j log(q_j / p_j) + q_tail log(q_tail / p_tail)
  tau = eps (1 + sum_K p_j |log p_j|), with eps the relative precision of the log-probabilities (their
  dtype's eps, at least float32's), bounds the rounding error of 1 - sum_K p_j: a tail that small is
  not resolved by the data. The floor keeps reverse KL finite when the listed mass rounds to 1 (a
  confident teacher, or renormalized log-probabilities) and changes forward KL by O(tau).
  By the chain rule of KL, D is the full KL minus the teacher-weighted KL inside the tail, so it does
  not exceed the dense loss, and it equals the dense loss when k = V (there is no tail outcome then).
* ``tail="renormalize"``: both distributions are restricted to K and renormalized,
  p^_j = p_j / sum_K p, q^_j = q_j / sum_K q, and D = KL(p^ || q^) (forward) or KL(q^ || p^)
  (reverse). The student's probability outside K gets no gradient; equal to the dense loss when k = V.

The gradients (per token, before the reduction scale; a = s / T, log q_j = a_j - LSE(a)):

    bucket, forward:  dD/ds_v = (M_p q_v - p_v) / T (v in K),  q_v (M_p - p_tail / q_tail) / T (v not in K)
                      with M_p = sum_K p_j + p_tail (1 up to rounding and tau)
    bucket, reverse:  dD/ds_v = q_v (log q~_v - log p~_v - D) / T, where ~ is the outcome of v
                      (v itself in K, the tail outside)
    renormalize:      dD/ds_v = (q^_v - p^_v) / T (forward), q^_v (log q^_v - log p^_v - D) / T
                      (reverse) for v in K, and 0 outside K
    cross-entropy:    dC/ds_v = softmax(s)_v - [v == y]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fusedkd import chunked
from fusedkd._inputs import (
    autocast_cast,
    autocast_dtype,
    check_bias,
    check_devices,
    check_float,
    check_labels,
    check_options,
    check_same_dtype,
    check_tensor,
    check_values,
    contiguous,
    first_rows,
    resolve_vocab_size,
)
from fusedkd._options import KDOptions, check_choice, check_temperature
from fusedkd.chunked import (
    Scratch,
    _has_ce_grad,
    _logits,
    _reduce,
    _Tokens,
    compute_dtype,
    default_chunk_size,
    select_rows,
)
from fusedkd.loss import BACKENDS

TOPK_DIVERGENCES = ("forward_kl", "reverse_kl")
TAILS = ("bucket", "renormalize")
MIN_CHUNK, MAX_CHUNK = 8, 4096


# ----------------------------------------------------------------------------------------------------
# teacher_topk
# ----------------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _order_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is (value descending, id ascending): the top-k tie rule, made exact.

    The float32 value's bits become an int32 with the same order (negative floats have their magnitude
    bits flipped; -0.0 is first made +0.0), placed above 32 bits that decrease with the id.
    """
    bits = (values + 0.0).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(torch.int64) << 32) | (0xFFFFFFFF - ids)


def _top(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k entries of each row first in (value descending, id ascending) order, in that order.

    `ids` [c, w] or [w] (broadcast). float32 uses exact int64 keys and one topk; float64 a stable sort
    of the values, whose equal entries then keep the increasing-id order of their columns.
    """
    ids = ids.expand_as(values)
    if values.dtype == torch.float32:
        _, order = torch.topk(_order_keys(values, ids), k, dim=-1, sorted=True)
    else:
        increasing = torch.argsort(ids, dim=-1, stable=True)
        values, ids = values.gather(-1, increasing), ids.gather(-1, increasing)
        order = torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]
    return values.gather(-1, order), ids.gather(-1, order)


def _block_top(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_top(values, ids, k)` for a [c, w] block of logits with `ids` [w], without keys for every entry.

    A plain top-k finds the k largest values; the tie rule only decides their order, done on the k,
    unless the k-th value is tied with an entry left out (more than k entries at or above it in a
    row): then, and for NaN rows, the block takes the exact rule over all its entries. Deciding that
    costs one host synchronization per block on an accelerator (`teacher_topk` runs offline, once).
    """
    top_values, positions = torch.topk(values, k, dim=-1, sorted=False)
    kth = top_values.amin(dim=-1, keepdim=True)
    if bool(((values >= kth).sum(-1) != k).any()):
        return _top(values, ids, k)
    return _top(top_values, ids[positions], k)


def teacher_topk(
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    *,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    block_size: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The teacher's k most likely tokens and their log-probabilities, without ``[N, V]`` logits.

    Equals ``torch.topk(torch.log_softmax((h W^T + b) / T, -1), k)``: the log-probabilities are
    normalized over the full vocabulary. The vocabulary is streamed in blocks of ``block_size`` rows of
    the head (a running top-k merge and an online log-sum-exp), for token chunks of ``chunk_size``: the
    working set is ``chunk x block`` logits. No gradient is computed (the teacher is frozen).

    Ties are broken deterministically: the ids come in order of decreasing log-probability and, among
    equal log-probabilities, of increasing id; the set is the first k in that order (what a stable
    descending sort of the whole row would give).

    Args:
        teacher_hidden: ``[..., H]`` float32 / bfloat16 / float16 / float64 final hidden states.
        teacher_weight: ``[V_t, H]`` lm_head weight, same dtype.
        k: how many tokens to keep per position, ``1 <= k <= V``.
        temperature: the softmax temperature ``T > 0``; distill with the same ``temperature``.
        vocab_size: use only the first ``vocab_size`` rows of the head (a padded head).
        teacher_bias: optional ``[V_t]`` lm_head bias.
        chunk_size: tokens per chunk (default: sized so that a ``chunk x block`` float32 tile is about
            `fusedkd.chunked.TILE_BYTES`).
        block_size: vocabulary rows per block (default 8192).

    Returns:
        ``(ids, logprobs)``: ``[..., k]`` int64 token ids and ``[..., k]`` log-probabilities, float32
        (float64 for float64 inputs), sorted by decreasing log-probability.

    Example:
        >>> import torch
        >>> from fusedkd.topk import teacher_topk
        >>> hidden, weight = torch.randn(2, 5, 16), torch.randn(1000, 16)
        >>> ids, logprobs = teacher_topk(hidden, weight, k=8, temperature=2.0)
        >>> ids.shape, logprobs.dtype
        (torch.Size([2, 5, 8]), torch.float32)
        >>> exact = torch.log_softmax(hidden @ weight.T / 2.0, dim=-1).topk(8)
        >>> torch.allclose(logprobs, exact.values, atol=1e-5)
        True
    """
    check_tensor("teacher_hidden", teacher_hidden, min_ndim=1)
    check_tensor("teacher_weight", teacher_weight, ndim=2)
    check_float("teacher_hidden", teacher_hidden)
    check_float("teacher_weight", teacher_weight)
    cast = autocast_dtype(teacher_hidden.device)
    teacher_hidden, teacher_weight, teacher_bias = (
        autocast_cast(x, cast) for x in (teacher_hidden, teacher_weight, teacher_bias)
    )
    check_same_dtype("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
    teacher_bias = check_bias("teacher_bias", teacher_bias, "teacher_weight", teacher_weight)
    check_devices(
        {"teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight, "teacher_bias": teacher_bias}
    )
    if teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"teacher_weight must be [vocab, {teacher_hidden.shape[-1]}] to match teacher_hidden's hidden "
            f"size; got {tuple(teacher_weight.shape)}"
        )
    vocab = resolve_vocab_size(vocab_size, {"teacher_weight": teacher_weight.shape[0]})
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, vocabulary size = {vocab}], got k={k}")
    temperature = check_temperature(temperature)
    block_size = _check_positive_int("block_size", block_size)
    block = min(max(block_size, k), vocab)  # a block holds at least k entries, so one topk fills the list
    if chunk_size is None:
        chunk_size = int(min(MAX_CHUNK, max(MIN_CHUNK, chunked.TILE_BYTES // (4 * block))))
    chunk_size = _check_positive_int("chunk_size", chunk_size)

    leading_shape = teacher_hidden.shape[:-1]
    hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    weight = teacher_weight.detach()
    bias = None if teacher_bias is None else teacher_bias.detach()
    dtype = compute_dtype(hidden.dtype)
    n, device = hidden.shape[0], hidden.device
    ids = torch.empty(n, k, dtype=torch.int64, device=device)
    logprobs = torch.empty(n, k, dtype=dtype, device=device)
    block_ids = torch.arange(block, device=device)
    # One logits buffer, reused by every block of every chunk (a block's tile is a contiguous prefix).
    buffer = torch.empty(min(n, chunk_size) * block, dtype=dtype, device=device)
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            rows = slice(start, min(n, start + chunk_size))
            top_values = top_ids = lse = None
            for v0 in range(0, vocab, block):
                v1 = min(vocab, v0 + block)
                # b = (h W^T + bias) / T for this block.
                count = rows.stop - rows.start
                b = _scaled_logits(
                    buffer[: count * (v1 - v0)].view(count, v1 - v0),
                    hidden[rows],
                    weight[v0:v1],
                    None if bias is None else bias[v0:v1],
                    temperature,
                )
                # Running top-k: the block's first k, then the first k of (kept so far, block's).
                values, value_ids = _block_top(b, block_ids[: v1 - v0] + v0, min(k, v1 - v0))
                # Online log-sum-exp over blocks: LSE = logaddexp(LSE_so_far, LSE(block)), the block's
                # in place (b is not used after).
                block_max = _finite(b.amax(dim=-1, keepdim=True))
                block_lse = b.sub_(block_max).exp_().sum(-1).log_().add_(block_max[:, 0])
                lse = block_lse if lse is None else torch.logaddexp(lse, block_lse)
                if top_values is not None:
                    values, value_ids = _top(
                        torch.cat([top_values, values], dim=-1), torch.cat([top_ids, value_ids], dim=-1), k
                    )
                top_values, top_ids = values, value_ids
            ids[rows] = top_ids
            logprobs[rows] = top_values - lse[:, None]  # log p = b - LSE(b)
    return ids.reshape(*leading_shape, k), logprobs.reshape(*leading_shape, k)


def _scaled_logits(
    out: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """out <- (hidden @ weight.T + bias) / T, `out` a contiguous tile in the compute dtype (the GEMM in
    the inputs' dtype, as the losses do)."""
    if weight.dtype == out.dtype:
        if bias is None:
            torch.mm(hidden, weight.T, out=out)
        else:
            torch.addmm(bias, hidden, weight.T, out=out)
    else:
        out.copy_(hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T))
    return out.div_(temperature) if temperature != 1.0 else out


# ----------------------------------------------------------------------------------------------------
# fused_linear_topk_kd_loss: checks
# ----------------------------------------------------------------------------------------------------


@dataclass
class TopKKDInputs:
    """Checked, flattened inputs of `fused_linear_topk_kd_loss`."""

    student_hidden: torch.Tensor  # [N, H]
    student_weight: torch.Tensor  # [V, H] (the first V rows)
    student_bias: torch.Tensor | None  # [V]
    ids: torch.Tensor  # [N, k] int64, distinct per row, in [0, V)
    logprobs: torch.Tensor  # [N, k], <= 0, as given (any float dtype)
    labels: torch.Tensor | None  # [N] int64
    leading_shape: torch.Size
    options: KDOptions
    tail: str


def prepare_topk_kd(
    student_hidden,
    student_weight,
    ids,
    logprobs,
    labels,
    *,
    divergence: str,
    temperature: float,
    alpha: float,
    ignore_index: int,
    reduction: str,
    tail: str,
    student_bias,
    vocab_size: int | None,
) -> TopKKDInputs:
    """Check every argument of `fused_linear_topk_kd_loss` before any work; raise naming the argument."""
    check_tensor("student_hidden", student_hidden, min_ndim=1)
    check_tensor("student_weight", student_weight, ndim=2)
    check_float("student_hidden", student_hidden)
    check_float("student_weight", student_weight)
    cast = autocast_dtype(student_hidden.device)
    student_hidden, student_weight, student_bias = (
        autocast_cast(x, cast) for x in (student_hidden, student_weight, student_bias)
    )
    check_same_dtype("student_hidden", student_hidden, "student_weight", student_weight)
    student_bias = check_bias("student_bias", student_bias, "student_weight", student_weight)
    check_tensor("ids", ids, min_ndim=1)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor (int64 or int32), got {ids.dtype}")
    check_tensor("logprobs", logprobs, min_ndim=1)
    check_float("logprobs", logprobs)
    if labels is not None:
        check_tensor("labels", labels)
    check_devices(
        {
            "student_hidden": student_hidden,
            "student_weight": student_weight,
            "ids": ids,
            "logprobs": logprobs,
            "labels": labels,
            "student_bias": student_bias,
        }
    )
    if student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(
            f"student_weight must be [vocab, {student_hidden.shape[-1]}] to match student_hidden's hidden "
            f"size; got {tuple(student_weight.shape)}"
        )
    leading_shape = student_hidden.shape[:-1]
    if ids.shape[:-1] != leading_shape:
        raise ValueError(
            f"ids must be [..., k] with the leading shape of student_hidden, {tuple(leading_shape)}; "
            f"got {tuple(ids.shape)}"
        )
    if logprobs.shape != ids.shape:
        raise ValueError(
            f"logprobs must have the shape of ids, {tuple(ids.shape)}; got {tuple(logprobs.shape)}"
        )
    vocab = resolve_vocab_size(vocab_size, {"student_weight": student_weight.shape[0]})
    k = ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"ids lists k={k} tokens per position; k must be in [1, vocabulary size = {vocab}]")
    options = check_options(
        divergence=divergence,
        beta=0.5,
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index,
        reduction=reduction,
        vocab_size=vocab,
        has_labels=labels is not None,
        divergences=TOPK_DIVERGENCES,
    )
    check_choice("tail", tail, TAILS)
    flat_labels = (
        None
        if labels is None
        else check_labels(labels, leading_shape, vocab, ignore_index, shape_name="student_hidden")
    )
    flat_ids = ids.reshape(-1, k).long()
    flat_logprobs = logprobs.reshape(-1, k)
    _check_topk_values(flat_ids, flat_logprobs, vocab)
    return TopKKDInputs(
        student_hidden=student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_weight=student_weight if student_weight.shape[0] == vocab else student_weight[:vocab],
        student_bias=contiguous(first_rows(student_bias, vocab)),
        ids=flat_ids,
        logprobs=flat_logprobs,
        labels=flat_labels,
        leading_shape=leading_shape,
        options=options,
        tail=tail,
    )


def _check_topk_values(ids: torch.Tensor, logprobs: torch.Tensor, vocab: int) -> None:
    """ids in [0, V) and distinct per token; logprobs <= 0 (no NaN) with a mass of at most 1 (+ rounding).

    Four reductions over [N, k], so that bad data is an error, not a NaN: eager on a CPU, asynchronous
    device-side assertions on an accelerator (no host sync, `check_values`).
    """
    if ids.numel() == 0:
        return
    out_of_range = (ids < 0) | (ids >= vocab)
    check_values(
        out_of_range, f"ids must be token ids in [0, {vocab})", lambda: f"found {ids[out_of_range][0].item()}"
    )
    ordered = ids.sort(dim=-1).values
    repeated = ordered[:, 1:] == ordered[:, :-1]

    def repeated_found() -> str:
        token, position = repeated.nonzero()[0].tolist()
        return f"position {token} lists id {ordered[token, position].item()} twice"

    check_values(repeated, "ids must list k distinct tokens per position", repeated_found)
    not_log_prob = ~(logprobs <= 0)  # also catches NaN
    check_values(
        not_log_prob,
        "logprobs must be log-probabilities (<= 0, not NaN)",
        lambda: f"found {logprobs[not_log_prob][0].item()}",
    )
    # Their mass sum_j exp(logprobs_j) is at most 1, up to the rounding of the stored dtype.
    tolerance = 1e-6 + 4 * torch.finfo(logprobs.dtype).eps * max(1.0, math.log(ids.shape[-1]))
    mass = torch.logsumexp(logprobs.float(), dim=-1).exp()
    check_values(
        mass > 1 + tolerance,
        "logprobs must be log-probabilities normalized over the full vocabulary (log softmax, not logits)",
        lambda: f"the listed probabilities of a position sum to {mass.max().item():.6g} > 1",
    )


# ----------------------------------------------------------------------------------------------------
# fused_linear_topk_kd_loss: the token-chunked PyTorch backend
# ----------------------------------------------------------------------------------------------------


def _xlogy_ratio(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """x (log x - log y), and 0 where x = 0 (whatever log y is)."""
    return torch.where(x > 0, x * (log_x - log_y), torch.zeros_like(x))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0, accurate near 0 and far below; -inf for x >= 0."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass(frozen=True)
class SupportOptions:
    """How the sparse loss treats the teacher's support, after validation.

    `tail`: "bucket" or "renormalize". `precision`: the relative precision eps of the teacher's
    log-probabilities (bucket: the teacher's tail mass is never taken below the rounding error of
    1 - sum_K p, see `tail_precision`). `need_ce`: whether the cross-entropy is computed at all.
    """

    tail: str
    precision: float
    need_ce: bool


def tail_precision(logprobs_dtype: torch.dtype, compute: torch.dtype) -> float:
    """eps of the coarser of the logprobs' dtype and the compute dtype.

    Log-probabilities known to a relative precision eps give 1 - sum_K p_j to within
    tau = eps (1 + sum_K p_j |log p_j|); tail="bucket" takes p_tail = max(1 - sum_K p_j, tau).
    """
    return max(torch.finfo(logprobs_dtype).eps, torch.finfo(compute).eps)


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


def _finite(x: torch.Tensor) -> torch.Tensor:
    """x, with -inf (an empty set's log-sum-exp, a row of -inf's maximum) replaced by 0."""
    return x.masked_fill(x == -math.inf, 0.0)


def _tile_chunk(
    s: torch.Tensor,
    ids: torch.Tensor,
    log_p: torch.Tensor,
    labels: torch.Tensor | None,
    options: KDOptions,
    support: SupportOptions,
    grad_weights: tuple[torch.Tensor, torch.Tensor | None] | None,
    scratch: Scratch,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One token chunk through its `c x V` student logits tile `s`, which it overwrites:
    (divergence [c], ce [c], G [c, V] (in `s`) or None).

    `labels` are safe (ignored rows hold a valid id; their weights are 0). G = w_distill dD/ds + w_ce dC/ds.
    The element-wise passes run on groups of `scratch.rows` rows, in place (as `chunked.kd_tile_terms`).
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
) -> None:
    """`_tile_chunk` on one group of rows; G, when wanted, is left in `s`."""
    T = options.temperature
    n = s.shape[0]
    want_grad = grad_weights is not None
    w_distill, w_ce = grad_weights if want_grad else (None, None)
    rows = torch.arange(n, device=s.device)

    s.sub_(_finite(s.amax(dim=-1, keepdim=True)))  # relative to the row maximum (DESIGN.md §6)
    plain = z_plain = None
    ce_out.zero_()
    if support.need_ce and labels is not None:
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
        tail_max = _finite(s.amax(dim=-1, keepdim=True))
        tail = s.sub_(tail_max).exp_()  # exp(a - max over the tail), 0 on K
        z_tail = tail.sum(-1)
        lse_tail = z_tail.log() + tail_max[:, 0]  # -inf when k = V
        terms = _bucket_terms(
            a_support, lse_tail, log_p, options.divergence, full_support, support.precision, want_grad
        )
        divergence_out.copy_(terms.divergence)
        if not want_grad:
            return
        # Outside K: r_v c_tail with r = softmax over the tail (0 on K).
        safe_z_tail = torch.where(z_tail > 0, z_tail, torch.ones_like(z_tail))
        grad = tail.mul_((w_distill / T * terms.c_tail / safe_z_tail)[:, None])
    else:
        terms = _renormalized_terms(a_support, log_p, options.divergence, want_grad)
        divergence_out.copy_(terms.divergence)
        if not want_grad:
            return
        grad = s.zero_()
    if plain is not None and w_ce is not None:
        grad.addcmul_(plain, (w_ce / z_plain)[:, None])
        grad[rows, labels] -= w_ce
    grad.scatter_add_(1, ids, terms.g_support.mul_((w_distill / T)[:, None]))


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
    a_support = s_support.to(dtype) / T
    terms = _renormalized_terms(a_support, log_p, options.divergence, grads is not None)
    if grads is not None:
        grad_hidden, grad_weight, grad_bias = grads
        g_support = terms.g_support.mul_((grad_weights[0] / T)[:, None])  # [c, k]
        grad_hidden[rows] = torch.bmm(g_support.to(weight.dtype)[:, None, :], support_weight)[:, 0]
        flat_ids = ids.reshape(-1)
        outer = (g_support[:, :, None] * hidden.to(dtype)[:, None, :]).reshape(-1, hidden.shape[1])
        grad_weight.index_add_(0, flat_ids, outer)
        if grad_bias is not None:
            grad_bias.index_add_(0, flat_ids, g_support.reshape(-1))
    return terms.divergence


def _stream(
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
):
    """Stream over token chunks. Returns (divergence [N], ce [N], grads or None).

    grads = (grad_hidden [N, H] input dtype, grad_weight [V, H] compute dtype, grad_bias [V] or None).
    """
    n, k = ids.shape
    dtype = compute_dtype(hidden.dtype)
    device = hidden.device
    divergence = torch.zeros(n, dtype=dtype, device=device)
    ce = torch.zeros(n, dtype=dtype, device=device)
    grads = None
    sparse = support.tail == "renormalize" and not support.need_ce
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
            chunk_size = int(min(MAX_CHUNK, max(MIN_CHUNK, chunked.TILE_BYTES // max(1, per_token))))
        else:  # one c x V tile, as one of the two of the dense fused loss
            chunk_size = default_chunk_size(
                weight.shape[0], torch.finfo(dtype).bits // 8, chunked.LINEAR_TILE_BYTES
            )
    if not sparse and n > 0:
        # The logits tile and the scratch are allocated once and reused by every chunk.
        tile = torch.empty(min(n, chunk_size), weight.shape[0], dtype=dtype, device=device)
        # Row groups 8x larger than the dense loss's: each group also runs ~40 small [rows, k] ops.
        scratch = Scratch(tile.shape[0], weight.shape[0], dtype, device, 8 * chunked.GROUP_BYTES)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(n, start + chunk_size))
        chunk_weights = select_rows(grad_weights, rows)
        log_p = logprobs[rows].to(dtype)
        if sparse:
            divergence[rows] = _sparse_chunk(
                hidden[rows], weight, bias, ids[rows], log_p, options, chunk_weights, grads, rows
            )
            continue
        s = _logits(tile[: rows.stop - rows.start], hidden[rows], weight, bias)
        chunk_divergence, chunk_ce, grad = _tile_chunk(
            s,
            ids[rows],
            log_p,
            select_rows(labels, rows),
            options,
            support,
            chunk_weights,
            scratch,
        )
        divergence[rows] = chunk_divergence
        ce[rows] = chunk_ce
        if grad is not None:
            grad_hidden, grad_weight, grad_bias = grads
            if weight.dtype == grad.dtype:
                torch.mm(grad, weight, out=grad_hidden[rows])
            else:
                grad_hidden[rows] = grad.to(weight.dtype) @ weight
            if start == 0:
                torch.mm(grad.T, hidden[rows].to(dtype), out=grad_weight)
            else:
                grad_weight.addmm_(grad.T, hidden[rows].to(dtype))
            if grad_bias is not None:
                grad_bias.add_(grad.sum(0))
        del grad
    return divergence, ce, grads


class _TopKKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        student_bias,
        ids,
        logprobs,
        labels,
        options: KDOptions,
        support: SupportOptions,
        chunk_size: int | None,
    ):
        n = student_hidden.shape[0]
        dtype = compute_dtype(student_hidden.dtype)
        tokens = _Tokens(labels, options, n, student_hidden.device)
        scale = tokens.reduction_scale(options, dtype)
        valid = tokens.valid.to(dtype)
        grad_weights = None
        if options.reduction != "none":  # form the gradient now, for an output gradient of 1
            grad_weights = (
                tokens.take(valid * (options.distill_weight * scale)),
                tokens.take(valid * (options.ce_weight * scale)) if _has_ce_grad(options, None) else None,
            )
        divergence, ce, grads = _stream(
            tokens.take(student_hidden),
            student_weight,
            student_bias,
            tokens.take(ids),
            tokens.take(logprobs),
            tokens.take(tokens.safe_labels),
            options,
            support,
            chunk_size,
            grad_weights,
            need_bias_grad=student_bias is not None and ctx.needs_input_grad[2],
        )
        divergence = tokens.put(divergence, n) * valid
        ce = tokens.put(ce, n) * valid
        loss = options.distill_weight * divergence + options.ce_weight * ce

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(student_hidden, student_weight, student_bias, ids, logprobs, labels)
        ctx.options, ctx.support, ctx.chunk_size, ctx.scale = options, support, chunk_size, scale
        ctx.eager_grads = None if grads is None else (tokens.put(grads[0], n), grads[1], grads[2])
        return tuple(_reduce(x, options, scale) for x in (loss, divergence, ce))

    @staticmethod
    def backward(ctx, grad_loss, grad_divergence, grad_ce):
        student_hidden, student_weight, student_bias, ids, logprobs, labels = ctx.saved_tensors
        options: KDOptions = ctx.options
        wanted = ctx.needs_input_grad
        if grad_loss is None and grad_divergence is None and grad_ce is None:
            return (None,) * len(wanted)
        if ctx.eager_grads is not None and grad_divergence is None and grad_ce is None:
            # Formed in the forward for an output gradient of 1: scale (once; a second backward through a
            # retained graph recomputes below).
            grads = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.eager_grads)
            ctx.eager_grads = None
        else:
            n = student_hidden.shape[0]
            dtype = compute_dtype(student_hidden.dtype)
            tokens = _Tokens(labels, options, n, student_hidden.device)
            zero = torch.zeros((), dtype=dtype, device=student_hidden.device)
            g_loss, g_div, g_ce = (
                zero if g is None else g.to(dtype) for g in (grad_loss, grad_divergence, grad_ce)
            )
            valid = tokens.valid.to(dtype)
            w_distill = (g_loss * options.distill_weight + g_div) * ctx.scale * valid
            w_ce = (g_loss * options.ce_weight + g_ce) * ctx.scale * valid
            w_distill, w_ce = (tokens.take(w.expand(n).contiguous()) for w in (w_distill, w_ce))
            _, _, grads = _stream(
                tokens.take(student_hidden),
                student_weight,
                student_bias,
                tokens.take(ids),
                tokens.take(logprobs),
                tokens.take(tokens.safe_labels),
                options,
                ctx.support,
                ctx.chunk_size,
                (w_distill, w_ce if _has_ce_grad(options, grad_ce) else None),
                need_bias_grad=student_bias is not None and wanted[2],
            )
            grads = (tokens.put(grads[0], n), grads[1], grads[2])
        grad_hidden, grad_weight, grad_bias = grads
        by_input = {
            0: grad_hidden,
            1: None if grad_weight is None else grad_weight.to(student_weight.dtype),
            2: None if grad_bias is None else grad_bias.to(student_bias.dtype),
        }
        return tuple(by_input.get(i) if wanted[i] else None for i in range(len(wanted)))


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch backend: checked, flattened inputs -> (loss, distill, ce), reduced per `options`.

    `support.need_ce=False` skips the cross-entropy (returned as zeros) when neither the loss nor the
    caller uses it; with tail="renormalize" the loss then touches only the k head rows W_s[ids] per token.
    """
    if chunk_size is not None:
        _check_positive_int("chunk_size", chunk_size)
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)
    )
    ids, logprobs = ids.detach(), logprobs.detach()
    if needs_grad:
        return _TopKKDFunction.apply(
            student_hidden,
            student_weight,
            student_bias,
            ids,
            logprobs,
            labels,
            options,
            support,
            chunk_size,
        )
    with torch.no_grad():
        return _TopKKDFunction.apply(
            student_hidden,
            student_weight,
            student_bias,
            ids,
            logprobs,
            labels,
            options,
            support,
            chunk_size,
        )


# ----------------------------------------------------------------------------------------------------
# Public loss and module
# ----------------------------------------------------------------------------------------------------


def _resolve_topk_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "triton":
        raise ValueError(
            "fused_linear_topk_kd_loss has no Triton kernel: use backend='torch' or 'auto' (the "
            "token-chunked PyTorch backend, on any device)"
        )
    return "torch"


def fused_linear_topk_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    tail: str = "bucket",
    student_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    backend: str = "auto",
    return_components: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Distillation loss against a sparse top-k teacher (offline distillation), fused with the lm_head.

    The teacher is given by its top-k token ``ids`` and their ``logprobs`` (log p_T, normalized over
    the full vocabulary at the same ``temperature``: `teacher_topk`, or a `fusedkd.topk_cache`). The
    student's logits ``s = W_s h + b_s`` are never held as an ``[N, V]`` tensor. For every token ``i``
    whose label is not ``ignore_index``::

        q = softmax(s / T)     loss_i = alpha * T^2 * D + (1 - alpha) * C,    C = LSE(s) - s_y

    with ``C`` the hard-label cross-entropy on the student's full vocabulary at T = 1, and ``D`` on the
    teacher's support K (p_j = exp(logprobs_j)):

    * ``tail="bucket"``: the tokens outside K form one outcome, with masses p_tail = max(1 - sum_K p,
      tau) and q_tail = sum_{v not in K} q_v; forward KL ``D = sum_K p_j log(p_j / q_j) + p_tail log(p_tail
      / q_tail)``, reverse KL ``D = sum_K q_j log(q_j / p_j) + q_tail log(q_tail / p_tail)``: the exact KL
      between the coarse-grained distributions (k + 1 outcomes), equal to the dense loss when k = V.
      tau = eps (1 + sum_K p_j |log p_j|), eps the logprobs' dtype's precision (at least float32's), is
      the rounding error of 1 - sum_K p: a tail too small for the data to resolve (it keeps reverse KL
      finite for a confident teacher).
    * ``tail="renormalize"``: ``D = KL(p^ || q^)`` (forward) or ``KL(q^ || p^)`` (reverse) between the
      distributions restricted to K and renormalized; tokens outside K get no distillation gradient.
      Without cross-entropy (``alpha=1``) the loss touches only the k head rows ``W_s[ids]`` per token.

    Reductions, ignored tokens, components and ``labels=None`` work as in `fused_linear_kd_loss`.

    Args:
        student_hidden: ``[..., H]`` float32 / bfloat16 / float16 / float64 student hidden states.
        student_weight: ``[V_s, H]`` student lm_head weight, same dtype; receives a gradient.
        ids: ``[..., k]`` integer teacher token ids (int64 or int32), distinct per position, in [0, V).
        logprobs: ``[..., k]`` teacher log-probabilities of ``ids`` (<= 0, any float dtype).
        labels: ``[...]`` integer targets (already shifted); ``None`` means no cross-entropy, every token
            counts, and requires ``alpha == 1``.
        divergence: ``"forward_kl"`` or ``"reverse_kl"``.
        temperature: ``T > 0`` of the student softmax in ``D``; must be the teacher's ``temperature``.
        alpha: weight in [0, 1] of ``T^2 D``; ``1 - alpha`` weights the cross-entropy.
        ignore_index: label value of ignored tokens.
        reduction: ``"mean"`` (over valid tokens; 0 when none), ``"sum"`` or ``"none"``.
        tail: ``"bucket"`` or ``"renormalize"`` (above).
        student_bias: optional ``[V_s]`` lm_head bias.
        vocab_size: use only the first ``vocab_size`` rows of the head (padded heads).
        backend: ``"auto"`` or ``"torch"`` (token-chunked PyTorch on any device; there is no Triton
            kernel for this loss, and ``"triton"`` raises).
        return_components: also return ``(loss, distill, ce)`` with
            ``loss = alpha * T^2 * distill + (1 - alpha) * ce``.
        chunk_size: tokens per chunk (default: one ``chunk x V`` float32 tile of
            `fusedkd.chunked.LINEAR_TILE_BYTES`, 64 MiB; with ``tail="renormalize"`` and no
            cross-entropy, gathered ``[chunk, k, H]`` head rows of `fusedkd.chunked.TILE_BYTES`).

    Returns:
        The loss (float32, float64 for float64 inputs; ``[...]`` for ``reduction="none"``), or
        ``(loss, distill, ce)``.

    Example:
        >>> import torch
        >>> from fusedkd.topk import fused_linear_topk_kd_loss, teacher_topk
        >>> teacher_hidden, teacher_weight = torch.randn(4, 7, 32), torch.randn(500, 32)
        >>> ids, logprobs = teacher_topk(teacher_hidden, teacher_weight, k=20, temperature=2.0)
        >>> student_hidden = torch.randn(4, 7, 16, requires_grad=True)
        >>> student_weight = torch.randn(500, 16, requires_grad=True)
        >>> labels = torch.randint(0, 500, (4, 7))
        >>> loss = fused_linear_topk_kd_loss(
        ...     student_hidden, student_weight, ids, logprobs, labels, temperature=2.0, alpha=0.7)
        >>> loss.backward()
        >>> student_weight.grad.shape
        torch.Size([500, 16])
    """
    inputs = prepare_topk_kd(
        student_hidden,
        student_weight,
        ids,
        logprobs,
        labels,
        divergence=divergence,
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index,
        reduction=reduction,
        tail=tail,
        student_bias=student_bias,
        vocab_size=vocab_size,
    )
    _resolve_topk_backend(backend)
    options = inputs.options
    loss, distill, ce = fused_linear_topk_kd(
        inputs.student_hidden,
        inputs.student_weight,
        inputs.student_bias,
        inputs.ids,
        inputs.logprobs,
        inputs.labels,
        options,
        SupportOptions(
            tail=inputs.tail,
            precision=tail_precision(inputs.logprobs.dtype, compute_dtype(inputs.student_hidden.dtype)),
            need_ce=options.has_labels and (options.ce_weight != 0.0 or return_components),
        ),
        chunk_size=chunk_size,
    )
    if reduction == "none":
        loss, distill, ce = (x.reshape(inputs.leading_shape) for x in (loss, distill, ce))
    return (loss, distill, ce) if return_components else loss


class FusedLinearTopKKDLoss(torch.nn.Module):
    """`fused_linear_topk_kd_loss` as a module: options at construction, tensors at call.

    Example:
        >>> import torch
        >>> from fusedkd.topk import FusedLinearTopKKDLoss, teacher_topk
        >>> criterion = FusedLinearTopKKDLoss(temperature=2.0, alpha=1.0, tail="renormalize")
        >>> teacher_hidden, teacher_weight = torch.randn(5, 12), torch.randn(50, 12)
        >>> ids, logprobs = teacher_topk(teacher_hidden, teacher_weight, k=4, temperature=2.0)
        >>> loss = criterion(torch.randn(5, 8), torch.randn(50, 8), ids, logprobs)
        >>> loss.dim()
        0
    """

    def __init__(
        self,
        *,
        divergence: str = "forward_kl",
        temperature: float = 1.0,
        alpha: float = 0.5,
        ignore_index: int = -100,
        reduction: str = "mean",
        tail: str = "bucket",
        vocab_size: int | None = None,
        backend: str = "auto",
        return_components: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        # Fail at construction, not at the first batch.
        check_options(
            divergence=divergence,
            beta=0.5,
            temperature=temperature,
            alpha=alpha,
            ignore_index=ignore_index,
            reduction=reduction,
            vocab_size=1,
            has_labels=True,
            divergences=TOPK_DIVERGENCES,
        )
        check_choice("tail", tail, TAILS)
        if vocab_size is not None:
            resolve_vocab_size(vocab_size, {})
        _resolve_topk_backend(backend)
        if chunk_size is not None:
            _check_positive_int("chunk_size", chunk_size)
        self.options = dict(
            divergence=divergence,
            temperature=temperature,
            alpha=alpha,
            ignore_index=ignore_index,
            reduction=reduction,
            tail=tail,
            vocab_size=vocab_size,
            backend=backend,
            return_components=return_components,
            chunk_size=chunk_size,
        )

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        ids: torch.Tensor,
        logprobs: torch.Tensor,
        labels: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
    ):
        return fused_linear_topk_kd_loss(
            student_hidden, student_weight, ids, logprobs, labels, student_bias=student_bias, **self.options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
