"""`teacher_topk` and `fused_linear_topk_kd_loss` against float64 references; k = V against the dense loss."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import (
    FP32_RTOL,
    assert_close,
    reference_teacher_topk,
    reference_topk_kd_loss,
    rel_err,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fusedkd
from fusedkd._options import tail_precision
from fusedkd.topk import FusedLinearTopKKDLoss, fused_linear_topk_kd_loss, teacher_topk

TOPK_DIVERGENCES = ["forward_kl", "reverse_kl"]
# (Many token chunks of several element-wise groups of rows, as on large shapes: test_contract.py's
# small-tiles run.)
TAILS = ["bucket", "renormalize"]


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


def make_topk_case(
    leading=(37,),
    vocab=1003,
    k=16,
    *,
    dtype=torch.float32,
    temperature=2.0,
    teacher="random",
    ignore_fraction=0.2,
    logit_scale=3.0,
    bias=False,
    extra_rows=0,
):
    """Student tensors (requiring grad), the teacher's float64-exact top-k (float32 logprobs) and labels."""
    n = math.prod(leading)
    hs, ht = 24, 40
    teacher_hidden = torch.randn(n, ht, dtype=torch.float64) / ht**0.5
    teacher_weight = torch.randn(vocab, ht, dtype=torch.float64) * logit_scale
    if teacher == "peaked":
        favourite = torch.randint(0, vocab, (n,))
        teacher_hidden = (
            teacher_weight[favourite] / teacher_weight[favourite].norm(dim=-1, keepdim=True) * 8.0
        )
    elif teacher == "flat":
        teacher_weight = teacher_weight * 0.01
    ids, logprobs = teacher_topk(teacher_hidden, teacher_weight, k, temperature=temperature)
    student = dict(
        student_hidden=(torch.randn(n, hs) / hs**0.5).reshape(*leading, hs),
        student_weight=torch.randn(vocab + extra_rows, hs) * logit_scale,
        student_bias=torch.randn(vocab + extra_rows) if bias else None,
    )
    student = {name: None if x is None else x.to(dtype).requires_grad_(True) for name, x in student.items()}
    labels = torch.randint(0, vocab, (n,))
    labels[torch.rand(n) < ignore_fraction] = -100
    teacher_tensors = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
    return (
        student,
        ids.reshape(*leading, k),
        logprobs.float().reshape(*leading, k),
        labels.reshape(leading),
        teacher_tensors,
    )


def run(fn, student, ids, logprobs, labels, grad_outputs=None, **options):
    """Outputs and the student gradients (hidden, weight[, bias]) of `fn`, as float64 tensors."""
    tensors = [x for x in student.values() if x is not None]
    for x in tensors:
        x.grad = None
    out = fn(
        student["student_hidden"],
        student["student_weight"],
        ids,
        logprobs,
        labels,
        student_bias=student["student_bias"],
        **options,
    )
    outputs = out if isinstance(out, tuple) else (out,)
    if grad_outputs is None:
        grad_outputs = [torch.ones_like(o) for o in outputs]
    sum((o * g.to(o.dtype)).sum() for o, g in zip(outputs, grad_outputs)).backward()
    grads = [torch.zeros_like(x, dtype=torch.float64) if x.grad is None else x.grad.double() for x in tensors]
    return [o.detach().double() for o in outputs], grads


def as_float64(student):
    return {
        name: None if x is None else x.detach().double().requires_grad_(True) for name, x in student.items()
    }


def check_against_reference(student, ids, logprobs, labels, rtol=FP32_RTOL, grad_outputs=None, **options):
    values, grads = run(fused_linear_topk_kd_loss, student, ids, logprobs, labels, grad_outputs, **options)
    ref_values, ref_grads = run(
        reference_topk_kd_loss,
        as_float64(student),
        ids,
        logprobs,
        labels,
        grad_outputs,
        **options,
    )
    assert_close(values, ref_values, rtol, "loss")
    assert_close(grads, ref_grads, rtol, "grad")
    return values, grads


# ----------------------------------------------------------------------------------------------------
# teacher_topk
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 7, 64, 301])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_teacher_topk_matches_sorted_log_softmax(k, temperature):
    """float64: the ids of a stable descending sort of log_softmax(t / T), and their log-probabilities."""
    vocab = 301
    hidden = torch.randn(3, 13, 20, dtype=torch.float64)
    weight = torch.randn(vocab + 5, 20, dtype=torch.float64)  # a padded head
    bias = torch.randn(vocab + 5, dtype=torch.float64)
    # Blocks narrower than k, not dividing V, and token chunks not dividing N.
    ids, logprobs = teacher_topk(
        hidden, weight, k, temperature, vocab_size=vocab, teacher_bias=bias, chunk_size=8, block_size=50
    )
    ref_ids, ref_logprobs, _ = reference_teacher_topk(hidden, weight[:vocab], k, temperature, bias[:vocab])
    assert ids.shape == (3, 13, k) and ids.dtype == torch.int64 and logprobs.dtype == torch.float64
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("k", [1, 16])
def test_teacher_topk_equals_torch_topk(dtype, k):
    """The values of torch.topk(log_softmax(t / T)) on the same low-precision logits; a valid top-k set."""
    n, vocab, hidden_dim = 29, 1003, 32
    hidden = torch.randn(n, hidden_dim).to(dtype)
    weight = (torch.randn(vocab, hidden_dim) * 0.5).to(dtype)
    ids, logprobs = teacher_topk(hidden, weight, k, temperature=2.0, chunk_size=16, block_size=256)
    assert logprobs.dtype == torch.float32
    full = torch.log_softmax((hidden @ weight.T).float() / 2.0, dim=-1)  # the logits in the inputs' dtype
    values = full.topk(k, dim=-1).values
    tolerance = 1e-5
    torch.testing.assert_close(logprobs, values, rtol=0, atol=tolerance)
    # The ids are a top-k set: their log-probabilities are ours, they are distinct and in order.
    torch.testing.assert_close(full.gather(-1, ids), logprobs, rtol=0, atol=tolerance)
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()
    assert (logprobs.diff(dim=-1) <= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_teacher_topk_breaks_ties_by_lowest_id(dtype):
    """Integer-valued logits tie exactly, within and across vocabulary blocks: lowest id first."""
    n, vocab = 23, 400
    hidden = torch.randint(-2, 3, (n, 6)).to(dtype)
    weight = torch.randint(-2, 3, (vocab, 6)).to(dtype)
    weight[300:] = weight[:100]  # exact duplicate rows, three blocks apart
    for k in (1, 5, 40):
        ids, logprobs = teacher_topk(hidden, weight, k, temperature=1.0, chunk_size=7, block_size=64)
        ref_ids, ref_logprobs, full = reference_teacher_topk(hidden, weight, k)
        assert torch.equal(ids, ref_ids), k
        # float32: the log-sum-exp of logits up to ~24 carries a rounding of a few 1e-6.
        atol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(logprobs.double(), ref_logprobs, rtol=0, atol=atol)
    # There were ties to break: many positions have equal values around the k-th place.
    kth = full.sort(-1, descending=True).values[:, 39:41]
    assert (kth[:, 0] == kth[:, 1]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("rows", ["distinct", "tied"])
def test_block_top_follows_the_exact_tie_rule(dtype, rows):
    """The block top-k (a plain top-k, the tie rule on the k kept) equals the exact rule on every entry:
    without ties across the k-th place (its fast path) and with them (where it takes the exact rule)."""
    from fusedkd.torch_backend.teacher_topk import block_top, ordered_top

    if rows == "distinct":
        values = torch.randn(40, 300, dtype=dtype)
        values[:, 150:160] = values[:, :10]  # ties among the largest entries are still ordered by id
    else:
        values = torch.randint(-3, 4, (40, 300)).to(dtype)
    ids = torch.arange(300) + 1000
    for k in (1, 7, 64, 300):
        got_values, got_ids = block_top(values, ids, k)
        want_values, want_ids = ordered_top(values, ids, k)
        assert torch.equal(got_ids, want_ids) and torch.equal(got_values, want_values), k


@pytest.mark.parametrize("block_size", [100, 8192])
def test_teacher_topk_of_a_confident_teacher_is_accepted_by_the_loss(block_size):
    """float32 logits of magnitude ~40 carry an absolute rounding error of ~eps 40 each: the listed mass
    must still not exceed 1, or the loss would reject `teacher_topk`'s own output."""
    teacher_hidden, teacher_weight = torch.randn(53, 40), torch.randn(1201, 40) * 6.0
    ids, logprobs = teacher_topk(teacher_hidden, teacher_weight, 16, 2.0, block_size=block_size, chunk_size=8)
    exact = reference_teacher_topk(teacher_hidden, teacher_weight, 16, 2.0)[1]
    assert (logprobs.double() - exact).abs().max() < 64 * torch.finfo(torch.float32).eps * 80
    student_hidden = torch.randn(53, 24, requires_grad=True)
    student_weight = torch.randn(1201, 24, requires_grad=True)
    loss = fused_linear_topk_kd_loss(
        student_hidden, student_weight, ids, logprobs, temperature=2.0, alpha=1.0
    )
    assert torch.isfinite(loss)


def test_teacher_topk_negative_zero_ties_positive_zero():
    """-0.0 and +0.0 logits are equal: the lower id comes first."""
    hidden = torch.ones(1, 1)
    weight = torch.tensor([[1.0], [-0.0], [0.0], [-1.0]])
    weight[1, 0] = -0.0
    ids, _ = teacher_topk(hidden * 0.0, weight, 4)  # every logit is +-0: all tie
    assert ids.tolist() == [[0, 1, 2, 3]]
    ids, _ = teacher_topk(-hidden, weight, 2)  # logits -1, 0, -0, 1 (as +-0): 3 first, then 1 before 2
    assert ids.tolist() == [[3, 1]]


# ----------------------------------------------------------------------------------------------------
# fused_linear_topk_kd_loss
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", TOPK_DIVERGENCES)
@pytest.mark.parametrize("temperature,alpha,k", [(2.0, 0.7, 1), (2.0, 0.7, 64), (0.5, 1.0, 7)])
def test_matches_reference_for_any_k(tail, divergence, temperature, alpha, k):
    """k = 1 and k larger than a block of rows (the (divergence, temperature, alpha) grid at k = 16 is
    tests/test_contract.py's)."""
    student, ids, logprobs, labels, _ = make_topk_case(k=k, temperature=temperature, bias=alpha > 0.5)
    check_against_reference(
        student,
        ids,
        logprobs,
        labels,
        grad_outputs=[torch.tensor(1.7)],  # an output gradient != 1 scales the gradient formed in forward
        divergence=divergence,
        temperature=temperature,
        alpha=alpha,
        tail=tail,
    )


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", TOPK_DIVERGENCES)
@pytest.mark.parametrize("labelled", [True, False], ids=["labels", "no-labels"])
def test_k_equal_to_vocabulary_is_the_dense_loss(tail, divergence, labelled):
    """k = V: both tail modes are the dense fused_linear_kd_loss, loss and gradients (float64)."""
    vocab, temperature = 211, 2.5
    student, ids, logprobs, labels, teacher = make_topk_case(
        leading=(2, 13), vocab=vocab, k=vocab, temperature=temperature, dtype=torch.float64, bias=True
    )
    labels = labels if labelled else None
    alpha = 0.6 if labelled else 1.0
    options = dict(divergence=divergence, temperature=temperature, alpha=alpha, return_components=True)
    ids, logprobs = teacher_topk(
        teacher["teacher_hidden"].reshape(2, 13, -1),
        teacher["teacher_weight"],
        vocab,
        temperature=temperature,
    )
    values, grads = run(fused_linear_topk_kd_loss, student, ids, logprobs, labels, tail=tail, **options)

    def dense(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, **kwargs):
        return fusedkd.fused_linear_kd_loss(
            student_hidden,
            student_weight,
            teacher["teacher_hidden"].reshape(2, 13, -1),
            teacher["teacher_weight"],
            labels,
            backend="torch",
            **kwargs,
        )

    dense_values, dense_grads = run(dense, student, None, None, labels, **options)
    assert_close(values, dense_values, 1e-12, "loss")
    assert_close(grads, dense_grads, 1e-12, "grad")


@pytest.mark.parametrize("divergence", TOPK_DIVERGENCES)
def test_bucket_never_exceeds_the_dense_loss(divergence):
    """By the chain rule of KL, coarse-graining the tail can only lower the divergence (per token)."""
    vocab, temperature = 401, 1.5
    student, ids, logprobs, labels, teacher = make_topk_case(
        vocab=vocab, k=12, temperature=temperature, dtype=torch.float64
    )
    options = dict(divergence=divergence, temperature=temperature, alpha=1.0, reduction="none")
    sparse = fused_linear_topk_kd_loss(
        student["student_hidden"], student["student_weight"], ids, logprobs, tail="bucket", **options
    )
    dense = fusedkd.fused_linear_kd_loss(
        student["student_hidden"],
        student["student_weight"],
        teacher["teacher_hidden"],
        teacher["teacher_weight"],
        backend="torch",
        **options,
    )
    assert (sparse <= dense + 1e-12).all() and (sparse < dense).any()


@pytest.mark.parametrize("divergence", TOPK_DIVERGENCES)
def test_renormalize_without_cross_entropy_touches_only_the_support(divergence):
    """alpha = 1, tail="renormalize": the gather-only path equals the full-vocabulary path."""
    student, ids, logprobs, labels, _ = make_topk_case(k=9, dtype=torch.float64)
    options = dict(divergence=divergence, temperature=2.0, alpha=1.0, tail="renormalize")
    sparse_values, sparse_grads = run(fused_linear_topk_kd_loss, student, ids, logprobs, labels, **options)
    only_loss = [torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0)]
    full_values, full_grads = run(
        fused_linear_topk_kd_loss,
        student,
        ids,
        logprobs,
        labels,
        only_loss,
        return_components=True,
        **options,
    )
    assert_close(sparse_values, full_values[:1], 1e-12, "loss")
    assert_close(sparse_grads, full_grads, 1e-12, "grad")
    # Rows of the head outside every token's support get no gradient at all.
    untouched = torch.ones(student["student_weight"].shape[0], dtype=torch.bool)
    untouched[ids[labels != -100].reshape(-1)] = False
    assert (sparse_grads[1][untouched] == 0).all()


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("teacher", ["peaked", "flat"])
@pytest.mark.parametrize("divergence", TOPK_DIVERGENCES)
def test_peaked_and_flat_teachers(tail, teacher, divergence):
    # Peaked: the top-k hold almost all the mass (p_tail ~ 0); flat: the tail holds most of it.
    student, ids, logprobs, labels, _ = make_topk_case(teacher=teacher, temperature=1.0)
    check_against_reference(
        student, ids, logprobs, labels, divergence=divergence, temperature=1.0, alpha=0.7, tail=tail
    )


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", TOPK_DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 20.0])
def test_extreme_logits(tail, divergence, temperature):
    """Student logits of magnitude ~1e4: no worse than the naive float32 recipe (x3), never NaN."""
    student, ids, logprobs, labels, _ = make_topk_case(
        leading=(23,), vocab=611, temperature=temperature, logit_scale=1e4
    )
    options = dict(divergence=divergence, temperature=temperature, alpha=0.5, tail=tail)
    ours = run(fused_linear_topk_kd_loss, student, ids, logprobs, labels, **options)
    naive = run(reference_topk_kd_loss, student, ids, logprobs, labels, **options)
    exact = run(
        reference_topk_kd_loss,
        as_float64(student),
        ids,
        logprobs,
        labels,
        **options,
    )
    for a, b, e in zip(ours[0] + ours[1], naive[0] + naive[1], exact[0] + exact[1]):
        assert torch.isfinite(a).all()
        allowed = max(3 * rel_err(b, e), FP32_RTOL)
        assert rel_err(a, e) <= allowed, f"{rel_err(a, e):.3g} > {allowed:.3g}"


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("divergence", TOPK_DIVERGENCES)
def test_low_precision(tail, dtype, divergence):
    """bf16 / fp16 students and stored logprobs (int32 ids): no worse than the naive recipe in that dtype."""
    student, ids, logprobs, labels, _ = make_topk_case(dtype=dtype)
    ids, logprobs = ids.int(), logprobs.to(dtype)  # as read back from a topk_cache
    options = dict(divergence=divergence, temperature=2.0, alpha=0.7, tail=tail)
    values, grads = run(fused_linear_topk_kd_loss, student, ids, logprobs, labels, **options)
    naive_values, naive_grads = run(reference_topk_kd_loss, student, ids, logprobs, labels, **options)
    ref_values, ref_grads = run(
        reference_topk_kd_loss,
        as_float64(student),
        ids,
        logprobs,
        labels,
        **options,
    )
    eps = torch.finfo(dtype).eps
    for what, ours, naive, exact in (
        ("loss", values, naive_values, ref_values),
        ("grad", grads, naive_grads, ref_grads),
    ):
        for a, b, e in zip(ours, naive, exact):
            allowed = max(3 * rel_err(b, e), 4 * eps)
            assert rel_err(a, e) <= allowed, f"{what}: {rel_err(a, e):.3g} > {allowed:.3g} ({dtype})"


def test_leading_shape_and_padded_head():
    student, ids, logprobs, labels, _ = make_topk_case(leading=(3, 11), vocab=509, extra_rows=7, bias=True)
    options = dict(vocab_size=509, reduction="none", alpha=0.7, temperature=2.0)
    values, grads = check_against_reference(
        student, ids, logprobs, labels, grad_outputs=[torch.rand(3, 11, dtype=torch.float64)], **options
    )
    assert values[0].shape == (3, 11)
    assert (grads[1][509:] == 0).all() and (grads[2][509:] == 0).all()


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
def test_listed_teacher_mass_of_one_leaves_the_tail_at_its_resolution(dtype):
    """Listed teacher mass 1 with k < V (renormalized log-probabilities, or a confident teacher):
    p_tail = tau = eps (1 + sum p |log p|), the rounding error of 1 - sum p, not 0 or rounding noise.

    Reverse KL then charges q_tail log(q_tail / tau) for the student's tail mass: large, finite, and
    the same whatever the rounding of the listed mass.
    """
    student, ids, logprobs, labels, _ = make_topk_case(leading=(9,), vocab=211, k=5)
    renormalized = (logprobs - torch.logsumexp(logprobs, -1, keepdim=True)).to(dtype).clamp(max=0)
    precision = tail_precision(dtype, torch.float32)
    assert precision == max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    for divergence in TOPK_DIVERGENCES:
        options = dict(divergence=divergence, temperature=2.0, alpha=1.0, tail="bucket")
        values, grads = run(fused_linear_topk_kd_loss, student, ids, renormalized, labels, **options)
        ref_values, ref_grads = run(
            reference_topk_kd_loss,
            as_float64(student),
            ids,
            renormalized,
            labels,
            **options,
        )
        assert_close(values + grads, ref_values + ref_grads, 1e-5)


def test_module_matches_function():
    student, ids, logprobs, labels, _ = make_topk_case(leading=(13,), vocab=211)
    options = dict(divergence="reverse_kl", temperature=1.5, alpha=0.8, tail="renormalize")
    criterion = FusedLinearTopKKDLoss(**options)
    module_loss = criterion(student["student_hidden"], student["student_weight"], ids, logprobs, labels)
    function_loss = fused_linear_topk_kd_loss(
        student["student_hidden"], student["student_weight"], ids, logprobs, labels, **options
    )
    assert module_loss.item() == function_loss.item()
    assert "renormalize" in repr(criterion)
    with pytest.raises(ValueError, match="tail must be one of"):
        FusedLinearTopKKDLoss(tail="drop")
    with pytest.raises(ValueError, match="divergence must be one of"):
        FusedLinearTopKKDLoss(divergence="jsd")


def test_no_gradient_work_under_no_grad():
    student, ids, logprobs, labels, _ = make_topk_case(leading=(21,), vocab=401)
    with torch.no_grad():
        loss = fused_linear_topk_kd_loss(
            student["student_hidden"], student["student_weight"], ids, logprobs, labels
        )
    assert loss.grad_fn is None and student["student_weight"].grad is None


def test_backward_twice_through_retained_graph():
    student, ids, logprobs, labels, _ = make_topk_case(leading=(15,), vocab=203)
    weight = student["student_weight"]
    loss = fused_linear_topk_kd_loss(
        student["student_hidden"], weight, ids, logprobs, labels, temperature=2.0
    )
    loss.backward(retain_graph=True)
    first = weight.grad.clone()
    weight.grad = None
    (2 * loss).backward()
    torch.testing.assert_close(weight.grad, 2 * first, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------
# No [N, V] tensor
# ----------------------------------------------------------------------------------------------------


class LargestAllocation(TorchDispatchMode):
    """The largest tensor an aten op allocates (an output whose storage is not one of the op's inputs)."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {
            x.untyped_storage().data_ptr()
            for x in tree_flatten((args, kwargs))[0]
            if isinstance(x, torch.Tensor)
        }
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if (
                isinstance(x, torch.Tensor)
                and x.untyped_storage().data_ptr() not in inputs
                and x.numel() > self.numel
            ):
                self.numel, self.op = x.numel(), func
        return out


def test_teacher_topk_allocates_no_tokens_by_vocab_tensor():
    n, vocab, hidden_dim, chunk, block = 96, 30_011, 8, 16, 2048
    hidden, weight = torch.randn(n, hidden_dim), torch.randn(vocab, hidden_dim)
    with LargestAllocation() as largest:
        ids, _ = teacher_topk(hidden, weight, 32, temperature=2.0, chunk_size=chunk, block_size=block)
    assert largest.numel <= 2 * chunk * block < n * vocab, (largest.numel, largest.op)
    assert ids.shape == (n, 32)


@pytest.mark.parametrize(
    "options",
    [
        dict(tail="bucket", alpha=0.7, reduction="mean"),  # gradient formed in the forward
        dict(tail="bucket", alpha=0.7, reduction="none", divergence="reverse_kl"),  # recomputed
        dict(tail="renormalize", alpha=0.5, reduction="sum", return_components=True),
        dict(tail="renormalize", alpha=1.0, reduction="mean"),  # gather-only path
    ],
    ids=["bucket-mean", "bucket-none-rkl", "renormalize-components", "renormalize-sparse"],
)
def test_sparse_loss_allocates_no_tokens_by_vocab_tensor(options):
    n, vocab, hidden_dim, k, chunk = (
        96,
        30_011,
        8,
        32,
        16,
    )  # hidden << n: the V x H gradient is far below N x V
    student_hidden = torch.randn(n, hidden_dim, requires_grad=True)
    student_weight = torch.randn(vocab, hidden_dim, requires_grad=True)
    ids, logprobs = teacher_topk(torch.randn(n, hidden_dim), torch.randn(vocab, hidden_dim), k)
    labels = torch.randint(0, vocab, (n,))
    labels[::5] = -100
    with LargestAllocation() as largest:
        out = fused_linear_topk_kd_loss(
            student_hidden, student_weight, ids, logprobs, labels, chunk_size=chunk, **options
        )
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert largest.numel <= max(chunk * vocab, vocab * hidden_dim) < n * vocab, (largest.numel, largest.op)
    assert torch.isfinite(student_weight.grad).all()


@pytest.mark.parametrize("tail", TAILS)
def test_components_at_alpha_one_carry_the_cross_entropy(tail):
    """alpha = 1 with labels and return_components: the loss is the distillation alone, but the ce
    component is still the cross-entropy, as the reference (and the dense loss) report it."""
    vocab = 97
    student, ids, logprobs, labels, _ = make_topk_case(vocab=vocab, k=7, dtype=torch.float64)
    options = dict(temperature=2.0, alpha=1.0, tail=tail, return_components=True, reduction="none")
    values, _ = run(fused_linear_topk_kd_loss, student, ids, logprobs, labels, **options)
    expected, _ = run(reference_topk_kd_loss, student, ids, logprobs, labels, **options)
    assert_close(values, expected, 1e-12, "values")
    counted = labels.reshape(-1) != -100
    assert (values[2].reshape(-1)[counted] > 0).all()  # a cross-entropy, not zeros
