"""Autograd plumbing shared by the Functions of every loss, on both backends (docs/design.md §2, §4).

Every loss returns ``(loss, distill, ce)``, each reduced the same way, with
``loss = alpha T^2 distill + (1 - alpha) ce`` per token. Its backward needs the same few pieces
whatever the backend: the reduction's scale, the per-token weights of ``dD/ds`` and ``dC/ds`` built
from the three output gradients, the gradients formed eagerly in the forward (reductions "mean" and
"sum"), and one gradient per forward input. They are written once, here.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Sequence

import torch

from fusedkd._options import KDOptions


def reduction_scale(num_valid: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """``1 / max(num_valid, 1)`` for ``"mean"``, else 1: a 0-d device tensor (no host sync)."""
    if reduction == "mean":
        return 1.0 / num_valid.reshape(()).clamp(min=1).to(dtype)
    return torch.ones((), dtype=dtype, device=num_valid.device)


def reduce(per_token: torch.Tensor, reduction: str, scale: torch.Tensor) -> torch.Tensor:
    """Per-token values (zero where ignored) reduced per `reduction`; ``"none"`` returns them as they are."""
    if reduction == "none":
        return per_token
    return per_token.sum() * scale


def has_ce_grad(options: KDOptions, grad_ce: torch.Tensor | None) -> bool:
    """Whether G has a cross-entropy part at all: labels, and a nonzero weight or a gradient of ``ce``."""
    return options.has_labels and (options.ce_weight != 0.0 or grad_ce is not None)


def no_output_grad(grad_loss, grad_distill, grad_ce) -> bool:
    """None of the three outputs received a gradient (`ctx.set_materialize_grads(False)`)."""
    return grad_loss is None and grad_distill is None and grad_ce is None


def gradient_weights(
    options: KDOptions,
    scale: torch.Tensor,
    grad_loss: torch.Tensor | None,
    grad_distill: torch.Tensor | None,
    grad_ce: torch.Tensor | None,
    *,
    num_tokens: int,
    dtype: torch.dtype,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token weights ``(w_D, w_C)`` of ``dD/ds`` and ``dC/ds``, ``[num_tokens]``, contiguous
    (docs/design.md §4)::

        w_D = (g_loss alpha T^2 + g_distill) * scale        w_C = (g_loss (1 - alpha) + g_ce) * scale

    An output gradient is a scalar (reductions "mean", "sum") or ``[num_tokens]`` ("none"); a missing
    one counts as 0. `valid` (``[num_tokens]``, 1 or 0) zeroes ignored tokens for backends that visit
    them. ``w_C`` is None when G has no cross-entropy part (`has_ce_grad`). No host sync.
    """
    zero = torch.zeros((), dtype=dtype, device=scale.device)
    g_loss, g_distill, g_ce = (zero if g is None else g.to(dtype) for g in (grad_loss, grad_distill, grad_ce))
    weights = [(g_loss * options.distill_weight + g_distill) * scale]
    if has_ce_grad(options, grad_ce):
        weights.append((g_loss * options.ce_weight + g_ce) * scale)
    if valid is not None:
        weights = [w * valid.to(dtype) for w in weights]
    weights = [w.expand(num_tokens).contiguous() for w in weights]
    return weights[0], (weights[1] if len(weights) > 1 else None)


def unit_gradient_weights(
    options: KDOptions,
    scale: torch.Tensor,
    *,
    num_tokens: int,
    dtype: torch.dtype,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`gradient_weights` for an output gradient of 1 on the loss: what an eager forward forms G with."""
    one = torch.ones((), dtype=dtype, device=scale.device)
    return gradient_weights(options, scale, one, None, None, num_tokens=num_tokens, dtype=dtype, valid=valid)


_UNIT_OUTPUT_GRADIENT = threading.local()


@contextlib.contextmanager
def unit_output_gradient():
    """A context whose losses are differentiated once, towards their loss alone, with an output gradient
    of exactly 1 (`fusedkd._compile`'s ops: ``torch.autograd.grad(loss, inputs)`` on a scalar loss).
    The gradients their forwards form are then final: `EagerGradients.take` hands them out as they are,
    not multiplied by 1 (a pass over dW; the op's own backward scales them by the real output gradient,
    once, as the eager backward does). Read when a Function's forward runs, in the calling thread."""
    previous = getattr(_UNIT_OUTPUT_GRADIENT, "active", False)
    _UNIT_OUTPUT_GRADIENT.active = True
    try:
        yield
    finally:
        _UNIT_OUTPUT_GRADIENT.active = previous


class EagerGradients:
    """Gradients formed in the forward for an output gradient of 1 on the loss, handed out once.

    The backward takes them when only the loss received a gradient (a scalar, for reductions "mean"
    and "sum"): they are scaled in place by it (unless formed under `unit_output_gradient`, where it
    is 1). A second backward through a retained graph, or a gradient on ``distill`` / ``ce``, gets None
    and must recompute.
    """

    def __init__(self, grads: Sequence[torch.Tensor | None] | None):
        self._grads = None if grads is None else tuple(grads)
        self._unit = getattr(_UNIT_OUTPUT_GRADIENT, "active", False)

    def take(self, grad_loss, grad_distill, grad_ce) -> tuple[torch.Tensor | None, ...] | None:
        if self._grads is None or grad_loss is None or grad_distill is not None or grad_ce is not None:
            return None
        grads = self._grads
        if not self._unit:
            grads = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        self._grads = None
        return grads


def input_grads(needs_input_grad: Sequence[bool], by_input: dict[int, torch.Tensor | None]) -> tuple:
    """One gradient per forward input: ``by_input[i]`` where input i needs one, else None."""
    return tuple(by_input.get(i) if needed else None for i, needed in enumerate(needs_input_grad))


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which `torch.autocast` is off for `device`'s type: backends, forward and backward,
    never see autocast (the API casts the inputs first, `fusedkd._inputs.autocast_cast`)."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know
        enabled = False
    return torch.autocast(device.type, enabled=False) if enabled else contextlib.nullcontext()


DOUBLE_BACKWARD_ERROR = (
    "fusedkd's losses are differentiable once: their gradients cannot be differentiated again "
    "(double backward through create_graph=True, e.g. a gradient penalty, is not supported)"
)


class _RefuseDifferentiation(torch.autograd.Function):
    """Passes the gradients `grads` through; differentiating them (towards any tensor the loss was
    computed from: `anchors` are the Function's saved inputs) raises `DOUBLE_BACKWARD_ERROR`."""

    @staticmethod
    def forward(ctx, num_grads: int, *tensors: torch.Tensor):
        return tuple(g.view_as(g) for g in tensors[:num_grads])

    @staticmethod
    def backward(ctx, *grad_outputs):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def once_differentiable(backward):
    """`torch.autograd.function.once_differentiable` for a Function's backward, and stricter.

    The backward runs without building a graph. Under ``create_graph=True`` the gradients it returns
    come out of a node that raises `DOUBLE_BACKWARD_ERROR` when differentiated, and that node hangs off
    the Function's saved inputs as well as its output gradients. So every second-order use raises, a
    gradient penalty ``L + |dL/dh|^2`` differentiated towards ``h``, the weights or anything upstream of
    them included (``autograd.grad(..., inputs=...)``, ``backward(inputs=...)``): torch's decorator
    attaches its error only when an output gradient itself requires grad, and the penalty's
    second-order part would otherwise be silently dropped.
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():  # create_graph=False: nothing can differentiate the gradients
            return grads
        present = [i for i, g in enumerate(grads) if g is not None]
        anchors = [x for x in ctx.saved_tensors if isinstance(x, torch.Tensor) and x.requires_grad]
        anchors += [g for g in grad_outputs if isinstance(g, torch.Tensor) and g.requires_grad]
        if not present:
            return grads
        marked = _RefuseDifferentiation.apply(len(present), *(grads[i].detach() for i in present), *anchors)
        out = list(grads)
        for i, g in zip(present, marked):
            out[i] = g
        return tuple(out)

    return wrapper


def gradient_scale(
    options: KDOptions, weight_distill: torch.Tensor, weight_ce: torch.Tensor | None, staged_dtype
) -> torch.Tensor:
    """The power of two G is multiplied by before its cast to fp16 (and divided by after the products):
    a [1] float32 device tensor, no host sync; 1 for other dtypes. The weights are those of dD/ds and
    dC/ds after the head's chain rule (`_options.head_chain_rule`); the fused gradient kernel and the
    tiles backend both use it.

    |G| <= bound = max_i (|w_D,i| c / T + |w_C,i|), with c = 1 for the KL and a small multiple for the
    log-ratio factors of the reverse KL and the JSD; the scale maps the bound to [2^-1, 2^0), so the
    largest entries of G stay far below fp16's maximum (65504) while the small ones, scaled by 1 / N
    under reduction "mean", no longer underflow fp16's 6e-8 at N >= 16k (docs/design.md §6).
    """
    one = torch.ones(1, dtype=torch.float32, device=weight_distill.device)
    if staged_dtype != torch.float16:
        return one
    bound = weight_distill.abs() / options.temperature
    if weight_ce is not None:
        bound = bound + weight_ce.abs()
    largest = bound.max().reshape(1) if bound.numel() else one
    exponent = torch.ceil(torch.log2(largest.clamp(min=2.0**-100)))
    return torch.exp2(-exponent).clamp(max=2.0**100)
