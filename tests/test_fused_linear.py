"""`fused_linear_kd_loss`'s own tests: peaked and flat teachers, extreme logits, low precision, padded
heads, the module, no_grad, retained graphs, backend choice (the contract shared by every loss, exactness
on the (divergence, temperature, alpha) grid included, is tests/test_contract.py)."""

from __future__ import annotations

import pytest
import torch
from _helpers import (
    BACKENDS,
    DEVICE,
    FP32_RTOL,
    as_float64,
    assert_close,
    fused,
    make_case,
    rel_err,
    run_loss,
)

import fusedkd
from fusedkd import reference
from fusedkd._dispatch import resolve_backend

DIVERGENCES = [
    pytest.param("forward_kl", 0.5, id="fkl"),
    pytest.param("reverse_kl", 0.5, id="rkl"),
    pytest.param("jsd", 0.0, id="jsd0"),
    pytest.param("jsd", 0.3, id="jsd0.3"),
    pytest.param("jsd", 1.0, id="jsd1"),
]


def check_against_reference(backend, case, rtol=FP32_RTOL, grad_outputs=None, **options):
    values, grads = run_loss(fused(backend), case, grad_outputs, **options)
    ref_values, ref_grads = run_loss(
        reference.fused_linear_kd_loss, as_float64(case), grad_outputs, **options
    )
    assert_close(values, ref_values, rtol, "loss")
    assert_close(grads, ref_grads, rtol, "grad")
    return values, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher", ["peaked", "flat"])
@pytest.mark.parametrize("divergence,beta", [DIVERGENCES[0], DIVERGENCES[1], DIVERGENCES[3]])
def test_peaked_and_flat_teachers(backend, teacher, divergence, beta):
    case = make_case(vocab=301, teacher=teacher)  # three interpreter blocks, the last partial
    check_against_reference(backend, case, divergence=divergence, beta=beta, temperature=1.0, alpha=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", [DIVERGENCES[0], DIVERGENCES[1], DIVERGENCES[3]])
@pytest.mark.parametrize("temperature", [0.5, 20.0])
def test_extreme_logits(backend, divergence, beta, temperature):
    # Logits of magnitude ~1e4: every exp must be taken relative to a running maximum.
    # float32 then carries an absolute error of ~eps * |logit| / T in every log-probability, so the
    # allowance is the naive float32 recipe's own error (x3), never less than the usual float32 bound.
    case = make_case(n=23, vocab=611, logit_scale=1e4)
    options = dict(divergence=divergence, beta=beta, temperature=temperature, alpha=0.5)
    ours = run_loss(fused(backend), case, **options)
    naive = run_loss(reference.fused_linear_kd_loss, case, **options)
    exact = run_loss(reference.fused_linear_kd_loss, as_float64(case), **options)
    for a, b, e in zip(ours[0] + ours[1], naive[0] + naive[1], exact[0] + exact[1]):
        assert torch.isfinite(a).all()
        allowed = max(3 * rel_err(b, e), FP32_RTOL)
        assert rel_err(a, e) <= allowed, f"{rel_err(a, e):.3g} > {allowed:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_shape_and_padded_heads(backend):
    # [B, T, H] inputs; heads of different padded sizes over one vocabulary (vocab_size=).
    case = make_case(leading=(3, 11), vocab=509, extra_student_rows=7, extra_teacher_rows=19, bias=True)
    options = dict(vocab_size=509, reduction="none", alpha=0.7, temperature=2.0)
    grad_outputs = [torch.rand(3, 11, dtype=torch.float64)]
    values, grads = check_against_reference(backend, case, grad_outputs=grad_outputs, **options)
    assert values[0].shape == (3, 11)
    assert (grads[1][509:] == 0).all() and (grads[2][509:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("divergence,beta", [DIVERGENCES[0], DIVERGENCES[1], DIVERGENCES[3]])
def test_low_precision(backend, dtype, divergence, beta):
    """Exact means: no worse than the naive recipe in the same dtype (docs/design.md §6).

    Both are compared with the float64 loss of the very same (rounded) inputs. The allowance is three
    times the naive recipe's own error, with a floor of a few units of the dtype's rounding (eps),
    since the naive error can be small by chance on one metric.
    """
    case = make_case(dtype=dtype)
    options = dict(divergence=divergence, beta=beta, temperature=2.0, alpha=0.7)
    values, grads = run_loss(fused(backend), case, **options)
    naive_values, naive_grads = run_loss(reference.fused_linear_kd_loss, case, **options)
    ref_values, ref_grads = run_loss(reference.fused_linear_kd_loss, as_float64(case), **options)
    eps = torch.finfo(dtype).eps
    for what, ours, naive, exact in (
        ("loss", values, naive_values, ref_values),
        ("grad", grads, naive_grads, ref_grads),
    ):
        for a, b, e in zip(ours, naive, exact):
            allowed = max(3 * rel_err(b, e), 4 * eps)
            assert rel_err(a, e) <= allowed, f"{what}: {rel_err(a, e):.3g} > {allowed:.3g} ({dtype})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_function(backend):
    case = make_case(n=13, vocab=211)
    options = dict(divergence="jsd", beta=0.4, temperature=1.5, alpha=0.8, backend=backend)
    criterion = fusedkd.FusedLinearKDLoss(**options)
    module_loss = criterion(
        case.student_hidden, case.student_weight, case.teacher_hidden, case.teacher_weight, case.labels
    )
    function_loss = fusedkd.fused_linear_kd_loss(
        case.student_hidden,
        case.student_weight,
        case.teacher_hidden,
        case.teacher_weight,
        case.labels,
        **options,
    )
    assert module_loss.item() == function_loss.item()
    assert "jsd" in repr(criterion)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_work_under_no_grad(backend):
    case = make_case(n=21, vocab=401)
    with torch.no_grad():
        loss = fusedkd.fused_linear_kd_loss(
            case.student_hidden,
            case.student_weight,
            case.teacher_hidden,
            case.teacher_weight,
            case.labels,
            backend=backend,
        )
    assert loss.grad_fn is None and case.student_weight.grad is None
    # And the teacher is frozen even when its tensors require grad.
    teacher_weight = case.teacher_weight.detach().requires_grad_(True)
    loss = fusedkd.fused_linear_kd_loss(
        case.student_hidden,
        case.student_weight,
        case.teacher_hidden,
        teacher_weight,
        case.labels,
        backend=backend,
    )
    loss.backward()
    assert teacher_weight.grad is None and case.student_weight.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_through_retained_graph(backend):
    case = make_case(n=15, vocab=203)
    loss = fusedkd.fused_linear_kd_loss(
        case.student_hidden,
        case.student_weight,
        case.teacher_hidden,
        case.teacher_weight,
        case.labels,
        backend=backend,
        alpha=0.4,
        temperature=2.0,
    )
    loss.backward(retain_graph=True)
    first = case.student_weight.grad.clone()
    case.student_weight.grad = None
    (2 * loss).backward()
    torch.testing.assert_close(case.student_weight.grad, 2 * first, rtol=1e-5, atol=1e-7)


def test_auto_backend_on_cpu_is_torch():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA")
def test_auto_backend_on_cuda_is_triton():
    assert resolve_backend("auto", DEVICE) == "triton"
