"""The one autograd Function of the PyTorch backend: each loss plugs in how it streams its chunks.

Every loss of this backend returns ``(loss, distill, ce)`` from per-token divergences and
cross-entropies that a chunk loop computes, and its gradients from the same loop run with per-token
gradient weights (docs/design.md §4): formed during the forward for an output gradient of 1 on the
loss (reductions "mean" and "sum"; `EagerGradients`), recomputed in the backward otherwise. Only the
loop differs between the losses: a `Streamed` names it and which of the tensors receive gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fusedkd._autograd import (
    EagerGradients,
    autocast_off,
    gradient_weights,
    input_grads,
    no_output_grad,
    once_differentiable,
    reduce,
    reduction_scale,
    unit_gradient_weights,
)
from fusedkd._options import KDOptions, compute_dtype
from fusedkd.torch_backend.tiles import Tokens


@dataclass(frozen=True)
class Streamed:
    """One loss's chunk loop, for `StreamedFunction`.

    ``stream(tensors, tokens, options, weights, needs) -> (divergence [N], ce [N], grads)``: the loop over
    the call's `tensors` (as the Function received them) for the tokens that count (`tokens`), with
    per-token gradient weights ``(w_distill [N], w_ce [N] or None)`` or None (values only); `grads` has
    one gradient (or None) per entry of `students`, where `needs` (one bool per student) asks for one.
    `students`: the positions in `tensors` of the tensors that receive gradients; `labels`: the position
    of the labels (None: every token counts); the first tensor's leading dimensions are the tokens.
    """

    stream: Callable
    students: tuple[int, ...]
    labels: int


class StreamedFunction(torch.autograd.Function):
    """(loss, distill, ce) of a `Streamed` loss; gradients to its student tensors, none to the rest."""

    @staticmethod
    def forward(ctx, loss: Streamed, options: KDOptions, *tensors):
        first = tensors[0]
        n = math.prod(first.shape[:-1])
        dtype = compute_dtype(first.dtype)
        tokens = Tokens(tensors[loss.labels], options, n, first.device)
        scale = reduction_scale(tokens.num_valid, options.reduction, dtype)
        needs = tuple(ctx.needs_input_grad[2 + i] for i in loss.students)
        weights = None
        if any(needs) and options.reduction != "none":  # form the gradient now, for an output gradient of 1
            weights = unit_gradient_weights(options, scale, num_tokens=n, dtype=dtype, valid=tokens.valid)
        divergence, ce, grads = loss.stream(tensors, tokens, options, weights, needs)
        value = options.distill_weight * divergence + options.ce_weight * ce

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors)
        ctx.loss, ctx.options, ctx.scale, ctx.needs = loss, options, scale, needs
        ctx.eager = EagerGradients(grads if weights is not None else None)
        return tuple(reduce(x, options.reduction, scale) for x in (value, divergence, ce))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_distill, grad_ce):
        if not any(ctx.needs) or no_output_grad(grad_loss, grad_distill, grad_ce):
            return (None,) * len(ctx.needs_input_grad)
        tensors, loss, options = ctx.saved_tensors, ctx.loss, ctx.options
        grads = ctx.eager.take(grad_loss, grad_distill, grad_ce)
        if grads is None:  # recompute the tiles with the per-token weights of these output gradients
            first = tensors[0]
            n = math.prod(first.shape[:-1])
            tokens = Tokens(tensors[loss.labels], options, n, first.device)
            weights = gradient_weights(
                options,
                ctx.scale,
                grad_loss,
                grad_distill,
                grad_ce,
                num_tokens=n,
                dtype=compute_dtype(first.dtype),
                valid=tokens.valid,
            )
            with autocast_off(first.device):
                _, _, grads = loss.stream(tensors, tokens, options, weights, ctx.needs)
        return input_grads(
            ctx.needs_input_grad,
            {2 + i: None if g is None else g.to(tensors[i].dtype) for i, g in zip(loss.students, grads)},
        )


def run(loss: Streamed, options: KDOptions, tensors: Sequence[torch.Tensor | None]):
    """(loss, distill, ce) of `loss` on `tensors`: through `StreamedFunction` when a student tensor wants a
    gradient, else the forward alone (no gradient is formed, nothing is kept)."""
    wants_grad = torch.is_grad_enabled() and any(
        tensors[i] is not None and tensors[i].requires_grad for i in loss.students
    )
    if wants_grad:
        return StreamedFunction.apply(loss, options, *tensors)
    with torch.no_grad():
        return StreamedFunction.apply(loss, options, *tensors)
