"""The contract every loss keeps, on every backend: one parametrized suite over the three losses.

`fused_linear_kd_loss` (torch, Triton), `kd_loss` (torch, Triton) and `fused_linear_topk_kd_loss`
(torch) against their float64 references: exactness, reductions and components, all tokens ignored,
no labels, every input layout a training loop passes (strided labels and biases, views of hidden
states and logits, transposed weights, int32 labels), autocast, no host synchronization on the check
path, and no double backward. Bad input: tests/test_bad_input.py. Each loss's own behaviour is tested
in its own file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from _helpers import (
    DEVICE,
    FP32_RTOL,
    SMALL_TILES,
    _triton_skip_reason,
    assert_close,
    reference_kd_loss,
    reference_teacher_topk,
    reference_topk_kd_loss,
    rel_err,
)
from torch.utils._python_dispatch import TorchDispatchMode

import fusedkd
from fusedkd import reference

# The interpreter evaluates `-inf - -inf` and `log(0)` in masked lanes whose results are discarded.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ----------------------------------------------------------------------------------------------------
# The three losses behind one interface
# ----------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """The arguments of one loss call: positional `args` (in order) and keyword `kwargs`, by name.

    `student` names the tensors that receive a gradient (those present). `keep_dtype` names float
    tensors that keep their dtype in the float64 copy (the top-k log-probabilities set the loss's tail
    precision by their dtype).
    """

    args: dict[str, torch.Tensor | None]
    kwargs: dict[str, torch.Tensor | None]
    student: tuple[str, ...]
    keep_dtype: tuple[str, ...] = ()

    def get(self, name):
        return self.args[name] if name in self.args else self.kwargs[name]

    def replace(self, **tensors) -> Inputs:
        args = {k: tensors.get(k, v) for k, v in self.args.items()}
        kwargs = {k: tensors.get(k, v) for k, v in self.kwargs.items()}
        return Inputs(args, kwargs, self.student, self.keep_dtype)

    def as_float64(self) -> Inputs:
        def up(name, x):
            if x is None or not x.dtype.is_floating_point or name in self.keep_dtype:
                return x
            return x.detach().double().requires_grad_(x.requires_grad)

        return Inputs(
            {k: up(k, v) for k, v in self.args.items()},
            {k: up(k, v) for k, v in self.kwargs.items()},
            self.student,
            self.keep_dtype,
        )

    def students(self) -> list[torch.Tensor]:
        return [self.get(name) for name in self.student if self.get(name) is not None]


@dataclass
class Loss:
    name: str
    function: Callable
    reference: Callable
    make: Callable[..., Inputs]
    backends: list = field(default_factory=list)
    # Options that pick the divergence (and, for the top-k loss, the tail): all of them, and the ones
    # the reduction tests run (jsd at beta 0 and 1 is forward and reverse KL).
    variants: list = field(default_factory=list)
    distinct_variants: list = field(default_factory=list)


def _prep(x: torch.Tensor | None, dtype: torch.dtype, grad: bool) -> torch.Tensor | None:
    return None if x is None else x.to(dtype=dtype, device=DEVICE).requires_grad_(grad)


def _labels(n: int, vocab: int, ignore_fraction: float) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n,))
    labels[torch.rand(n) < ignore_fraction] = -100
    return labels


def make_linear(leading=(37,), vocab=1003, *, ignore_fraction=0.2, bias=False, dtype=torch.float32) -> Inputs:
    n, hs, ht = math.prod(leading), 24, 40
    return Inputs(
        args=dict(
            student_hidden=_prep(torch.randn(*leading, hs) / hs**0.5, dtype, True),
            student_weight=_prep(torch.randn(vocab, hs), dtype, True),
            teacher_hidden=_prep(torch.randn(*leading, ht) / ht**0.5, dtype, False),
            teacher_weight=_prep(torch.randn(vocab, ht), dtype, False),
            labels=_labels(n, vocab, ignore_fraction).reshape(leading).to(DEVICE),
        ),
        kwargs=dict(
            student_bias=_prep(torch.randn(vocab), dtype, True) if bias else None,
            teacher_bias=_prep(torch.randn(vocab), dtype, False) if bias else None,
        ),
        student=("student_hidden", "student_weight", "student_bias"),
    )


def make_logits(leading=(37,), vocab=1003, *, ignore_fraction=0.2, bias=False, dtype=torch.float32) -> Inputs:
    n = math.prod(leading)
    return Inputs(
        args=dict(
            student_logits=_prep(torch.randn(*leading, vocab) * 3.0, dtype, True),
            teacher_logits=_prep(torch.randn(*leading, vocab) * 3.0, dtype, False),
            labels=_labels(n, vocab, ignore_fraction).reshape(leading).to(DEVICE),
        ),
        kwargs={},
        student=("student_logits",),
    )


def make_topk(
    leading=(37,), vocab=1003, *, ignore_fraction=0.2, bias=False, dtype=torch.float32, k=16, temperature=2.0
) -> Inputs:
    n, hs, ht = math.prod(leading), 24, 40
    teacher_hidden = torch.randn(n, ht, dtype=torch.float64) / ht**0.5
    teacher_weight = torch.randn(vocab, ht, dtype=torch.float64) * 3.0
    ids, logprobs, _ = reference_teacher_topk(teacher_hidden, teacher_weight, k, temperature)
    return Inputs(
        args=dict(
            student_hidden=_prep(torch.randn(*leading, hs) / hs**0.5, dtype, True),
            student_weight=_prep(torch.randn(vocab, hs) * 3.0, dtype, True),
            ids=ids.reshape(*leading, k).to(DEVICE),
            logprobs=logprobs.float().reshape(*leading, k).to(DEVICE),
            labels=_labels(n, vocab, ignore_fraction).reshape(leading).to(DEVICE),
        ),
        kwargs=dict(student_bias=_prep(torch.randn(vocab), dtype, True) if bias else None),
        student=("student_hidden", "student_weight", "student_bias"),
        keep_dtype=("logprobs",),
    )


TORCH_BACKENDS = [pytest.param("torch", id="torch")]
TRITON = pytest.param(
    "triton",
    id="triton",
    marks=pytest.mark.skipif(_triton_skip_reason() is not None, reason=str(_triton_skip_reason())),
)
# The top-k loss's tile path: its chunks' tiles through `fusedkd.kernels.topk_tile` (the interpreter here).
TILES = pytest.param(
    "tiles",
    id="tiles",
    marks=pytest.mark.skipif(_triton_skip_reason() is not None, reason=str(_triton_skip_reason())),
)
DENSE_VARIANTS = [
    pytest.param(dict(divergence="forward_kl"), id="fkl"),
    pytest.param(dict(divergence="reverse_kl"), id="rkl"),
    pytest.param(dict(divergence="jsd", beta=0.0), id="jsd0"),
    pytest.param(dict(divergence="jsd", beta=0.3), id="jsd0.3"),
    pytest.param(dict(divergence="jsd", beta=1.0), id="jsd1"),
]
TOPK_VARIANTS = [
    pytest.param(dict(divergence=d, tail=t), id=f"{d.split('_')[0][0]}kl-{t}")
    for t in ("bucket", "renormalize")
    for d in ("forward_kl", "reverse_kl")
]

LOSSES = {
    "linear": Loss(
        "fused_linear_kd_loss",
        fusedkd.fused_linear_kd_loss,
        reference.fused_linear_kd_loss,
        make_linear,
        [*TORCH_BACKENDS, TRITON],
        DENSE_VARIANTS,
        [DENSE_VARIANTS[i] for i in (0, 1, 3)],
    ),
    "logits": Loss(
        "kd_loss",
        fusedkd.kd_loss,
        reference_kd_loss,
        make_logits,
        [*TORCH_BACKENDS, TRITON],
        # jsd at beta 0 and 1 equal the KLs here too: test_kd_logits.py checks kd_loss against
        # fused_linear_kd_loss for them.
        [DENSE_VARIANTS[i] for i in (0, 1, 3)],
        [DENSE_VARIANTS[i] for i in (0, 1, 3)],
    ),
    "topk": Loss(
        "fused_linear_topk_kd_loss",
        fusedkd.fused_linear_topk_kd_loss,
        reference_topk_kd_loss,
        make_topk,
        [*TORCH_BACKENDS, TILES],
        TOPK_VARIANTS,
        TOPK_VARIANTS,
    ),
}


def cases(*, variants: str | None = None, small_tiles: bool = False, rotate: list | None = None):
    """(loss, backend[, options[, extra]]) parameters: every loss on each of its backends (the torch
    backend also with small tiles when `small_tiles`: `_helpers.SMALL_TILES`), and each of its
    `variants` ("variants" or "distinct_variants").

    `rotate`: a list of extra parameters, not crossed with the variants but dealt out to them in turn,
    the (loss, backend) pairs starting where the previous left off, so that each backend of each loss
    meets every extra value (given at least as many variants) and every variant meets several.
    """
    out = []
    turn = 0
    for key, loss in LOSSES.items():
        backends = list(loss.backends)
        if small_tiles:
            backends.insert(1, SMALL_TILES)
        for backend in backends:
            if variants is None:
                out.append(
                    pytest.param(key, backend.values[0], id=f"{key}-{backend.id}", marks=backend.marks)
                )
                continue
            for variant in getattr(loss, variants):
                extra, extra_id = (), ""
                if rotate is not None:
                    value = rotate[turn % len(rotate)]
                    turn += 1
                    extra, extra_id = (value.values[0],), f"-{value.id}"
                out.append(
                    pytest.param(
                        key,
                        backend.values[0],
                        variant.values[0],
                        *extra,
                        id=f"{key}-{backend.id}-{variant.id}{extra_id}",
                        marks=backend.marks,
                    )
                )
    return out


def run(fn: Callable, inputs: Inputs, grad_outputs=None, **options):
    """Outputs and the gradients of the student tensors (leaves or views) of `fn`, float64 on the CPU."""
    out = fn(*inputs.args.values(), **inputs.kwargs, **options)
    outputs = out if isinstance(out, tuple) else (out,)
    if grad_outputs is None:
        grad_outputs = [torch.ones_like(o) for o in outputs]
    total = sum((o * g.to(device=o.device, dtype=o.dtype)).sum() for o, g in zip(outputs, grad_outputs))
    students = inputs.students()
    grads = torch.autograd.grad(total, students, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(students, grads)]
    return [o.detach().double().cpu() for o in outputs], [g.detach().double().cpu() for g in grads]


def check_against_reference(
    key, backend, inputs, rtol=FP32_RTOL, grad_outputs=None, expected=None, naive_bound=False, **options
):
    """The loss on `inputs` against the float64 reference on `expected` (default: `inputs` in float64).

    `naive_bound`: for ill-conditioned inputs, allow each output three times the error of the naive
    recipe in the inputs' own dtype (the reference on `inputs`), never less than `rtol` (docs/design.md §6).
    """
    loss = LOSSES[key]
    values, grads = run(loss.function, inputs, grad_outputs, backend=backend, **options)
    expected = (inputs if expected is None else expected).as_float64()
    ref_values, ref_grads = run(loss.reference, expected, grad_outputs, **options)
    if not naive_bound:
        assert_close(values, ref_values, rtol, "loss")
        assert_close(grads, ref_grads, rtol, "grad")
        return values, grads
    naive_values, naive_grads = run(loss.reference, inputs, grad_outputs, **options)
    for what, ours, naive, exact in (
        ("loss", values, naive_values, ref_values),
        ("grad", grads, naive_grads, ref_grads),
    ):
        for a, b, e in zip(ours, naive, exact):
            allowed = max(3 * rel_err(b, e), rtol)
            assert rel_err(a, e) <= allowed, f"{what}: {rel_err(a, e):.3g} > {allowed:.3g}"
    return values, grads


# ----------------------------------------------------------------------------------------------------
# Exactness, reductions, ignored tokens, no labels
# ----------------------------------------------------------------------------------------------------


# Each temperature and each alpha: T = 1 (the cross-entropy shares the student's softmax) with a mixed
# loss, T != 1 with the two endpoints of alpha (no cross-entropy; no divergence). Every one with every
# (loss, variant) on the torch backend; on the others (small tiles, Triton) dealt out over the variants.
TEMPERATURE_ALPHA = [
    pytest.param((0.5, 0.0), id="T0.5-a0"),
    pytest.param((1.0, 0.7), id="T1-a0.7"),
    pytest.param((5.0, 1.0), id="T5-a1"),
]


def _temperature_alpha_cases():
    full = [
        pytest.param(*c.values[:3], ta.values[0], id=f"{c.id}-{ta.id}", marks=c.marks)
        for c in cases(variants="variants")
        if c.id.split("-")[1] == "torch"
        for ta in TEMPERATURE_ALPHA
    ]
    dealt = [
        c
        for c in cases(variants="variants", small_tiles=True, rotate=TEMPERATURE_ALPHA)
        if c.id.split("-")[1] != "torch" or "small-tiles" in c.id
    ]
    return full + dealt


@pytest.mark.parametrize("key,backend,variant,temperature_alpha", _temperature_alpha_cases())
def test_matches_float64_reference(key, backend, variant, temperature_alpha):
    temperature, alpha = temperature_alpha
    inputs = LOSSES[key].make(bias=alpha > 0.5)
    if key == "topk":
        # The teacher's top-k at the loss's temperature. At T = 0.5 the teacher is so confident that
        # its tail mass 1 - sum_K p nears float32's resolution of the listed mass (tail="bucket" floors
        # it at tau, fusedkd/topk.py): the loss is then as exact as the naive float32 recipe can be.
        inputs = make_topk(bias=alpha > 0.5, temperature=temperature)
    check_against_reference(
        key,
        backend,
        inputs,
        grad_outputs=[torch.tensor(1.7)],  # an output gradient != 1 scales the gradient formed in forward
        temperature=temperature,
        alpha=alpha,
        naive_bound=key == "topk" and temperature < 1.0,
        **variant,
    )


# Each reduction with and without the components, dealt out two per variant (one of each), so each
# (loss, backend) meets all six and each variant a reduction with its components differentiated.
REDUCTION_COMPONENTS = [
    pytest.param(("mean", False), id="mean-loss"),
    pytest.param(("none", True), id="none-components"),
    pytest.param(("sum", False), id="sum-loss"),
    pytest.param(("mean", True), id="mean-components"),
    pytest.param(("none", False), id="none-loss"),
    pytest.param(("sum", True), id="sum-components"),
]


def _reduction_cases():
    first = cases(variants="distinct_variants", rotate=REDUCTION_COMPONENTS[0::2])
    second = cases(variants="distinct_variants", rotate=REDUCTION_COMPONENTS[1::2])
    return [c for pair in zip(first, second) for c in pair]


@pytest.mark.parametrize("key,backend,variant,reduction_components", _reduction_cases())
def test_reductions_and_components(key, backend, variant, reduction_components):
    reduction, components = reduction_components
    inputs = LOSSES[key].make(leading=(3, 9), vocab=517)
    shape = (3, 9) if reduction == "none" else ()
    # Arbitrary per-output (and, for "none", per-token) weights exercise every backward path.
    grad_outputs = [torch.randn(shape, dtype=torch.float64) for _ in range(3 if components else 1)]
    values, _ = check_against_reference(
        key,
        backend,
        inputs,
        grad_outputs=grad_outputs,
        temperature=2.0,
        alpha=0.6,
        reduction=reduction,
        return_components=components,
        **variant,
    )
    if components:
        loss, distill, ce = values
        torch.testing.assert_close(loss, 0.6 * 4.0 * distill + 0.4 * ce, rtol=1e-6, atol=1e-6)
    if reduction == "none":
        assert values[0].shape == (3, 9)
        assert (values[0][(inputs.get("labels") == -100).cpu()] == 0).all()


@pytest.mark.parametrize("key,backend", cases())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_ignored(key, backend, reduction):
    """No valid token: loss 0 and zero gradients, no NaN, for every reduction."""
    inputs = LOSSES[key].make(leading=(17,), vocab=301, ignore_fraction=1.0, bias=True)
    for variant in LOSSES[key].variants:
        values, grads = run(
            LOSSES[key].function,
            inputs,
            backend=backend,
            reduction=reduction,
            alpha=0.5,
            temperature=2.0,
            return_components=True,
            **variant.values[0],
        )
        for x in values + grads:
            assert torch.isfinite(x).all() and (x == 0).all()


@pytest.mark.parametrize("key,backend", cases())
def test_no_labels_means_every_token_counts(key, backend):
    inputs = LOSSES[key].make(leading=(19,), vocab=307).replace(labels=None)
    for variant in LOSSES[key].variants:
        check_against_reference(key, backend, inputs, alpha=1.0, temperature=3.0, **variant.values[0])


# ----------------------------------------------------------------------------------------------------
# Heads with a logit scale and a final-logit soft cap (Cohere, Granite, Gemma): scale, then cap
# ----------------------------------------------------------------------------------------------------

HEADS = [
    pytest.param(dict(student_logit_scale=0.5, teacher_logit_scale=2.0), id="scales"),
    pytest.param(dict(student_softcap=4.0, teacher_softcap=6.0), id="caps"),
    pytest.param(
        dict(student_logit_scale=3.0, student_softcap=2.5, teacher_logit_scale=0.25, teacher_softcap=1.5),
        id="scale-then-cap",
    ),
]


def _head_options(key: str, head: dict) -> dict:
    """The head options a loss takes: the top-k loss's teacher is given by its log-probabilities."""
    return {k: v for k, v in head.items() if key != "topk" or k.startswith("student_")}


HEADS_AT = [
    pytest.param((head.values[0], temperature), id=f"{head.id}-T{temperature}")
    for head, temperature in zip(HEADS, (0.7, 2.0, 0.7))
]


def _crossed_on_torch(variants: str, extras: list) -> list:
    """Every (loss, variant) with every extra on the torch backend; on the others (Triton), the extras
    dealt out over the variants (`cases(rotate=...)`)."""
    full = [
        pytest.param(*c.values, extra.values[0], id=f"{c.id}-{extra.id}", marks=c.marks)
        for c in cases(variants=variants)
        if c.values[1] == "torch"
        for extra in extras
    ]
    return full + [c for c in cases(variants=variants, rotate=extras) if c.values[1] != "torch"]


@pytest.mark.parametrize("key,backend,variant,head_at", _crossed_on_torch("variants", HEADS_AT))
def test_head_transforms_match_float64_reference(key, backend, variant, head_at):
    head, temperature = head_at
    inputs = LOSSES[key].make(bias=True)
    if key == "topk":
        inputs = make_topk(bias=True, temperature=temperature)
    check_against_reference(
        key,
        backend,
        inputs,
        grad_outputs=[torch.tensor(1.7)],
        temperature=temperature,
        alpha=0.7,
        naive_bound=key == "topk" and temperature < 1.0,
        **variant,
        **_head_options(key, head),
    )


def _extreme(key: str) -> Inputs:
    """Logits of magnitude up to ~1e4: a soft cap of 30 saturates for almost every token of the vocab,
    its derivative 1 - tanh^2 underflows there, and the gradient comes from the few logits near 0."""
    inputs = LOSSES[key].make(bias=False)
    big = {
        name: (inputs.get(name).detach() * 1e3).requires_grad_(name in inputs.student)
        for name in ("student_weight", "teacher_weight", "student_logits", "teacher_logits")
        if name in {**inputs.args, **inputs.kwargs}
    }
    return inputs.replace(**big)


SATURATED_HEADS = [
    pytest.param(dict(student_softcap=30.0, teacher_softcap=30.0), id="caps"),
    pytest.param(dict(student_logit_scale=3.0, student_softcap=50.0, teacher_softcap=30.0), id="scale-cap"),
]


@pytest.mark.parametrize("key,backend,variant,head", _crossed_on_torch("distinct_variants", SATURATED_HEADS))
def test_saturated_soft_caps_match_float64_reference(key, backend, variant, head):
    # Float32 logits of magnitude 1e4 are known to ~1e-3 absolutely: allow the naive float32 recipe's
    # error (three times), never less than float32's tolerance.
    values, grads = check_against_reference(
        key,
        backend,
        _extreme(key),
        naive_bound=True,
        temperature=2.0,
        alpha=0.7,
        **variant,
        **_head_options(key, head),
    )
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("key,backend", [c for c in cases() if c.values[0] != "topk"])
def test_identity_head_options_change_nothing(key, backend):
    inputs = LOSSES[key].make(bias=True)
    plain = run(LOSSES[key].function, inputs, backend=backend)
    identity = run(
        LOSSES[key].function,
        inputs,
        backend=backend,
        student_logit_scale=1.0,
        teacher_logit_scale=1.0,
        student_softcap=None,
        teacher_softcap=None,
    )
    for a, b in zip([*plain[0], *plain[1]], [*identity[0], *identity[1]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(dict(teacher_logit_scale=0.4), id="scale"),
        pytest.param(dict(teacher_softcap=5.0), id="cap"),
        pytest.param(dict(teacher_logit_scale=0.5, teacher_softcap=4.0), id="scale-then-cap"),
    ],
)
def test_teacher_topk_applies_the_teacher_head(head):
    hidden = torch.randn(37, 20, device=DEVICE)
    weight = torch.randn(301, 20, device=DEVICE) * 2.0
    bias = torch.randn(301, device=DEVICE)
    ids, logprobs = fusedkd.teacher_topk(
        hidden, weight, 7, 2.0, teacher_bias=bias, block_size=64, chunk_size=8, **head
    )
    ref_ids, ref_logprobs, _ = reference_teacher_topk(hidden, weight, 7, 2.0, bias, **head)
    assert torch.equal(ids.cpu(), ref_ids.cpu())
    assert_close([logprobs.double().cpu()], [ref_logprobs.cpu()], FP32_RTOL, "logprobs")
    # A positive scale and tanh are increasing: the same ids, other log-probabilities.
    plain_ids, plain_logprobs = fusedkd.teacher_topk(hidden, weight, 7, 2.0, teacher_bias=bias)
    assert torch.equal(ids, plain_ids)
    assert rel_err(logprobs.double().cpu(), plain_logprobs.double().cpu()) > 1e-2


# ----------------------------------------------------------------------------------------------------
# Layouts: every view a training loop passes gives the loss of the same values
# ----------------------------------------------------------------------------------------------------


def _column(x: torch.Tensor, width: int = 3, column: int = 1) -> torch.Tensor:
    """A [n, ...] tensor equal to `x`, as column `column` of a [n, width, ...] table (stride `width`)."""
    table = torch.zeros(x.shape[0], width, *x.shape[1:], dtype=x.dtype, device=x.device)
    table[:, column] = x.detach()
    return table[:, column]


def _every_other(x: torch.Tensor) -> torch.Tensor:
    """`big[::2]` equal to `x` (stride 2 in the first dimension)."""
    big = torch.zeros(2 * x.shape[0], *x.shape[1:], dtype=x.dtype, device=x.device)
    big[::2] = x.detach()
    return big[::2]


def _transposed(x: torch.Tensor) -> torch.Tensor:
    """`x`'s values stored transposed (the last two dimensions swapped in memory)."""
    return x.detach().transpose(-1, -2).contiguous().transpose(-1, -2)


def _shifted(x: torch.Tensor) -> torch.Tensor:
    """`x` [B, T, ...] as `y[:, :-1]` of a [B, T + 1, ...] tensor (shifted hidden states or logits)."""
    y = torch.zeros(x.shape[0], x.shape[1] + 1, *x.shape[2:], dtype=x.dtype, device=x.device)
    y[:, :-1] = x.detach()
    return y[:, :-1]


def _grad_view(view: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`view`, made differentiable (a view of a leaf base that requires grad) when `like` requires grad."""
    if not like.requires_grad:
        return view
    base = (view if view._base is None else view._base).detach().requires_grad_(True)
    return base.as_strided(view.shape, view.stride(), view.storage_offset())


# Each layout: which losses take it, and how it rewrites the inputs (equal values, new memory layout).
LAYOUTS = {
    "labels-column": (("linear", "logits", "topk"), lambda i: dict(labels=_column(i.get("labels")))),
    "labels-every-other": (
        ("linear", "logits", "topk"),
        lambda i: dict(labels=_every_other(i.get("labels"))),
    ),
    "labels-int32": (("linear", "logits", "topk"), lambda i: dict(labels=i.get("labels").int())),
    "labels-int32-column": (
        ("linear", "logits", "topk"),
        lambda i: dict(labels=_column(i.get("labels").int(), 2, 0)),
    ),
    "bias-column": (
        ("linear", "topk"),
        lambda i: {
            name: _column(i.get(name), 2, 0) for name in ("student_bias", "teacher_bias") if name in i.kwargs
        },
    ),
    "hidden-transposed": (
        ("linear", "topk"),
        lambda i: {
            name: _transposed(i.get(name)) for name in ("student_hidden", "teacher_hidden") if name in i.args
        },
    ),
    "hidden-every-other": (
        ("linear", "topk"),
        lambda i: {
            name: _every_other(i.get(name)) for name in ("student_hidden", "teacher_hidden") if name in i.args
        },
    ),
    "weights-transposed": (
        ("linear", "topk"),
        lambda i: {
            name: _transposed(i.get(name)) for name in ("student_weight", "teacher_weight") if name in i.args
        },
    ),
    "logits-transposed": (
        ("logits",),
        lambda i: {name: _transposed(i.get(name)) for name in ("student_logits", "teacher_logits")},
    ),
    "logits-column": (
        ("logits",),
        lambda i: {name: _column(i.get(name)) for name in ("student_logits", "teacher_logits")},
    ),
    "ids-and-logprobs-transposed": (
        ("topk",),
        lambda i: dict(ids=_transposed(i.get("ids")), logprobs=_transposed(i.get("logprobs"))),
    ),
}
# Layouts of [B, T, ...] inputs.
LAYOUTS_3D = {
    "3d": (("linear", "logits", "topk"), lambda i: {}),
    "3d-shifted": (
        ("linear", "logits", "topk"),
        lambda i: (
            {
                name: _shifted(i.get(name))
                for name in (
                    "student_hidden",
                    "teacher_hidden",
                    "student_logits",
                    "teacher_logits",
                    "ids",
                    "logprobs",
                )
                if name in i.args
            }
            | dict(labels=_shifted(i.get("labels")))
        ),
    ),
    "3d-labels-transposed": (
        ("linear", "logits", "topk"),
        lambda i: dict(labels=_transposed(i.get("labels"))),
    ),
}


def layout_cases():
    out = []
    for table, leading in ((LAYOUTS, (37,)), (LAYOUTS_3D, (3, 11))):
        for name, (keys, _) in table.items():
            for case in cases():
                key, backend = case.values
                if key in keys:
                    out.append(
                        pytest.param(key, backend, name, leading, id=f"{case.id}-{name}", marks=case.marks)
                    )
    return out


def _with_layout(inputs: Inputs, layout: str) -> Inputs:
    rewrite = {**LAYOUTS, **LAYOUTS_3D}[layout][1]
    views = rewrite(inputs)
    views = {name: _grad_view(view, inputs.get(name)) for name, view in views.items()}
    return inputs.replace(**views)


@pytest.mark.parametrize("key,backend,layout,leading", layout_cases())
def test_layouts_match_float64_reference(key, backend, layout, leading):
    """The loss (and student gradients) of a strided layout equal those of the same values, contiguous."""
    # Two vocabulary blocks of the interpreter's kernels, the second partial: the layout is the point.
    inputs = LOSSES[key].make(leading=leading, vocab=211, bias=True)
    laid_out = _with_layout(inputs, layout)
    if layout not in ("3d", "labels-int32"):
        changed = [
            laid_out.get(n) for n in (*inputs.args, *inputs.kwargs) if laid_out.get(n) is not inputs.get(n)
        ]
        assert any(x is not None and not x.is_contiguous() for x in changed), (
            "the layout makes no strided view"
        )
    variant = LOSSES[key].variants[1].values[0]  # reverse KL: every term of G depends on the labels' rows
    grad_outputs = [torch.rand(leading, dtype=torch.float64) for _ in range(3)]
    check_against_reference(
        key,
        backend,
        laid_out,
        expected=inputs,
        grad_outputs=grad_outputs,
        temperature=2.0,
        alpha=0.6,
        reduction="none",
        return_components=True,
        **variant,
    )
    check_against_reference(key, backend, laid_out, expected=inputs, temperature=2.0, alpha=0.6, **variant)


@pytest.mark.parametrize(
    "layout", ["hidden-transposed", "hidden-every-other", "weights-transposed", "bias-column", "3d-shifted"]
)
def test_teacher_topk_layouts(layout):
    leading = (3, 11) if layout.startswith("3d") else (37,)
    hidden = torch.randn(*leading, 20, device=DEVICE)
    weight = torch.randn(301, 20, device=DEVICE)
    bias = torch.randn(301, device=DEVICE)
    inputs = Inputs(dict(teacher_hidden=hidden, teacher_weight=weight), dict(teacher_bias=bias), ())
    rewrite = {
        "hidden-transposed": lambda: dict(teacher_hidden=_transposed(hidden)),
        "hidden-every-other": lambda: dict(teacher_hidden=_every_other(hidden)),
        "weights-transposed": lambda: dict(teacher_weight=_transposed(weight)),
        "bias-column": lambda: dict(teacher_bias=_column(bias, 2, 0)),
        "3d-shifted": lambda: dict(teacher_hidden=_shifted(hidden)),
    }[layout]
    laid_out = inputs.replace(**rewrite())
    ids, logprobs = fusedkd.teacher_topk(
        laid_out.get("teacher_hidden"),
        laid_out.get("teacher_weight"),
        7,
        2.0,
        teacher_bias=laid_out.get("teacher_bias"),
        block_size=64,
        chunk_size=8,
    )
    ref_ids, ref_logprobs, _ = reference_teacher_topk(hidden, weight, 7, 2.0, bias)
    assert torch.equal(ids.cpu(), ref_ids.cpu())
    assert_close([logprobs.double().cpu()], [ref_logprobs.cpu()], FP32_RTOL, "logprobs")


# ----------------------------------------------------------------------------------------------------
# Autocast: as torch.nn.functional.linear
# ----------------------------------------------------------------------------------------------------

AUTOCAST_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
LINEAR_CASES = [c for c in cases() if c.values[0] in ("linear", "topk")]


def _rounded(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """The inputs autocast hands the projections: float32 tensors in `dtype` (leaves, for the references)."""

    def cast(name, x):
        if x is None or not x.dtype.is_floating_point or name in inputs.keep_dtype:
            return x
        return x.detach().to(dtype).requires_grad_(x.requires_grad)

    return inputs.replace(**{n: cast(n, inputs.get(n)) for n in (*inputs.args, *inputs.kwargs)})


@pytest.mark.parametrize("key,backend", LINEAR_CASES)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_autocast_projects_in_its_dtype(key, backend, dtype):
    """Low-precision hidden states, float32 weights and biases inside torch.autocast: the projections run
    in the autocast dtype, the loss is float32, the float32 weights get float32 gradients.

    Exact means: no worse than the naive recipe on the same rounded inputs (projection in `dtype`,
    softmax in float32), against the float64 loss of those rounded inputs; the allowance is three times
    the naive error, at least four units of the dtype's rounding (eps).
    """
    inputs = LOSSES[key].make(bias=True)
    hidden = ("student_hidden", "teacher_hidden")
    inputs = inputs.replace(
        **{
            n: inputs.get(n).detach().to(dtype).requires_grad_(inputs.get(n).requires_grad)
            for n in hidden
            if n in inputs.args
        }
    )
    options = dict(temperature=2.0, alpha=0.7, **LOSSES[key].variants[1].values[0])
    with torch.autocast(DEVICE.type, dtype=dtype):
        values, grads = run(LOSSES[key].function, inputs, backend=backend, **options)
        loss = LOSSES[key].function(*inputs.args.values(), **inputs.kwargs, backend=backend, **options)
    assert loss.dtype == torch.float32
    students = inputs.students()
    for x, g in zip(students, torch.autograd.grad(loss, students)):
        assert g.dtype == x.dtype, (g.dtype, x.dtype)  # float32 gradients to the float32 weight and bias
    rounded = _rounded(inputs, dtype)
    naive_values, naive_grads = run(LOSSES[key].reference, rounded, **options)
    exact_values, exact_grads = run(LOSSES[key].reference, rounded.as_float64(), **options)
    eps = torch.finfo(dtype).eps
    for what, ours, naive, exact in (
        ("loss", values, naive_values, exact_values),
        ("grad", grads, naive_grads, exact_grads),
    ):
        for a, b, e in zip(ours, naive, exact):
            allowed = max(3 * rel_err(b, e), 4 * eps)
            assert rel_err(a, e) <= allowed, f"{what}: {rel_err(a, e):.3g} > {allowed:.3g} ({dtype})"


@pytest.mark.parametrize("key,backend", [c for c in cases() if c.values[0] == "logits"])
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_autocast_leaves_kd_loss_alone(key, backend, dtype):
    """kd_loss takes logits (no projection to cast): inside autocast it computes exactly what it computes
    outside, for float32 and for low-precision logits."""
    for logits_dtype in (torch.float32, dtype):
        inputs = make_logits(leading=(13,), vocab=211, dtype=logits_dtype)
        options = dict(temperature=2.0, alpha=0.7, divergence="jsd", beta=0.3, backend=backend)
        outside = run(fusedkd.kd_loss, inputs, **options)
        with torch.autocast(DEVICE.type, dtype=dtype):
            inside = run(fusedkd.kd_loss, inputs, **options)
        for a, b in zip(inside[0] + inside[1], outside[0] + outside[1]):
            assert torch.equal(a, b)


def test_autocast_casts_teacher_topk():
    hidden = torch.randn(9, 20, dtype=torch.bfloat16, device=DEVICE)
    weight = torch.randn(301, 20, device=DEVICE)
    with pytest.raises(TypeError, match="teacher_hidden has dtype"):
        fusedkd.teacher_topk(hidden, weight, 5)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ids, logprobs = fusedkd.teacher_topk(hidden, weight, 5, 2.0)
    assert logprobs.dtype == torch.float32
    expected = fusedkd.teacher_topk(hidden, weight.to(torch.bfloat16), 5, 2.0)
    assert torch.equal(ids, expected[0]) and torch.equal(logprobs, expected[1])


def test_autocast_leaves_float64_alone():
    """As torch.nn.functional.linear: autocast casts float32/16 tensors, not float64 ones."""
    inputs = make_linear(leading=(11,), vocab=101, dtype=torch.float64)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        values, grads = run(fusedkd.fused_linear_kd_loss, inputs, backend="torch")
    expected = run(reference.fused_linear_kd_loss, inputs)
    assert_close(values + grads, expected[0] + expected[1], 1e-12)


# ----------------------------------------------------------------------------------------------------
# No host synchronization on an accelerator; no double backward
# ----------------------------------------------------------------------------------------------------


class HostSyncError(AssertionError):
    pass


class SyncingOps(TorchDispatchMode):
    """Records the aten ops that read a device tensor on the host: `.item()` at the aten level, and the
    ops whose output size depends on tensor values (nonzero, boolean-mask indexing)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "unique", "_unique2"}

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.seen = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen += 1
        name = func.overloadpacket.__name__
        boolean_index = name.startswith("index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args
            if isinstance(a, (list, tuple))
            for i in a
        )
        if name in self.SYNCING or boolean_index:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("key", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_sync_on_the_loss_path(key, reduction):
    """Checks and torch backend, forward and backward: not one `.item()`, `.tolist()`, `bool(tensor)`."""
    inputs = LOSSES[key].make(leading=(3, 7), vocab=211, bias=True)
    options = dict(temperature=2.0, alpha=0.6, reduction=reduction, return_components=True, backend="torch")
    expected = run(LOSSES[key].function, inputs, **options)
    with pytest.MonkeyPatch.context() as patch:
        from fusedkd import _values
        from fusedkd.torch_backend import tiles

        patch.setattr(_values, "eager_value_checks", lambda device: False)
        patch.setattr(tiles, "compacts_ignored", lambda device: False)

        def sync(self, *args, **kwargs):
            raise HostSyncError("a host synchronization on the loss path")

        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            patch.setattr(torch.Tensor, name, sync)
        with SyncingOps() as recorder:
            out = LOSSES[key].function(*inputs.args.values(), **inputs.kwargs, **options)
            total = sum(o.sum() for o in out)
            grads = torch.autograd.grad(total, inputs.students())
    assert recorder.seen > 100 and recorder.ops == []
    # The same values as the eager, compacting path.
    assert_close([o.detach().double() for o in out], expected[0], 1e-6, "loss")
    assert_close([g.double() for g in grads], expected[1], 1e-6, "grad")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("key,backend", cases())
def test_no_host_sync_on_cuda(key, backend):
    """On a GPU, torch's own sync detector: a full training step of each loss never waits for the device."""
    inputs = LOSSES[key].make(leading=(4, 33), vocab=5003, bias=True)
    options = dict(temperature=2.0, alpha=0.6, backend=backend)
    run(LOSSES[key].function, inputs, **options)  # warm-up: compile kernels, load modules
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in ("mean", "none"):
            out = LOSSES[key].function(*inputs.args.values(), **inputs.kwargs, reduction=reduction, **options)
            torch.autograd.grad(out.sum(), inputs.students())
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("key,backend", cases())
def test_double_backward_is_a_clear_error(key, backend):
    inputs = LOSSES[key].make(leading=(9,), vocab=101)
    out = LOSSES[key].function(*inputs.args.values(), **inputs.kwargs, backend=backend, temperature=2.0)
    (grad,) = torch.autograd.grad(out, inputs.students()[0], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        grad.sum().backward()
    # Also when the output gradient itself requires grad (torch's own once_differentiable path).
    out = LOSSES[key].function(*inputs.args.values(), **inputs.kwargs, backend=backend, temperature=2.0)
    weight = torch.tensor(1.5, requires_grad=True)
    (grad,) = torch.autograd.grad(out * weight, inputs.students()[0], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        grad.sum().backward()


@pytest.mark.parametrize("key,backend", cases())
def test_gradient_penalty_is_a_clear_error(key, backend):
    """L + |dL/dx|^2 differentiated towards the inputs (not through the gradient's own graph): the
    second-order part cannot be dropped silently, with autograd.grad(inputs=...) or backward(inputs=...)."""
    inputs = LOSSES[key].make(leading=(9,), vocab=101)
    students = inputs.students()
    out = LOSSES[key].function(*inputs.args.values(), **inputs.kwargs, backend=backend, temperature=2.0)
    (grad,) = torch.autograd.grad(out, students[0], create_graph=True)
    penalized = out + 0.1 * grad.square().sum()
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(penalized, students, retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        penalized.backward(inputs=[students[-1]])


def test_the_sync_detectors_detect():
    """The detectors of test_no_host_sync_on_the_loss_path fire on what they look for."""
    x = torch.arange(5.0)
    with SyncingOps() as recorder:
        x.nonzero()
        x[x > 2]
        torch.ops.aten._local_scalar_dense(x[0])
    assert len(recorder.ops) == 3, recorder.ops
