"""`torch.compile` around the losses: one graph (`fullgraph=True`), the eager values and gradients.

Inside a compiled region each loss is one opaque op (`fusedkd._compile`): the compiler neither breaks
the graph at the loss's host-side logic nor traces its internals. Most cases compile with the
"aot_eager" backend (the graph capture and the autograd split that inductor also does, without its
code generation, which takes minutes here); one case runs inductor itself.
"""

from __future__ import annotations

import pytest
import torch

import fusedkd
from tests._helpers import BACKENDS

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
N, V, H_S, H_T = 13, 97, 8, 12
TRITON_MARKS = [m for b in BACKENDS if b.id == "triton" for m in b.marks]


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, N, H_S, generator=generator)
    teacher_hidden = torch.randn(2, N, H_T, generator=generator)
    teacher_weight = torch.randn(V, H_T, generator=generator) / 2
    labels = torch.randint(0, V, (2, N), generator=generator)
    labels[0, :4] = -100
    return x, teacher_hidden, teacher_weight, labels


class Student(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = torch.nn.Linear(H_S, H_S)
        self.head = torch.nn.Linear(H_S, V)


def _step(kind: str, student: Student, criterion, options: dict):
    """A training step's loss: the student's layer, then the loss (function or Module) on its output."""

    def step(x, teacher_hidden, teacher_weight, labels):
        hidden = torch.tanh(student.body(x))
        if kind == "linear":
            args = (hidden, student.head.weight, teacher_hidden, teacher_weight, labels)
            if criterion is not None:
                return criterion(*args, student_bias=student.head.bias)
            return fusedkd.fused_linear_kd_loss(*args, student_bias=student.head.bias, **options)
        if kind == "logits":
            args = (student.head(hidden), teacher_hidden @ teacher_weight.T, labels)
            return criterion(*args) if criterion is not None else fusedkd.kd_loss(*args, **options)
        ids, logprobs = torch.log_softmax(teacher_hidden @ teacher_weight.T, -1).topk(7).indices, None
        logprobs = torch.log_softmax(teacher_hidden @ teacher_weight.T, -1).gather(-1, ids)
        args = (hidden, student.head.weight, ids, logprobs, labels)
        if criterion is not None:
            return criterion(*args, student_bias=student.head.bias)
        return fusedkd.fused_linear_topk_kd_loss(*args, student_bias=student.head.bias, **options)

    return step


MODULES = {
    "linear": fusedkd.FusedLinearKDLoss,
    "logits": fusedkd.KDLoss,
    "topk": fusedkd.FusedLinearTopKKDLoss,
}


def _run(step, student, inputs):
    out = step(*inputs)
    outputs = out if isinstance(out, tuple) else (out,)
    # An output gradient other than 1 on the loss: the ops form the gradients for 1 and scale them once.
    total = sum(w * o.sum() for w, o in zip((1.7, 0.3, 0.7), outputs))
    params = list(student.parameters())
    grads = torch.autograd.grad(total, params)
    return [o.detach() for o in outputs], list(grads)


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=2.0, alpha=0.6),
        dict(divergence="reverse_kl", reduction="none", alpha=0.3),
        dict(divergence="forward_kl", reduction="sum", return_components=True, alpha=0.5),
    ],
    ids=["mean", "none", "components"],
)
@pytest.mark.parametrize("form", ["function", "module"])
@pytest.mark.parametrize(
    "backend,kind",
    [
        *(("torch", kind) for kind in ("linear", "logits", "topk")),
        # the top-k loss has no Triton backend
        *(pytest.param("triton", kind, marks=TRITON_MARKS) for kind in ("linear", "logits")),
    ],
)
def test_compiled_step_is_one_graph_with_the_eager_results(backend, kind, form, options):
    options = dict(options, backend=backend)
    if kind == "topk" and options.get("divergence") == "jsd":
        options.pop("divergence")
    student = Student()
    criterion = MODULES[kind](**options) if form == "module" else None
    step = _step(kind, student, criterion, options)
    inputs = _inputs()
    eager_values, eager_grads = _run(step, student, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    values, grads = _run(compiled, student, inputs)
    for a, b in zip(values + grads, eager_values + eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # Nothing of the compiled call carries over: the eager step again gives its own gradients.
    _, again = _run(step, student, inputs)
    for a, b in zip(again, eager_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_inductor_compiles_a_step_with_the_loss_inside():
    student = Student()
    step = _step("linear", student, None, dict(temperature=2.0, alpha=0.6, backend="torch"))
    inputs = _inputs()
    eager_values, eager_grads = _run(step, student, inputs)
    torch._dynamo.reset()
    values, grads = _run(torch.compile(step, fullgraph=True), student, inputs)
    for a, b in zip(values + grads, eager_values + eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_options_are_checked_when_the_compiler_traces():
    student = Student()
    step = _step("linear", student, None, dict(temperature=-1.0))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="temperature must be finite and > 0"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(*_inputs())


def test_forward_formed_gradients_are_scaled_unless_the_output_gradient_is_one():
    from fusedkd._autograd import EagerGradients, unit_output_gradient

    grad_loss = torch.tensor(2.5)
    scaled = EagerGradients([torch.ones(3), None])
    with unit_output_gradient():
        unit = EagerGradients([torch.ones(3), None])
    assert scaled.take(grad_loss, None, None)[0].tolist() == [2.5] * 3
    assert unit.take(grad_loss, None, None)[0].tolist() == [1.0] * 3
    assert unit.take(grad_loss, None, None) is None  # handed out once
    assert EagerGradients([torch.ones(3)]).take(grad_loss, None, None)[0].tolist() == [2.5] * 3
