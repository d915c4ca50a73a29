"""Naive, exact distillation losses that materialize the logits: the ground truth of the tests.

These functions take the same arguments and check them the same way as `fusedkd.fused_linear_kd_loss`,
then compute docs/design.md §2 literally with PyTorch autograd. Pass float64 tensors for a float64 reference.
They hold several `[tokens x vocab]` tensors: use them for checking, not for training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fusedkd._inputs import prepare_linear_kd
from fusedkd._options import KDOptions, compute_dtype


def _plogp_diff(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_v a_v (log a_v - log b_v), with 0 log 0 = 0 where a_v is exactly 0, and nothing else hidden:
    a NaN stays NaN, and a_v > 0 against b_v = 0 is +inf. The inner `where` keeps the gradient of the
    zero terms 0 (not 0 * inf)."""
    a = log_a.exp()
    zero = torch.zeros_like(a)
    log_ratio = torch.where(a == 0, zero, log_a - log_b)
    return torch.where(a == 0, zero, a * log_ratio).sum(-1)


def divergence_from_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, options: KDOptions
) -> torch.Tensor:
    """Per-token divergence D of docs/design.md §2 from [N, V] logits (already in the compute dtype)."""
    log_q = F.log_softmax(student_logits / options.temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / options.temperature, dim=-1)
    if options.divergence == "forward_kl":
        return _plogp_diff(log_p, log_q)
    if options.divergence == "reverse_kl":
        return _plogp_diff(log_q, log_p)
    beta = options.beta
    # log m = logaddexp(log beta p, log (1 - beta) q); where p = q = 0 it is -inf, computed apart so that
    # its gradient is 0, not NaN.
    both_zero = (log_p == -math.inf) & (log_q == -math.inf)
    log_p_safe, log_q_safe = (torch.where(both_zero, 0.0, x) for x in (log_p, log_q))
    log_m = torch.logaddexp(log_p_safe + math.log(beta), log_q_safe + math.log1p(-beta))
    log_m = torch.where(both_zero, -math.inf, log_m)
    return beta * _plogp_diff(log_p, log_m) + (1 - beta) * _plogp_diff(log_q, log_m)


def kd_terms_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    options: KDOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, distill, ce) of [N, V] logits, reduced as `options.reduction` says.

    The logits are the heads' projections z = W h + b; each model's head transform (logit scale, then
    soft cap, `KDOptions`) is applied here, with autograd. Ignored tokens count for nothing: their rows
    are never read (a NaN there changes no value and no gradient). In a token that counts, a NaN or +inf
    logit, or a row of -inf, gives NaN (docs/design.md §9).
    """
    if labels is not None:
        counts = (labels != options.ignore_index)[:, None]
        student_logits = torch.where(counts, student_logits, torch.zeros_like(student_logits))
        teacher_logits = torch.where(counts, teacher_logits, torch.zeros_like(teacher_logits))
    student_logits = options.student_head(student_logits)
    teacher_logits = options.teacher_head(teacher_logits)
    divergence = divergence_from_logits(student_logits, teacher_logits, options)
    if labels is None:
        valid = torch.ones(divergence.shape, dtype=torch.bool, device=divergence.device)
        ce = torch.zeros_like(divergence)
    else:
        valid = labels != options.ignore_index
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
        ce = torch.logsumexp(student_logits, dim=-1) - student_logits.gather(-1, safe_labels[:, None])[:, 0]
        # A student row with a +inf (or NaN) logit, or of -inf only, is not a distribution: NaN, not +inf.
        ce = torch.where(torch.isfinite(student_logits.amax(-1)), ce, math.nan)
    zero = torch.zeros_like(divergence)
    divergence = torch.where(valid, divergence, zero)
    ce = torch.where(valid, ce, zero)
    loss = options.distill_weight * divergence + options.ce_weight * ce
    if options.reduction == "none":
        return loss, divergence, ce
    if options.reduction == "sum":
        return loss.sum(), divergence.sum(), ce.sum()
    num_valid = valid.sum().clamp(min=1).to(loss.dtype)
    return loss.sum() / num_valid, divergence.sum() / num_valid, ce.sum() / num_valid


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits.to(compute_dtype(hidden.dtype))


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    backend: str = "reference",
    return_components: bool = False,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    check_finite: bool = False,
    shift_labels: bool = False,
):
    """Same contract as `fusedkd.fused_linear_kd_loss`, computed naively from full logits.

    The teacher is detached (frozen), as in the fused loss. `backend` is accepted for signature
    compatibility and must be "reference".
    """
    if backend != "reference":
        raise ValueError(f"fusedkd.reference computes with backend='reference' only; got {backend!r}")
    options = KDOptions.of({**locals(), "backend": "auto"})
    inputs = prepare_linear_kd(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        student_bias,
        teacher_bias,
        options,
    )
    student_hidden, teacher_hidden = inputs.student_hidden, inputs.teacher_hidden.detach()
    if inputs.labels is not None:  # ignored tokens are never read (their hidden states may be NaN)
        counts = (inputs.labels != inputs.options.ignore_index)[:, None]
        student_hidden = torch.where(counts, student_hidden, torch.zeros_like(student_hidden))
        teacher_hidden = torch.where(counts, teacher_hidden, torch.zeros_like(teacher_hidden))
    student_logits = _logits(student_hidden, inputs.student_weight, inputs.student_bias)
    teacher_bias_ = None if inputs.teacher_bias is None else inputs.teacher_bias.detach()
    teacher_logits = _logits(teacher_hidden, inputs.teacher_weight.detach(), teacher_bias_)
    loss, distill, ce = kd_terms_from_logits(student_logits, teacher_logits, inputs.labels, inputs.options)
    if reduction == "none":
        loss, distill, ce = (x.reshape(inputs.leading_shape) for x in (loss, distill, ce))
    return (loss, distill, ce) if return_components else loss
