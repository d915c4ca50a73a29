"""The Triton backend's own properties: memory, shapes and dtypes at tile edges, configuration, errors.

The equivalence with the float64 reference is tests/test_fused_linear.py's job (it runs every case with
backend="triton" too). Without a GPU the kernels run through Triton's interpreter (tests/conftest.py):
shapes stay small and odd. The GPU-only tests at real vocabulary size are skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import DEVICE, FP32_RTOL, as_float64, assert_close, fused, make_case, rel_err, run_loss
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fusedkd
from fusedkd import kernels, reference
from fusedkd._options import KDOptions

pytestmark = pytest.mark.skipif(
    kernels.unavailable_reason(DEVICE) is not None, reason=str(kernels.unavailable_reason(DEVICE))
)
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA")


def triton_matches_reference(case, rtol=FP32_RTOL, **options):
    values, grads = run_loss(fused("triton"), case, **options)
    ref_values, ref_grads = run_loss(reference.fused_linear_kd_loss, as_float64(case), **options)
    assert_close(values, ref_values, rtol, "loss")
    assert_close(grads, ref_grads, rtol, "grad")
    return values, grads


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor, in bytes, that any aten op produces (every allocation of the loss is
    an op output; counting bytes also covers the byte views through which Triton's interpreter copies
    kernel arguments)."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor) and x.numel() * x.element_size() > self.nbytes:
                self.nbytes, self.op = x.numel() * x.element_size(), func
        return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,options",
    [
        (torch.float32, dict(alpha=0.7, temperature=2.0)),
        (torch.bfloat16, dict(reduction="none", divergence="jsd", beta=0.3, alpha=0.6, temperature=3.0)),
        (torch.float16, dict(divergence="reverse_kl", return_components=True, alpha=0.5)),
    ],
    ids=["fp32-fkl", "bf16-jsd-none", "fp16-rkl-components"],
)
def test_allocates_nothing_of_tokens_by_vocab(dtype, options):
    """No op of the forward or the backward outputs a tensor larger than the largest input, or than
    the gradient pass's G staging (per program: a few token blocks x one vocabulary block, whatever N
    and V).

    With N * V far above both, that rules out any [N, V] (or [chunk, V]) buffer: the kernels' O(N)
    statistics, the [N, H_s] and per-program [BLOCK_V, H_s] float32 accumulators are all smaller.
    """
    # N = 96: N V stays over four times both bounds below (checked), at half the interpreter's work of 192.
    case = make_case(n=96, vocab=2053, student_dim=8, teacher_dim=12, dtype=dtype, bias=True)
    inputs = [case.student_hidden, case.student_weight, case.teacher_hidden, case.teacher_weight]
    largest_input = max(x.numel() * x.element_size() for x in inputs)
    n, vocab = case.labels.numel(), case.student_weight.shape[0]
    from fusedkd.kernels import config

    tiles = config.default_config(dtype)
    group_width = config.gradient_group_width(tiles, tiles.gradient)
    programs = config.gradient_programs(vocab, group_width, 1, kernels.INTERPRETER)
    staging = programs * tiles.gradient_sub_blocks * tiles.gradient.block_n * group_width * 4
    assert max(largest_input, staging) * 4 < n * vocab * case.student_weight.element_size()
    with LargestOutput() as largest:
        out = fusedkd.fused_linear_kd_loss(
            *inputs,
            case.labels,
            student_bias=case.student_bias,
            teacher_bias=case.teacher_bias,
            backend="triton",
            **options,
        )
        loss = out[0] if isinstance(out, tuple) else out
        loss.sum().backward()
    assert largest.nbytes <= max(largest_input, staging), (largest.nbytes, largest.op)
    assert torch.isfinite(case.student_weight.grad).all() and torch.isfinite(case.student_hidden.grad).all()


@pytest.mark.parametrize(
    "n,vocab,student_dim,teacher_dim",
    [
        (1, 50, 24, 40),  # one token, the vocabulary inside one partial block
        (64, 256, 32, 64),  # every dimension a multiple of the interpreter's tiles (the EVEN_* paths)
        (33, 129, 17, 16),  # one column into a second vocabulary block
    ],
    ids=["tiny", "even", "edges"],
)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.6)])
def test_tile_edges(n, vocab, student_dim, teacher_dim, divergence, beta):
    case = make_case(n=n, vocab=vocab, student_dim=student_dim, teacher_dim=teacher_dim, bias=True)
    case.labels[: min(n, 4)] = torch.tensor([0, vocab - 1, vocab // 2, 1])[: min(n, 4)]  # first/last columns
    triton_matches_reference(case, divergence=divergence, beta=beta, temperature=1.5, alpha=0.6)


@pytest.mark.parametrize(
    "student_dtype,teacher_dtype",
    [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)],
    ids=["bf16-student-fp32-teacher", "fp32-student-fp16-teacher"],
)
def test_teacher_dtype_may_differ(student_dtype, teacher_dtype):
    case = make_case(n=29, vocab=401, dtype=student_dtype)
    case.teacher_hidden = case.teacher_hidden.detach().to(teacher_dtype)
    case.teacher_weight = case.teacher_weight.detach().to(teacher_dtype)
    options = dict(divergence="jsd", beta=0.4, temperature=2.0, alpha=0.8)
    values, grads = run_loss(fused("triton"), case, **options)
    naive_values, naive_grads = run_loss(reference.fused_linear_kd_loss, case, **options)
    ref_values, ref_grads = run_loss(reference.fused_linear_kd_loss, as_float64(case), **options)
    eps = torch.finfo(student_dtype if student_dtype != torch.float32 else teacher_dtype).eps
    for a, b, e in zip(values + grads, naive_values + naive_grads, ref_values + ref_grads):
        assert rel_err(a, e) <= max(3 * rel_err(b, e), 4 * eps, FP32_RTOL)


def test_strided_inputs():
    """Non-contiguous hidden states and row-sliced, column-strided heads are read through their strides."""
    case = make_case(n=21, vocab=307, student_dim=24, teacher_dim=40)
    wide_hidden = torch.randn(21, 48, device=DEVICE)
    wide_hidden[:, ::2] = case.student_hidden.detach()
    student_hidden = wide_hidden[:, ::2].requires_grad_(True)  # stride (48, 2)
    teacher_weight_t = case.teacher_weight.detach().T.contiguous()  # [H_t, V]
    teacher_weight = teacher_weight_t.T  # [V, H_t] with strides (1, V)
    assert not student_hidden.is_contiguous() and not teacher_weight.is_contiguous()
    options = dict(divergence="reverse_kl", temperature=0.7, alpha=0.4)
    strided = run_loss(
        fused("triton"),
        type(case)(student_hidden, case.student_weight, case.teacher_hidden, teacher_weight, case.labels),
        **options,
    )
    ref = run_loss(reference.fused_linear_kd_loss, as_float64(case), **options)
    assert_close(strided[0] + strided[1], ref[0] + ref[1], FP32_RTOL)


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_gradient_of_a_subset_of_inputs(frozen):
    case = make_case(n=25, vocab=311, bias=True)
    getattr(case, f"student_{frozen}").requires_grad_(False)
    out = fusedkd.fused_linear_kd_loss(
        case.student_hidden,
        case.student_weight,
        case.teacher_hidden,
        case.teacher_weight,
        case.labels,
        student_bias=case.student_bias,
        backend="triton",
        alpha=0.3,
    )
    out.backward()
    ref_case = as_float64(case)
    ref = reference.fused_linear_kd_loss(
        ref_case.student_hidden,
        ref_case.student_weight,
        ref_case.teacher_hidden,
        ref_case.teacher_weight,
        ref_case.labels,
        student_bias=ref_case.student_bias,
        alpha=0.3,
    )
    ref.backward()
    assert getattr(case, f"student_{frozen}").grad is None
    for name in {"weight", "hidden"} - {frozen}:
        ours, exact = getattr(case, f"student_{name}").grad, getattr(ref_case, f"student_{name}").grad
        assert rel_err(ours.double().cpu(), exact.cpu()) <= FP32_RTOL
    assert rel_err(case.student_bias.grad.double().cpu(), ref_case.student_bias.grad.cpu()) <= FP32_RTOL


def test_no_tokens():
    case = make_case(n=3, vocab=101)
    hidden = case.student_hidden.detach()[:0].requires_grad_(True)
    loss = fusedkd.fused_linear_kd_loss(
        hidden,
        case.student_weight,
        case.teacher_hidden[:0],
        case.teacher_weight,
        case.labels[:0],
        backend="triton",
    )
    loss.backward()
    assert loss.item() == 0.0
    assert (case.student_weight.grad == 0).all() and hidden.grad.shape == (0, 24)


def test_weight_gradient_is_deterministic():
    """grad_student_weight has one writer per row (no atomics): bitwise reproducible."""
    case = make_case(n=45, vocab=517, dtype=torch.bfloat16)
    runs = [run_loss(fused("triton"), case, alpha=0.6, temperature=2.0)[1][1] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_float64_is_refused_with_a_pointer_to_the_torch_backend():
    case = make_case(n=5, vocab=31, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='torch'"):
        fusedkd.fused_linear_kd_loss(
            case.student_hidden,
            case.student_weight,
            case.teacher_hidden,
            case.teacher_weight,
            case.labels,
            backend="triton",
        )


def test_clear_error_where_the_kernels_cannot_run(monkeypatch):
    case = make_case(n=5, vocab=31)
    args = (case.student_hidden, case.student_weight, case.teacher_hidden, case.teacher_weight, case.labels)
    monkeypatch.setattr(kernels, "INTERPRETER", False)
    cpu_reason = kernels.unavailable_reason(torch.device("cpu"))
    assert "TRITON_INTERPRET=1" in cpu_reason
    assert "CUDA" in kernels.unavailable_reason(torch.device("meta"))
    if DEVICE.type == "cpu":
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            fusedkd.fused_linear_kd_loss(*args, backend="triton")
        from fusedkd.kernels.fused_linear_kd import fused_linear_kd

        options = KDOptions("forward_kl", 0.5, 1.0, 1.0, -100, "mean", 31, False)
        with pytest.raises(RuntimeError, match="cannot run here"):
            fused_linear_kd(case.student_hidden, case.student_weight, None, *args[2:4], None, None, options)
        assert fusedkd._dispatch.resolve_backend("auto", DEVICE) == "torch"
    monkeypatch.setattr(kernels, "TRITON_IMPORT_ERROR", "ModuleNotFoundError: No module named 'triton'")
    assert "pip install triton" in kernels.unavailable_reason(torch.device("cuda"))


def test_chunk_size_is_refused():
    case = make_case(n=5, vocab=31)
    with pytest.raises(ValueError, match="chunk_size"):
        fusedkd.fused_linear_kd_loss(
            case.student_hidden,
            case.student_weight,
            case.teacher_hidden,
            case.teacher_weight,
            case.labels,
            backend="triton",
            chunk_size=4,
        )


def test_configurations(monkeypatch):
    from fusedkd.kernels import config

    # tl.dot needs every tile side >= 16; tiles are powers of two; the fp32 dot precision follows torch.
    every = [config.HALF_CONFIG, config.FLOAT32_CONFIG, config.INTERPRETER_CONFIG]
    every += [*config.HALF_CANDIDATES, *config.FLOAT32_CANDIDATES]
    for candidate in every:
        gradient_tiles = {candidate.gradient}
        for tile in (candidate.statistics, *gradient_tiles):
            for side in (tile.block_n, tile.block_v, tile.block_h):
                assert side >= 16 and side & (side - 1) == 0
            assert tile.num_warps in (4, 8, 16)
        # The gradient pass recomputes the logits exactly as the statistics pass did: same K-order.
        assert {t.block_h for t in gradient_tiles} == {candidate.statistics.block_h}
        assert candidate.gradient_sub_blocks >= 1 and candidate.vocab_splits >= 1
        # The elementwise slices divide the tiles: fold_v the statistics tile, halves the gradient's.
        assert candidate.statistics.block_v % candidate.statistics.fold_v == 0
        assert candidate.statistics.fold_v >= 16
        for tile in gradient_tiles:
            group = tile.block_v * candidate.gradient_vocab_sub_blocks
            update = tile.block_n * candidate.gradient_sub_blocks
            product_m = min(candidate.gradient_product_m, group)
            assert tile.block_v % 32 == 0 and group % product_m == 0
            # The products' K steps divide both K extents (the group's columns, the update's tokens).
            assert group % candidate.gradient_product_k == 0 and update % candidate.gradient_product_k == 0
            for side in (product_m, candidate.gradient_product_h, candidate.gradient_product_k):
                assert side >= 16 and side & (side - 1) == 0
    # One kernel computes both models' tiles: a float32 model gets the float32 tiles, whichever it is.
    assert config.config_dtype(torch.bfloat16, torch.float32) == torch.float32
    assert config.config_dtype(torch.float32, torch.float16) == torch.float32
    assert config.config_dtype(torch.bfloat16, torch.float16) == torch.bfloat16
    assert config.gpu_config(config.config_dtype(torch.bfloat16, torch.float32)) is config.FLOAT32_CONFIG
    previous = torch.get_float32_matmul_precision()
    try:
        for setting, expected in (("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            assert config.dot_precision() == expected
    finally:
        torch.set_float32_matmul_precision(previous)
    # Autotuning is opt-in and GPU-only: never under the interpreter or on a CPU tensor.
    monkeypatch.setenv(config.AUTOTUNE_ENV, "1")
    assert not config.autotune_enabled(torch.device("cpu"))
    assert config.select_config(("key",), torch.float32, torch.device("cpu"), run=None) == (
        config.default_config(torch.float32)
    )
    monkeypatch.delenv(config.AUTOTUNE_ENV)
    assert not config.autotune_enabled(torch.device("cuda"))


# --- GPU only: real vocabulary size, against the torch backend in float64 (exact, chunked) ---------------


@needs_cuda
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_qwen_vocabulary_on_gpu(dtype, divergence, beta):
    """N = 4096, V = 151,936 (Qwen3), H_s = 1024, H_t = 2560: no worse than the torch backend in `dtype`."""
    case = make_case(n=4096, vocab=151_936, student_dim=1024, teacher_dim=2560, dtype=dtype, bias=False)
    options = dict(divergence=divergence, beta=beta, temperature=2.0, alpha=0.7)
    ours = run_loss(fused("triton"), case, **options)
    torch_same_dtype = run_loss(fused("torch"), case, **options)
    exact = run_loss(fused("torch"), as_float64(case), **options)
    floor = FP32_RTOL if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    for a, b, e in zip(ours[0] + ours[1], torch_same_dtype[0] + torch_same_dtype[1], exact[0] + exact[1]):
        assert torch.isfinite(a).all()
        assert rel_err(a, e) <= max(3 * rel_err(b, e), floor), (rel_err(a, e), rel_err(b, e))


@needs_cuda
@pytest.mark.gpu
def test_auto_backend_is_triton_on_cuda():
    assert fusedkd._dispatch.resolve_backend("auto", DEVICE) == "triton"


@pytest.mark.parametrize(
    ("backend", "reduction"), [("triton", "mean"), ("triton", "none"), ("tiles", "none")]
)
def test_fp16_gradient_does_not_underflow(backend, reduction, monkeypatch):
    """fp16: G is scaled by a power of two before its cast (and unscaled in float32 after the products),
    so entries of G below fp16's smallest normal (6e-5, and its smallest subnormal 6e-8), as at
    N >= 16k under reduction "mean", still add up right. Without the scale they flush to zero or to
    one subnormal step, and the hidden-state gradient is far off. The fused kernels' gradient pass and
    the tiles backend (G in fp16 over the student's tile) alike; "none" takes the output gradient into
    G through the per-token weights (under "mean" the tiles backend forms G for an output gradient of 1
    in the forward, whose entries are not small here)."""
    from fusedkd.kernels import gradient
    from fusedkd.torch_backend import fused_linear_kd

    # Weights of magnitude ~512 and hidden states ~1/512: logits of magnitude ~1, and grad_h = G W_s
    # of magnitude ~1e-4 (representable) from entries of G of ~2e-8 (not).
    case = make_case(n=41, vocab=301, dtype=torch.float16, logit_scale=512.0)
    case.student_hidden = (case.student_hidden.detach() / 512).requires_grad_(True)
    case.teacher_weight = case.teacher_weight.detach() / 512  # teacher logits ~1 too: G has no large entries
    seed = [torch.tensor(2.0**-12, device=DEVICE)]
    if reduction == "none":  # the same weights as "mean" under the seed
        seed = [torch.full((41,), 2.0**-12 / 41, device=DEVICE)]
    options = dict(divergence="forward_kl", temperature=2.0, alpha=1.0, reduction=reduction)  # no CE
    _, grads = run_loss(fused(backend), case, grad_outputs=seed, **options)
    _, exact = run_loss(reference.fused_linear_kd_loss, as_float64(case), grad_outputs=seed, **options)
    assert exact[0].abs().max() > 6.1e-5  # the hidden-state gradient itself is a normal fp16 number
    assert rel_err(grads[0], exact[0]) <= 1e-2  # fp16 G and output (eps 1e-3), sums over V

    weights = torch.full((41,), 2.0**-20, device=DEVICE)
    options_mean = KDOptions("forward_kl", 0.5, 2.0, 0.6, -100, "mean", 301, True)
    scale = gradient.gradient_scale(options_mean, weights, weights, torch.float16)
    assert scale.item() == 2.0**19  # a power of two: bound 2^-20 (1/T + 1) = 1.5 * 2^-20, scaled to 0.75
    assert gradient.gradient_scale(options_mean, weights, weights, torch.bfloat16).item() == 1.0

    for module in (gradient, fused_linear_kd):
        monkeypatch.setattr(
            module, "gradient_scale", lambda *args: torch.ones(1, dtype=torch.float32, device=DEVICE)
        )
    _, unscaled = run_loss(fused(backend), case, grad_outputs=seed, **options)
    assert rel_err(unscaled[0], exact[0]) > 0.1  # the test can fail: without the scale G underflows


# --- Direct calls of the backend entry points: every tensor is read through its strides ---------------


def _direct_options(vocab: int, has_labels: bool = True, **overrides) -> KDOptions:
    fields = dict(
        divergence="forward_kl",
        beta=0.5,
        temperature=2.0,
        alpha=0.6,
        ignore_index=-100,
        reduction="mean",
        vocab_size=vocab,
        has_labels=has_labels,
    )
    fields.update(overrides)
    return KDOptions(**fields)


def _strided_labels(labels: torch.Tensor, layout: str) -> torch.Tensor:
    """The same label values as a view of the given layout (not contiguous, or another dtype)."""
    n = labels.numel()
    if layout == "column-int64":
        table = torch.full((n, 3), 7, dtype=torch.int64, device=labels.device)
        table[:, 1] = labels
        return table[:, 1]
    if layout == "every-other-int32":
        big = torch.full((2 * n,), 5, dtype=torch.int32, device=labels.device)
        big[::2] = labels.to(torch.int32)
        return big[::2]
    assert layout == "contiguous-int32"
    return labels.to(torch.int32)


def _column_view(x: torch.Tensor) -> torch.Tensor:
    """x [V] as column 1 of a [V, 2] tensor (stride 2), a leaf that requires grad like x."""
    wide = torch.randn(x.shape[0], 2, dtype=x.dtype, device=x.device)
    wide[:, 1] = x.detach()
    return wide.requires_grad_(x.requires_grad)


@pytest.mark.parametrize("labels_layout", ["column-int64", "every-other-int32", "contiguous-int32"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_fused_linear_entry_honours_every_stride(labels_layout, divergence):
    """`fused_linear_kd` called directly with strided labels (int32/int64), column-view biases, sliced
    hidden states and transposed-storage weights: equal to the float64 reference on contiguous copies."""
    from fusedkd.kernels.fused_linear_kd import fused_linear_kd

    n, vocab, hs, ht = 23, 211, 24, 40
    case = make_case(n=n, vocab=vocab, student_dim=hs, teacher_dim=ht, bias=True)
    case.labels[:3] = torch.tensor([0, vocab - 1, -100])
    # Hidden states: a [N, H] slice of a wider tensor (row stride != H); student weight stored
    # transposed ([H, V] memory, strides (1, V)); biases: columns of [V, 2] tensors (stride 2).
    wide_hidden = torch.randn(n, hs + 5, device=DEVICE)
    wide_hidden[:, 2 : 2 + hs] = case.student_hidden.detach()
    student_hidden = wide_hidden.requires_grad_(True)
    student_weight_storage = case.student_weight.detach().T.contiguous().requires_grad_(True)
    student_bias_storage = _column_view(case.student_bias)
    teacher_bias = _column_view(case.teacher_bias)[:, 1].detach()
    teacher_hidden = torch.cat([case.teacher_hidden.detach(), case.teacher_hidden.detach()], 1)[:, ht:]
    labels = _strided_labels(case.labels, labels_layout)
    assert labels_layout == "contiguous-int32" or not labels.is_contiguous()
    options = _direct_options(vocab, divergence=divergence, beta=0.3)

    loss, distill, ce = fused_linear_kd(
        student_hidden[:, 2 : 2 + hs],
        student_weight_storage.T,
        student_bias_storage[:, 1],
        teacher_hidden,
        case.teacher_weight.detach(),
        teacher_bias,
        labels,
        options,
    )
    loss.backward()
    ref = as_float64(case)
    ref_loss, ref_distill, ref_ce = reference.fused_linear_kd_loss(
        ref.student_hidden,
        ref.student_weight,
        ref.teacher_hidden,
        ref.teacher_weight,
        ref.labels,
        divergence=divergence,
        beta=0.3,
        temperature=2.0,
        alpha=0.6,
        student_bias=ref.student_bias,
        teacher_bias=ref.teacher_bias,
        return_components=True,
    )
    ref_loss.backward()
    for ours, exact in ((loss, ref_loss), (distill, ref_distill), (ce, ref_ce)):
        assert rel_err(ours.double().cpu(), exact.cpu()) <= FP32_RTOL
    grads = (
        student_hidden.grad[:, 2 : 2 + hs],
        student_weight_storage.grad.T,
        student_bias_storage.grad[:, 1],
    )
    exact_grads = (ref.student_hidden.grad, ref.student_weight.grad, ref.student_bias.grad)
    for ours, exact in zip(grads, exact_grads):
        assert rel_err(ours.double().cpu(), exact.cpu()) <= FP32_RTOL
    # Nothing leaked into the storage around the views.
    assert (student_hidden.grad[:, :2] == 0).all() and (student_bias_storage.grad[:, 0] == 0).all()


@pytest.mark.parametrize("labels_layout", ["column-int64", "every-other-int32"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_kd_logits_entry_honours_every_stride(labels_layout, reduction):
    """`kd_logits` called directly with strided labels and transposed/sliced logits: float64 reference."""
    from fusedkd.kernels.kd_logits import kd_logits

    n, vocab = 19, 157
    student = (torch.randn(vocab + 3, n, device=DEVICE) * 3).T[:, :vocab]  # strides (1, n), sliced
    student.requires_grad_(True)
    teacher = torch.randn(n, 2 * vocab, device=DEVICE)[:, ::2] * 3  # column stride 2
    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    labels[::4] = -100
    options = _direct_options(vocab, divergence="reverse_kl", reduction=reduction, temperature=1.5)
    loss, distill, ce = kd_logits(student, teacher, _strided_labels(labels, labels_layout), options)
    (loss if reduction == "mean" else loss.sum()).backward()

    exact_student = student.detach().double().requires_grad_(True)
    exact = reference.kd_terms_from_logits(exact_student, teacher.double(), labels, options)
    (exact[0] if reduction == "mean" else exact[0].sum()).backward()
    for ours, ref in zip((loss, distill, ce), exact):
        assert rel_err(ours.double().cpu(), ref.cpu()) <= FP32_RTOL
    assert rel_err(student.grad.double().cpu(), exact_student.grad.cpu()) <= FP32_RTOL


def test_entries_refuse_non_integer_labels():
    from fusedkd.kernels.fused_linear_kd import fused_linear_kd
    from fusedkd.kernels.kd_logits import kd_logits

    case = make_case(n=5, vocab=31)
    labels = case.labels.to(torch.float32)
    options = _direct_options(31)
    with pytest.raises(TypeError, match="labels"):
        kd_logits(torch.randn(5, 31), torch.randn(5, 31), labels, options)
    with pytest.raises(TypeError, match="labels"):
        fused_linear_kd(
            case.student_hidden, case.student_weight, None, case.teacher_hidden, case.teacher_weight, None,
            labels, options,
        )  # fmt: skip


def test_double_backward_raises():
    """Both Triton Functions are once-differentiable: a second-order gradient is an error, not nonsense.

    (The output gradient requires grad, as when the loss is scaled by a learned weight: otherwise
    autograd has nothing to differentiate and says so by itself.)"""
    from fusedkd.kernels.fused_linear_kd import fused_linear_kd
    from fusedkd.kernels.kd_logits import kd_logits

    case = make_case(n=9, vocab=67)
    options = _direct_options(67)
    loss, _, _ = fused_linear_kd(
        case.student_hidden, case.student_weight, None, case.teacher_hidden, case.teacher_weight, None,
        case.labels, options,
    )  # fmt: skip
    seed = torch.ones((), device=DEVICE, requires_grad=True)
    (grad_hidden,) = torch.autograd.grad(loss, case.student_hidden, seed, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        grad_hidden.sum().backward()

    student = torch.randn(9, 67, device=DEVICE, requires_grad=True)
    loss, _, _ = kd_logits(student, torch.randn(9, 67, device=DEVICE), case.labels, options)
    (grad_student,) = torch.autograd.grad(loss, student, seed, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        grad_student.sum().backward()


def test_launches_run_under_the_inputs_device(monkeypatch):
    """Every launch of both entries happens inside `launch_device` of the inputs (on CUDA, that
    device; the CPU context is empty)."""
    from fusedkd import kernels as kernels_package
    from fusedkd.kernels import fused_linear_kd as fused_module
    from fusedkd.kernels import gradient, jsd, statistics
    from fusedkd.kernels import kd_logits as logits_module

    depth = {"inside": 0, "launches": 0, "outside": 0}

    class Tracked:
        def __init__(self, tensor):
            self.context = kernels_package.launch_device(tensor)

        def __enter__(self):
            depth["inside"] += 1
            return self.context.__enter__()

        def __exit__(self, *exc):
            depth["inside"] -= 1
            return self.context.__exit__(*exc)

    def wrap(module, name):
        kernel = getattr(module, name)

        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    depth["launches"] += 1
                    depth["outside"] += depth["inside"] == 0
                    return kernel[grid](*args, **kwargs)

                return run

        monkeypatch.setattr(module, name, Launch())

    for module, name in (
        (statistics, "statistics_kernel"),
        (statistics, "merge_statistics_kernel"),
        (jsd, "jsd_kernel"),
        (jsd, "merge_jsd_kernel"),
        (gradient, "gradient_kernel"),
    ):
        wrap(module, name)
    wrap(logits_module, "kd_logits_forward_kernel")
    wrap(logits_module, "kd_logits_backward_kernel")
    monkeypatch.setattr(fused_module, "launch_device", Tracked)
    monkeypatch.setattr(logits_module, "launch_device", Tracked)

    case = make_case(n=11, vocab=73)
    options = _direct_options(73, divergence="jsd", reduction="none")
    loss, _, _ = fused_module.fused_linear_kd(
        case.student_hidden, case.student_weight, None, case.teacher_hidden, case.teacher_weight, None,
        case.labels, options,
    )  # fmt: skip
    loss.sum().backward()
    student = torch.randn(11, 73, device=DEVICE, requires_grad=True)
    loss, _, _ = logits_module.kd_logits(student, torch.randn(11, 73, device=DEVICE), case.labels, options)
    loss.sum().backward()
    assert depth["launches"] == 7 and depth["outside"] == 0, depth
