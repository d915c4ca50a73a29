"""`kd_loss` / `KDLoss` over logits, every backend, against the float64 reference and the fused loss."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _helpers import BACKENDS, DEVICE, FP32_RTOL, assert_close, reference_kd_loss, rel_err
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fusedkd
from fusedkd import kernels
from fusedkd.logits import KDLoss, kd_loss

DIVERGENCES = [
    pytest.param("forward_kl", 0.5, id="fkl"),
    pytest.param("reverse_kl", 0.5, id="rkl"),
    pytest.param("jsd", 0.3, id="jsd0.3"),
]
# The interpreter evaluates `-inf - -inf` and `log(0)` in masked lanes whose results are discarded.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def make_logits(
    leading=(37,),
    vocab=1003,
    *,
    dtype=torch.float32,
    scale=3.0,
    teacher="random",
    ignore_fraction=0.2,
    extra_student=0,
    extra_teacher=0,
):
    """Student logits (requiring grad), teacher logits and labels with ~`ignore_fraction` ignored."""
    n = math.prod(leading)
    student = torch.randn(n, vocab + extra_student) * scale
    teacher_logits = torch.randn(n, vocab + extra_teacher) * scale
    if teacher == "peaked":
        teacher_logits[torch.arange(n), torch.randint(0, vocab, (n,))] += 12.0
    elif teacher == "flat":
        teacher_logits *= 1e-3
    labels = torch.randint(0, vocab, (n,))
    labels[torch.rand(n) < ignore_fraction] = -100
    student = student.reshape(*leading, -1).to(DEVICE, dtype).requires_grad_(True)
    teacher_logits = teacher_logits.reshape(*leading, -1).to(DEVICE, dtype)
    return student, teacher_logits, labels.reshape(leading).to(DEVICE)


def run(fn, student, teacher, labels, grad_outputs=None, **options):
    """Outputs and the student-logits gradient of `fn`, as float64 CPU tensors."""
    student.grad = None
    out = fn(student, teacher, labels, **options)
    outputs = out if isinstance(out, tuple) else (out,)
    if grad_outputs is None:
        grad_outputs = [torch.ones_like(o) for o in outputs]
    sum((o * g.to(o.dtype)).sum() for o, g in zip(outputs, grad_outputs)).backward()
    return [o.detach().double().cpu() for o in outputs], [student.grad.double().cpu()]


def fused(backend):
    def fn(*args, **kwargs):
        return kd_loss(*args, backend=backend, **kwargs)

    return fn


def as_float64(student):
    return student.detach().double().requires_grad_(True)


def check_against_reference(backend, student, teacher, labels, rtol=FP32_RTOL, grad_outputs=None, **options):
    values, grads = run(fused(backend), student, teacher, labels, grad_outputs, **options)
    ref_values, ref_grads = run(
        reference_kd_loss, as_float64(student), teacher.double(), labels, grad_outputs, **options
    )
    assert_close(values, ref_values, rtol, "loss")
    assert_close(grads, ref_grads, rtol, "grad")
    return values, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "divergence,beta",
    DIVERGENCES + [pytest.param("jsd", 0.0, id="jsd0"), pytest.param("jsd", 1.0, id="jsd1")],
)
def test_equals_fused_linear_kd_loss_on_the_same_logits(backend, divergence, beta):
    """kd_loss(h_s W_s^T + b_s, h_t W_t^T) is fused_linear_kd_loss(h_s, W_s, h_t, W_t), gradients included."""
    n, vocab, hs, ht = 29, 611, 16, 24
    student_hidden = torch.randn(n, hs, dtype=torch.float64, requires_grad=True)
    student_weight = torch.randn(vocab, hs, dtype=torch.float64, requires_grad=True)
    student_bias = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(n, ht, dtype=torch.float64), torch.randn(vocab, ht).double()
    labels = torch.randint(0, vocab, (n,))
    labels[::4] = -100
    options = dict(divergence=divergence, beta=beta, temperature=2.5, alpha=0.6, return_components=True)
    linear = fusedkd.fused_linear_kd_loss(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        student_bias=student_bias,
        backend="torch",
        **options,
    )
    sum(linear).backward()
    linear_grads = [x.grad.clone() for x in (student_hidden, student_weight, student_bias)]

    student_logits = torch.addmm(student_bias, student_hidden, student_weight.T).detach().requires_grad_(True)
    ours = kd_loss(
        student_logits.to(DEVICE),
        (teacher_hidden @ teacher_weight.T).to(DEVICE),
        labels,
        backend=backend,
        **options,
    )
    sum(ours).backward()
    grad_logits = student_logits.grad
    chain = [grad_logits @ student_weight, grad_logits.T @ student_hidden, grad_logits.sum(0)]
    assert_close([x.detach().cpu() for x in ours], [x.detach() for x in linear], 1e-12, "loss")
    assert_close(chain, linear_grads, 1e-12, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher", ["peaked", "flat"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_peaked_and_flat_teachers(backend, teacher, divergence, beta):
    student, teacher_logits, labels = make_logits(leading=(23,), vocab=517, teacher=teacher)
    check_against_reference(
        backend, student, teacher_logits, labels, divergence=divergence, beta=beta, temperature=1.0, alpha=0.7
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 20.0])
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["spread", "offset"])
def test_extreme_logits(backend, divergence, beta, temperature, offset):
    """Logits of magnitude ~1e4 (spread out, or close together around 1e4): no overflow, no NaN.

    float32 carries an absolute error of ~eps * |logit| / T in every log-probability, so the allowance
    is the naive float32 recipe's own error (x3), never less than the usual float32 bound.
    """
    student, teacher, labels = make_logits(leading=(23,), vocab=611, scale=1e4 if offset == 0 else 2.0)
    student = (student.detach() + offset).requires_grad_(True)
    teacher = teacher + offset
    options = dict(divergence=divergence, beta=beta, temperature=temperature, alpha=0.5)
    ours = run(fused(backend), student, teacher, labels, **options)
    naive = run(reference_kd_loss, student, teacher, labels, **options)
    exact = run(reference_kd_loss, as_float64(student), teacher.double(), labels, **options)
    for a, b, e in zip(ours[0] + ours[1], naive[0] + naive[1], exact[0] + exact[1]):
        assert torch.isfinite(a).all()
        allowed = max(3 * rel_err(b, e), FP32_RTOL)
        assert rel_err(a, e) <= allowed, f"{rel_err(a, e):.3g} > {allowed:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_low_precision(backend, dtype, divergence, beta):
    """No worse than the naive recipe in the same dtype, against the float64 loss of the same inputs.

    The allowance is three times the naive recipe's own error, with a floor of a few units of the
    dtype's rounding (eps): the gradient itself is stored in `dtype`.
    """
    student, teacher, labels = make_logits(leading=(23,), vocab=517, dtype=dtype)
    options = dict(divergence=divergence, beta=beta, temperature=2.0, alpha=0.7)
    values, grads = run(fused(backend), student, teacher, labels, **options)
    naive_values, naive_grads = run(reference_kd_loss, student, teacher, labels, **options)
    ref_values, ref_grads = run(reference_kd_loss, as_float64(student), teacher.double(), labels, **options)
    assert student.grad.dtype == dtype
    eps = torch.finfo(dtype).eps
    for what, ours, naive, exact in (
        ("loss", values, naive_values, ref_values),
        ("grad", grads, naive_grads, ref_grads),
    ):
        for a, b, e in zip(ours, naive, exact):
            allowed = max(3 * rel_err(b, e), 4 * eps)
            assert rel_err(a, e) <= allowed, f"{what}: {rel_err(a, e):.3g} > {allowed:.3g} ({dtype})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend):
    """A bfloat16 teacher against a float32 student: the teacher is read in its own dtype."""
    student, teacher, labels = make_logits(leading=(19,), vocab=307)
    teacher = teacher.to(torch.bfloat16)
    values, grads = run(fused(backend), student, teacher, labels, alpha=0.7, temperature=2.0)
    ref_values, ref_grads = run(
        reference_kd_loss, as_float64(student), teacher.double(), labels, alpha=0.7, temperature=2.0
    )
    assert_close(values + grads, ref_values + ref_grads, FP32_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_view_and_padded_vocabulary(backend):
    """`logits[:, :-1]` (rows that no view can flatten) is read in place; vocab_size cuts padded columns."""
    vocab = 509
    student_full, teacher_full, labels = make_logits(
        leading=(3, 12), vocab=vocab, extra_student=7, extra_teacher=19
    )
    student, teacher, labels = student_full[:, :-1], teacher_full[:, :-1], labels[:, 1:]
    assert not student.is_contiguous()
    options = dict(vocab_size=vocab, reduction="none", alpha=0.7, temperature=2.0)
    grad_outputs = [torch.rand(3, 11, dtype=torch.float64)]
    student_full.grad = None
    loss = kd_loss(student, teacher, labels, backend=backend, **options)
    (loss * grad_outputs[0].to(loss.dtype)).sum().backward()
    ref_student = as_float64(student_full)
    ref_loss = reference_kd_loss(ref_student[:, :-1], teacher.double(), labels, **options)
    (ref_loss * grad_outputs[0]).sum().backward()
    assert_close([loss.detach().double().cpu()], [ref_loss.detach()], FP32_RTOL, "loss")
    assert_close([student_full.grad.double().cpu()], [ref_student.grad], FP32_RTOL, "grad")
    assert (student_full.grad[:, :, vocab:] == 0).all() and (student_full.grad[:, -1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_masked_vocabulary_entries_are_zero_probabilities(backend, divergence, beta):
    """-inf logits (in both models) are tokens of probability 0: the loss is that of the other columns."""
    student, teacher, labels = make_logits(leading=(21,), vocab=400)
    masked = torch.zeros(400, dtype=torch.bool)
    masked[torch.randperm(400)[:90]] = True
    labels[torch.isin(labels, masked.nonzero().view(-1).to(DEVICE))] = -100
    student_masked = student.detach().masked_fill(masked.to(DEVICE), -math.inf).requires_grad_(True)
    teacher_masked = teacher.masked_fill(masked.to(DEVICE), -math.inf)
    options = dict(divergence=divergence, beta=beta, temperature=1.5, alpha=0.6)
    values, grads = run(fused(backend), student_masked, teacher_masked, labels, **options)
    # The same loss without the masked columns (labels renumbered into the kept columns).
    kept = (~masked).nonzero().view(-1)
    renumber = torch.full((400,), -100, dtype=torch.long)
    renumber[kept] = torch.arange(kept.numel())
    kept_labels = torch.where(labels.cpu() == -100, -100, renumber[labels.cpu().clamp(min=0)])
    kept_student = as_float64(student[:, kept.to(DEVICE)])
    ref_values, ref_grads = run(
        reference_kd_loss, kept_student, teacher[:, kept.to(DEVICE)].double(), kept_labels, **options
    )
    assert_close(values, ref_values, FP32_RTOL, "loss")
    assert_close([grads[0][:, kept]], ref_grads, FP32_RTOL, "grad")
    assert (grads[0][:, masked] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_zero_probabilities_in_forward_kl(backend):
    """Forward KL is finite when only the teacher has -inf logits (tokens with p = 0, q > 0)."""
    student, teacher, labels = make_logits(leading=(13,), vocab=203)
    teacher = teacher.masked_fill(torch.rand(203, device=DEVICE) < 0.3, -math.inf)
    options = dict(divergence="forward_kl", temperature=2.0, alpha=0.5)
    values, grads = run(fused(backend), student, teacher, labels, **options)
    ref_values, ref_grads = run(reference_kd_loss, as_float64(student), teacher.double(), labels, **options)
    assert_close(values + grads, ref_values + ref_grads, FP32_RTOL)


@pytest.mark.slow  # 15-20 s each under the interpreter
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_triton_kernel_over_many_vocabulary_blocks(monkeypatch, divergence, beta):
    """Small vocabulary blocks, with maxima that move from block to block: the online rescaling is exact."""
    if kernels.unavailable_reason(DEVICE) is not None:
        pytest.skip(str(kernels.unavailable_reason(DEVICE)))
    from fusedkd.kernels import kd_logits as kd_logits_kernels

    monkeypatch.setattr(kd_logits_kernels, "MAX_BLOCK_V", 64)
    student, teacher, labels = make_logits(leading=(11,), vocab=401, dtype=torch.float64)
    ramp = torch.linspace(0.0, 30.0, 401, dtype=torch.float64, device=DEVICE)
    student = (student.detach() + ramp).requires_grad_(True)
    teacher = teacher + ramp.flip(0)
    for reduction in ("mean", "none"):
        grad_outputs = [torch.randn(11 if reduction == "none" else (), dtype=torch.float64) for _ in range(3)]
        check_against_reference(
            "triton",
            student,
            teacher,
            labels,
            rtol=1e-12,
            grad_outputs=grad_outputs,
            divergence=divergence,
            beta=beta,
            temperature=2.5,
            alpha=0.7,
            reduction=reduction,
            return_components=True,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_function(backend):
    student, teacher, labels = make_logits(leading=(13,), vocab=211)
    criterion = KDLoss(0.7, 5.0, divergence="jsd", beta=0.4, backend=backend)  # alpha, temperature
    module_loss = criterion(student, teacher, labels)
    function_loss = kd_loss(
        student, teacher, labels, alpha=0.7, temperature=5.0, divergence="jsd", beta=0.4, backend=backend
    )
    assert module_loss.item() == function_loss.item()
    assert "alpha=0.7" in repr(criterion) and "temperature=5.0" in repr(criterion)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_work_under_no_grad_and_frozen_teacher(backend):
    student, teacher, labels = make_logits(leading=(21,), vocab=401)
    with torch.no_grad():
        loss = kd_loss(student, teacher, labels, backend=backend)
    assert loss.grad_fn is None and student.grad is None
    teacher = teacher.detach().requires_grad_(True)
    kd_loss(student, teacher, labels, backend=backend).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_through_retained_graph(backend):
    student, teacher, labels = make_logits(leading=(15,), vocab=203)
    loss = kd_loss(student, teacher, labels, backend=backend, alpha=0.4, temperature=2.0)
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    student.grad = None
    (2 * loss).backward()
    torch.testing.assert_close(student.grad, 2 * first, rtol=1e-5, atol=1e-7)


def good_logits(n=6, vocab=50):
    return torch.randn(n, vocab), torch.randn(n, vocab), torch.randint(0, vocab, (n,))


class NewStorages(TorchDispatchMode):
    """Records every tensor an aten op allocates (an output whose storage is new) as (numel, op)."""

    def __init__(self):
        super().__init__()
        self.allocations: list[tuple[int, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {
            x.untyped_storage().data_ptr()
            for x in tree_flatten((args, kwargs))[0]
            if isinstance(x, torch.Tensor)
        }
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in inputs:
                self.allocations.append((x.numel(), func))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "options",
    [
        dict(reduction="mean", alpha=0.7, temperature=5.0),  # gradient formed in the forward
        dict(reduction="none", alpha=0.7, temperature=5.0, divergence="jsd", beta=0.3),  # recomputed
        dict(reduction="sum", alpha=0.5, return_components=True, divergence="reverse_kl"),
    ],
    ids=["mean", "none-jsd", "components-rkl"],
)
def test_torch_backend_allocates_one_tokens_by_vocab_tensor_the_gradient(dtype, options):
    batch, seq, vocab, chunk = 4, 16, 30_011, 8
    n = batch * (seq - 1)
    # Shifted views, as `logits[:, :-1]` (their rows cannot be flattened into one view).
    student = torch.randn(batch, seq, vocab, dtype=dtype)[:, :-1].requires_grad_(True)
    teacher = torch.randn(batch, seq, vocab, dtype=dtype)[:, :-1]
    labels = torch.randint(0, vocab, (batch, seq))[:, 1:]
    labels[:, ::5] = -100
    with NewStorages() as recorder:
        out = kd_loss(student, teacher, labels, backend="torch", chunk_size=chunk, **options)
        loss = out[0] if isinstance(out, tuple) else out
        loss.sum().backward()
    full = [(numel, op) for numel, op in recorder.allocations if numel >= n * vocab]
    assert len(full) == 1, full  # the student-logits gradient, nothing else
    largest_other = max(numel for numel, _ in recorder.allocations if numel < n * vocab)
    assert largest_other <= chunk * vocab, largest_other
    assert student.grad.dtype == dtype and torch.isfinite(student.grad).all()


@pytest.mark.slow
@pytest.mark.skipif(kernels.TRITON_IMPORT_ERROR is not None, reason="needs Triton")
def test_triton_kernels_compile_for_a_gpu():
    """The interpreter accepts code the compiler rejects: build the kernels for sm_90 (no GPU needed)."""
    script = textwrap.dedent(
        """
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from fusedkd.kernels.kd_logits_backward import kd_logits_backward_kernel
        from fusedkd.kernels.kd_logits_forward import kd_logits_forward_kernel

        rows = {"student_ptr": "*bf16", "student_row_offsets_ptr": "*i64", "student_stride_v": "i32",
                "teacher_ptr": "*fp16", "teacher_row_offsets_ptr": "*i64", "teacher_stride_v": "i32",
                "labels_ptr": "*i64", "token_index_ptr": "*i64", "num_valid_ptr": "*i64"}
        tail = {"vocab_size": "i32", "grad_cols": "i32", "inv_temperature": "fp64", "beta": "fp32",
                "student_logit_scale": "fp32", "student_softcap": "fp32", "teacher_logit_scale": "fp32",
                "teacher_softcap": "fp32"}
        forward = dict(rows, stats_ptr="*fp32", divergence_ptr="*fp32", ce_ptr="*fp32", grad_ptr="*bf16",
                       w_distill_ptr="*fp32", w_ce_ptr="*fp32", **tail)
        backward = dict(rows, stats_ptr="*fp32", grad_ptr="*bf16", w_distill_ptr="*fp32", w_ce_ptr="*fp32",
                        w_stride="i32", **tail)
        for fn, signature, flags in (
            (kd_logits_forward_kernel, forward, dict(DIVERGENCE=2, HAS_LABELS=True, FUSE_GRAD=True,
                                                     STUDENT_SOFTCAP=True, TEACHER_SOFTCAP=False)),
            (kd_logits_backward_kernel, backward, dict(DIVERGENCE=1, HAS_LABELS=True, STUDENT_SOFTCAP=True,
                                                       TEACHER_SOFTCAP=True)),
        ):
            constexprs = dict(flags, ACC_DTYPE=tl.float32, BLOCK_V=2048)
            signature = dict(signature, **{name: "constexpr" for name in constexprs})
            triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0 and ("ASTSource" in result.stderr or "GPUTarget" in result.stderr):
        pytest.skip(f"this Triton's ahead-of-time compile API differs: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr[-3000:]


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` does nothing (the launcher's allocations only)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.skipif(kernels.unavailable_reason(DEVICE) is not None, reason="needs the Triton backend")
@pytest.mark.parametrize("reduction", ["mean", "none"], ids=["fused-gradient", "backward-kernel"])
def test_triton_launcher_allocates_the_gradient_and_O_of_N(monkeypatch, reduction):
    """Around the kernels, the Triton path allocates G (student dtype) and O(N) statistics, nothing else."""
    from fusedkd.kernels import kd_logits as kd_logits_kernels

    monkeypatch.setattr(kd_logits_kernels, "kd_logits_forward_kernel", _NoLaunch())
    monkeypatch.setattr(kd_logits_kernels, "kd_logits_backward_kernel", _NoLaunch())
    n, vocab = 64, 151_936
    student = torch.zeros(4, n // 4 + 1, vocab, dtype=torch.bfloat16, device=DEVICE)[:, 1:].requires_grad_(
        True
    )
    teacher = torch.zeros(4, n // 4 + 1, vocab, dtype=torch.bfloat16, device=DEVICE)[:, 1:]
    labels = torch.randint(0, vocab, (4, n // 4), device=DEVICE)
    with NewStorages() as recorder:
        loss = kd_loss(student, teacher, labels, backend="triton", reduction=reduction, alpha=0.7)
        loss.sum().backward()
    full = [(numel, op) for numel, op in recorder.allocations if numel >= n]
    assert [numel for numel, _ in full if numel >= n * vocab] == [n * vocab], full  # G, once
    assert all(numel <= 8 * n for numel, _ in full if numel < n * vocab), full  # statistics: O(N)
