"""The losses under `torch.compile`: each one an opaque op, so a compiled training step keeps one graph.

The losses stream over token chunks in Python, check values on the host and choose their backend at
run time: nothing the compiler could trace. Inside `torch.compile` (`torch.compiler.is_compiling()`),
each public loss therefore becomes one call of a `torch.library.custom_op`:

    fusedkd::fused_linear_kd / fusedkd::kd_loss / fusedkd::fused_linear_topk_kd
        (tensors..., options_key, eager_grads) -> (loss, distill, ce, *gradients)

whose implementation is the eager loss itself (checks, backend, autograd Function), whose fake
implementation gives the outputs' shapes, and whose registered autograd formula is the loss's own:

- for an output gradient on the loss only (reductions "mean" and "sum", no components), the op forms
  the student's gradients in its forward as the eager loss does (`fusedkd._autograd.EagerGradients`) and
  returns them; the backward scales them by the loss's gradient, a product in the graph;
- otherwise (reduction "none", or components that receive gradients) the backward is a second op,
  `<name>_backward`, which runs the loss with those output gradients.

The options are compile-time constants: `options_key` builds them (validated, as in eager mode) while
the compiler traces (`torch._dynamo.assume_constant_result`) and names them in a registry; the ops
read them back from it. A Module registers its options once, at construction.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fusedkd import _autograd
from fusedkd._options import KDOptions, LogitsKDOptions, TopKOptions

# The options a compiled call uses, by key: filled while the compiler traces, read by the ops.
_OPTIONS: dict[str, KDOptions] = {}


@dataclass(frozen=True)
class _Loss:
    """How the op of one loss calls its eager implementation."""

    options_class: type[KDOptions]
    tensor_names: tuple[str, ...]  # the op's tensor arguments, in order
    student_names: tuple[str, ...]  # those that receive a gradient
    eager: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None  # (tensors by name, options)


LOSSES: dict[str, _Loss] = {
    "fused_linear_kd": _Loss(
        KDOptions,
        (
            "student_hidden",
            "student_weight",
            "student_bias",
            "teacher_hidden",
            "teacher_weight",
            "teacher_bias",
            "labels",
        ),  # fmt: skip
        ("student_hidden", "student_weight", "student_bias"),
    ),
    "kd_loss": _Loss(LogitsKDOptions, ("student_logits", "teacher_logits", "labels"), ("student_logits",)),
    "fused_linear_topk_kd": _Loss(
        TopKOptions,
        ("student_hidden", "student_weight", "student_bias", "ids", "logprobs", "labels"),
        ("student_hidden", "student_weight", "student_bias"),
    ),
}


def register_eager(name: str, eager: Callable) -> None:
    """The eager loss behind op `name`: ``eager(tensors: dict, options) -> (loss, distill, ce)``."""
    LOSSES[name] = replace(LOSSES[name], eager=eager)


def register_options(name: str, options: KDOptions) -> str:
    """A key for `options` (of loss `name`) in the registry the ops read."""
    key = f"{name}:{options!r}"
    _OPTIONS[key] = options
    return key


@torch._dynamo.assume_constant_result
def options_key(name: str, items: tuple) -> str:
    """Built while the compiler traces: the validated options of a call's keyword arguments `items`."""
    return register_options(name, LOSSES[name].options_class.of(dict(items)))


def compiled_call(name: str, arguments: dict) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """A public loss inside `torch.compile`: its `arguments` (the function's ``locals()``) as one op call."""
    items = tuple((k, v) for k, v in arguments.items() if not isinstance(v, Tensor))
    loss = LOSSES[name]
    return run(name, [arguments[t] for t in loss.tensor_names], options_key(name, items))


def run(name: str, tensors: list, key: str) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """The op of loss `name` on `tensors` with the options of `key`; outputs as the public loss's."""
    options = _OPTIONS[key]
    loss = LOSSES[name]
    students = [tensors[loss.tensor_names.index(s)] for s in loss.student_names]
    wants_grad = torch.is_grad_enabled() and any(s is not None and s.requires_grad for s in students)
    eager_grads = wants_grad and options.reduction != "none" and not options.return_components
    outputs = OPS[name](*tensors, key, eager_grads)
    values = outputs[:3]
    if options.reduction == "none":
        leading = tensors[0].shape[:-1]
        values = tuple(v.reshape(leading) for v in values)
    return values if options.return_components else values[0]


def _eager(name: str, tensors: tuple, key: str, grad_outputs: tuple | None, eager_grads: bool):
    """Run the eager loss on `tensors`: its three values and, for `grad_outputs` (or an output gradient
    of 1 on the loss, `eager_grads`), the gradients of its student tensors."""
    loss = LOSSES[name]
    options = replace(_OPTIONS[key], return_components=True)
    named = dict(zip(loss.tensor_names, tensors))
    students = [named[s] for s in loss.student_names]
    want = grad_outputs is not None or eager_grads
    leaves = [None if s is None else s.detach().requires_grad_(want) for s in students]
    named.update(zip(loss.student_names, leaves))
    # An output gradient of 1 on the loss alone (`eager_grads`): the gradients its forward forms are
    # final, handed out unscaled; this op's backward scales them by the real one.
    unit = _autograd.unit_output_gradient() if grad_outputs is None else contextlib.nullcontext()
    with _autograd_on(), unit:
        values = loss.eager(named, options)
        values = tuple(v.reshape(-1) if options.reduction == "none" else v for v in values)
        grads = ()
        if want:
            present = [x for x in leaves if x is not None]
            if grad_outputs is None:
                one = torch.ones_like(values[0])  # exactly 1: `unit_output_gradient`'s promise
                found = torch.autograd.grad(values[0], present, one, allow_unused=True)
            else:
                outputs = [(v, g) for v, g in zip(values, grad_outputs)]
                found = torch.autograd.grad(
                    [v for v, _ in outputs], present, [g.to(v.dtype) for v, g in outputs], allow_unused=True
                )
            found = iter(found)
            grads = tuple(None if x is None else _or_zeros(next(found), x) for x in leaves)
    return tuple(v.detach() for v in values), grads


_AUTOGRAD_KEYS = (
    torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
    | torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradOther)
    | torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradNestedTensor)
)


@contextlib.contextmanager
def _autograd_on():
    """Autograd inside an op's implementation, which the dispatcher runs below autograd (its keys
    excluded, grad mode off): the eager loss records its graph there on detached leaves of its own, so
    that it forms the gradients as it does outside `torch.compile`. Other dispatch state (autocast)
    is kept."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(
        torch._C._dispatch_tls_local_include_set(), exclude - _AUTOGRAD_KEYS
    ):
        with torch.enable_grad():
            yield


def _or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _value_shapes(name: str, tensors: tuple, key: str) -> tuple[tuple[int, ...], torch.dtype]:
    options = _OPTIONS[key]
    first = tensors[0]
    shape = (math.prod(first.shape[:-1]),) if options.reduction == "none" else ()
    return shape, torch.float64 if first.dtype == torch.float64 else torch.float32


def _make_ops(name: str, signature: str):
    """The forward and backward ops of loss `name`; `signature`: its tensor parameters, as a schema."""
    loss = LOSSES[name]
    num_students = len(loss.student_names)
    outs = ", ".join(["Tensor"] * (3 + num_students))
    lib = torch.library.Library("fusedkd", "FRAGMENT")
    lib.define(f"{name}({signature}, str options_key, bool eager_grads) -> ({outs})")
    grads_in = "Tensor grad_loss, Tensor grad_distill, Tensor grad_ce"
    grads_out = ", ".join(["Tensor"] * num_students)
    lib.define(f"{name}_backward({signature}, {grads_in}, str options_key) -> ({grads_out})")
    forward_op = getattr(torch.ops.fusedkd, name).default
    backward_op = getattr(torch.ops.fusedkd, f"{name}_backward").default
    student_index = [loss.tensor_names.index(s) for s in loss.student_names]

    def forward_impl(*args):
        *tensors, key, eager_grads = args
        values, grads = _eager(name, tuple(tensors), key, None, eager_grads)
        first = tensors[0]
        if not eager_grads:
            grads = (None,) * num_students
        return (*values, *(_empty(first) if g is None else g for g in grads))

    def forward_fake(*args):
        *tensors, key, eager_grads = args
        shape, dtype = _value_shapes(name, tuple(tensors), key)
        first = tensors[0]
        values = [first.new_empty(shape, dtype=dtype) for _ in range(3)]
        grads = [
            torch.empty_like(tensors[i]) if eager_grads and tensors[i] is not None else _empty(first)
            for i in student_index
        ]
        return (*values, *grads)

    def backward_impl(*args):
        *tensors, g_loss, g_distill, g_ce, key = args
        tensors = tuple(tensors)
        _, grads = _eager(name, tensors, key, (g_loss, g_distill, g_ce), False)
        grads = tuple(_empty(tensors[0]) if g is None else g for g in grads)
        return grads if num_students > 1 else grads[0]  # a schema of one Tensor returns it bare

    def backward_fake(*args):
        *tensors, _, _, _, key = args
        grads = tuple(
            _empty(tensors[0]) if tensors[i] is None else torch.empty_like(tensors[i]) for i in student_index
        )
        return grads if num_students > 1 else grads[0]

    for op, impl, fake in (
        (name, forward_impl, forward_fake),
        (f"{name}_backward", backward_impl, backward_fake),
    ):
        lib.impl(op, impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"fusedkd::{op}", fake, lib=lib)

    def setup_context(ctx, inputs, output):
        *tensors, key, eager_grads = inputs
        ctx.key, ctx.eager_grads = key, eager_grads
        ctx.has = [t is not None for t in tensors]
        saved = [t if t is not None else _empty(tensors[0]) for t in tensors]
        ctx.save_for_backward(*saved, *output[3:])

    def backward(ctx, grad_loss, grad_distill, grad_ce, *_):
        saved = ctx.saved_tensors
        n = len(loss.tensor_names)
        tensors = [t if present else None for t, present in zip(saved[:n], ctx.has)]
        if ctx.eager_grads:  # formed in the forward for an output gradient of 1 on the loss
            grads = [
                None if not ctx.has[i] else g * grad_loss.to(g.dtype)
                for i, g in zip(student_index, saved[n:])
            ]
        else:
            grads = backward_op(*tensors, grad_loss, grad_distill, grad_ce, ctx.key)
            grads = grads if num_students > 1 else (grads,)
            grads = [g if ctx.has[i] else None for i, g in zip(student_index, grads)]
        out = [None] * (n + 2)
        for i, g in zip(student_index, grads):
            out[i] = g
        return tuple(out)

    torch.library.register_autograd(f"fusedkd::{name}", backward, setup_context=setup_context, lib=lib)
    return lib, forward_op


_LIBRARIES = []
OPS: dict[str, Callable] = {}
for _name, _signature in (
    (
        "fused_linear_kd",
        "Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor teacher_hidden, "
        "Tensor teacher_weight, Tensor? teacher_bias, Tensor? labels",
    ),
    ("kd_loss", "Tensor student_logits, Tensor teacher_logits, Tensor? labels"),
    (
        "fused_linear_topk_kd",
        "Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor ids, Tensor logprobs, "
        "Tensor? labels",
    ),
):
    _library, OPS[_name] = _make_ops(_name, _signature)
    _LIBRARIES.append(_library)
