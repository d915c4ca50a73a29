"""Shared test helpers: input builders, backend parametrization, error metrics with dtype tolerances."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest
import torch

import fusedkd
from fusedkd import kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _triton_skip_reason() -> str | None:
    reason = kernels.unavailable_reason(DEVICE)
    if reason is not None:
        return reason
    if importlib.util.find_spec("fusedkd.kernels.fused_linear_kd") is None:
        return "the Triton fused linear KD kernels are not part of this checkout"
    return None


BACKENDS = [
    pytest.param("torch", id="torch"),
    # The torch backend as on large shapes: many chunks of a few groups of rows, partial last ones.
    pytest.param("torch", id="torch-small-tiles", marks=pytest.mark.small_tiles(3)),
    pytest.param(
        "triton",
        id="triton",
        marks=pytest.mark.skipif(_triton_skip_reason() is not None, reason=str(_triton_skip_reason())),
    ),
]

# Relative (norm-wise) error allowed for float32 inputs against a float64 reference: float32 rounding
# (2^-24) amplified by sums over a few thousand vocabulary entries and the hidden dimension.
FP32_RTOL = 2e-5


@dataclass
class Case:
    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    labels: torch.Tensor
    student_bias: torch.Tensor | None = None
    teacher_bias: torch.Tensor | None = None


def make_case(
    n: int = 37,
    vocab: int = 1003,
    student_dim: int = 24,
    teacher_dim: int = 40,
    *,
    dtype: torch.dtype = torch.float32,
    ignore_fraction: float = 0.2,
    teacher: str = "random",
    logit_scale: float = 1.0,
    bias: bool = False,
    leading: tuple[int, ...] | None = None,
    extra_student_rows: int = 0,
    extra_teacher_rows: int = 0,
    ignore_index: int = -100,
) -> Case:
    """Random inputs whose logits have standard deviation about `logit_scale`.

    teacher="peaked": each token's teacher hidden state is aligned with one teacher weight row, so the
    teacher puts most of its mass on one token; "flat": tiny teacher logits (near-uniform).
    """
    leading = leading or (n,)
    n = int(torch.tensor(leading).prod())
    hs = torch.randn(n, student_dim) / student_dim**0.5
    ws = torch.randn(vocab + extra_student_rows, student_dim) * logit_scale
    ht = torch.randn(n, teacher_dim) / teacher_dim**0.5
    wt = torch.randn(vocab + extra_teacher_rows, teacher_dim) * logit_scale
    if teacher == "peaked":
        favourite = torch.randint(0, vocab, (n,))
        ht = wt[favourite] / wt[favourite].norm(dim=-1, keepdim=True) * 8.0 / logit_scale
    elif teacher == "flat":
        wt = wt * 0.01
    labels = torch.randint(0, vocab, (n,))
    labels[torch.rand(n) < ignore_fraction] = ignore_index
    sb = torch.randn(vocab + extra_student_rows) if bias else None
    tb = torch.randn(vocab + extra_teacher_rows) if bias else None

    def prep(x, grad):
        if x is None:
            return None
        return x.to(dtype=dtype, device=DEVICE).requires_grad_(grad)

    return Case(
        student_hidden=prep(hs.reshape(*leading, student_dim), True),
        student_weight=prep(ws, True),
        teacher_hidden=prep(ht.reshape(*leading, teacher_dim), False),
        teacher_weight=prep(wt, False),
        labels=labels.reshape(leading).to(DEVICE),
        student_bias=prep(sb, True),
        teacher_bias=prep(tb, False),
    )


def as_float64(case: Case) -> Case:
    def up(x):
        if x is None:
            return None
        return x.detach().double().requires_grad_(x.requires_grad)

    return Case(
        up(case.student_hidden),
        up(case.student_weight),
        up(case.teacher_hidden),
        up(case.teacher_weight),
        case.labels,
        up(case.student_bias),
        up(case.teacher_bias),
    )


def run_loss(fn, case: Case, grad_outputs=None, **options):
    """Loss (or components) and the student gradients of `fn` on `case`, as float64 tensors."""
    student = [case.student_hidden, case.student_weight] + (
        [case.student_bias] if case.student_bias is not None else []
    )
    for x in student:
        x.grad = None
    out = fn(
        case.student_hidden,
        case.student_weight,
        case.teacher_hidden,
        case.teacher_weight,
        case.labels,
        student_bias=case.student_bias,
        teacher_bias=case.teacher_bias,
        **options,
    )
    outputs = out if isinstance(out, tuple) else (out,)
    if grad_outputs is None:
        grad_outputs = [torch.ones_like(o) for o in outputs]
    total = sum((o * g.to(o.dtype)).sum() for o, g in zip(outputs, grad_outputs))
    total.backward()
    values = [o.detach().double().cpu() for o in outputs]
    grads = [x.grad.detach().double().cpu() for x in student]
    return values, grads


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error; exact zeros must be matched to within 1e-30."""
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float, what: str = ""):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what}[{i}]: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert torch.isfinite(a).all(), f"{what}[{i}]: non-finite values"
        err = rel_err(a, e)
        assert err <= rtol, f"{what}[{i}]: relative error {err:.3g} > {rtol:.3g}"


def fused(backend: str):
    def fn(*args, **kwargs):
        return fusedkd.fused_linear_kd_loss(*args, backend=backend, **kwargs)

    return fn
