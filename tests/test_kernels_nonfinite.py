"""Non-finite inputs where the Triton kernels' tiling matters (tests/test_nonfinite.py has the rule on
every backend): -inf over whole fold slices, vocabulary blocks and vocabulary splits of the fused
linear kernels (a state that is empty for one model while the other's is not), a teacher -inf at the
student's top token (the reverse KL's reference token), and NaN / -inf runs across the vocabulary
blocks of the logits-level kernels. Checked against `fusedkd.reference` in float64: NaN and inf exactly
where it has them, the finite entries to float32 rounding.

Under the interpreter the fused linear statistics pass takes 128-column vocabulary blocks folded 64
columns at a time in 2 splits (kernels/config.py INTERPRETER_CONFIG); the logits-level kernels take
blocks of up to 2048 columns.
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedkd
from tests._helpers import DEVICE, _triton_skip_reason, assert_like_reference, reference_kd_loss

pytestmark = pytest.mark.skipif(_triton_skip_reason() is not None, reason=str(_triton_skip_reason()))

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
RTOL = 1e-4
N, VOCAB, H_S, H_T = 7, 300, 6, 10  # 300 columns: blocks of 128 (the last one partial), 2 splits

# Masked columns (-inf bias), by case: (student's, teacher's).
LINEAR_MASKS = {
    # The same columns for both (every divergence finite): a whole fold slice, a whole vocabulary
    # block, and the whole of the second split (columns 256-299).
    "same": (list(range(0, 64)) + list(range(128, 160)) + list(range(256, 300)),) * 2,
    # The teacher masks the whole first block, the student nothing: forward KL finite, reverse KL +inf.
    "teacher_block": ([], list(range(0, 128))),
    # The student masks the whole second split, the teacher nothing: reverse KL finite, forward +inf.
    "student_split": (list(range(256, 300)), []),
    # Only the first slice is unmasked for the teacher: its running state is empty until then no more.
    "teacher_all_but_first_slice": ([], list(range(64, 300))),
}


def _check(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert_like_reference(actual, expected, what, RTOL)


def _labels(n: int, vocab: int, masked: list[int]) -> torch.Tensor:
    """Labels on columns the student does not mask (a -inf label logit makes CE +inf), two ignored."""
    allowed = torch.tensor([v for v in range(vocab) if v not in set(masked)])
    labels = allowed[torch.randint(0, len(allowed), (n,))]
    labels[[0, 4]] = -100
    return labels.to(DEVICE)


def _compare_linear(inputs, labels, divergence, reduction, **options):
    def run(loss_fn, dtype, **extra):
        hs, ws, bs, ht, wt, bt = (x.to(device=DEVICE, dtype=dtype) for x in inputs)
        student = [x.requires_grad_(True) for x in (hs, ws, bs)]
        out = loss_fn(
            hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt, divergence=divergence,
            temperature=2.0, alpha=0.6, reduction=reduction, return_components=True, **options, **extra,
        )  # fmt: skip
        return out, torch.autograd.grad(out[0].sum() + 0.3 * out[1].sum(), student)

    values, grads = run(fusedkd.fused_linear_kd_loss, torch.float32, backend="triton")
    ref_values, ref_grads = run(fusedkd.reference.fused_linear_kd_loss, torch.float64)
    for name, a, e in zip(("loss", "distill", "ce"), values, ref_values):
        _check(a, e, f"{reduction} {name}")
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads):
        _check(a, e, f"{reduction} {name}")


def _linear_inputs(student_masked, teacher_masked):
    hs, ws = torch.randn(N, H_S) / H_S**0.5, torch.randn(VOCAB, H_S) * 2
    ht, wt = torch.randn(N, H_T) / H_T**0.5, torch.randn(VOCAB, H_T) * 2
    bs, bt = torch.randn(VOCAB), torch.randn(VOCAB)
    bs[student_masked] = -math.inf
    bt[teacher_masked] = -math.inf
    return hs, ws, bs, ht, wt, bt


# The fused kernels' one gradient pass serves both reductions (only the per-token weights differ):
# each (divergence, case) with one of them, each case with both across the divergences.
@pytest.mark.parametrize(
    "divergence,case,reduction",
    [
        pytest.param(d, c, r, id=f"{d}-{c}-{r}")
        for i, d in enumerate(DIVERGENCES)
        for j, c in enumerate(sorted(LINEAR_MASKS))
        for r in [["mean", "none"][(i + j) % 2]]
    ],
)
def test_fused_linear_masked_slices_blocks_splits(divergence, case, reduction):
    student_masked, teacher_masked = LINEAR_MASKS[case]
    inputs = _linear_inputs(student_masked, teacher_masked)
    _compare_linear(inputs, _labels(N, VOCAB, student_masked), divergence, reduction)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_linear_masked_with_soft_cap(divergence):
    """With a soft cap a -inf logit becomes -cap (finite), in the kernels as in the reference."""
    student_masked, teacher_masked = LINEAR_MASKS["teacher_block"]
    inputs = _linear_inputs(student_masked, teacher_masked)
    labels = _labels(N, VOCAB, student_masked)
    _compare_linear(inputs, labels, divergence, "none", student_softcap=5.0, teacher_softcap=4.0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_linear_teacher_neginf_at_student_top(divergence):
    """p = 0 at the student's top token (column 200, in the second split): the reverse KL is +inf with
    the reference's -inf / NaN gradient pattern; its reference token t_* is -inf."""
    hs, ws, bs, ht, wt, bt = _linear_inputs([3, 7], [11])
    bs[200] = 30.0
    bt[200] = -math.inf
    _compare_linear((hs, ws, bs, ht, wt, bt), _labels(N, VOCAB, [3, 7]), divergence, "none")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_linear_nan_in_empty_state(divergence):
    """A NaN teacher logit in a slice that is otherwise -inf for that token (its maximum stays -inf)."""
    hs, ws, bs, ht, wt, bt = _linear_inputs([], list(range(0, 128)))
    ht[2] = math.nan  # every teacher logit of token 2 NaN, its masked ones included (NaN * w - inf)
    _compare_linear((hs, ws, bs, ht, wt, bt), _labels(N, VOCAB, []), divergence, "none")


LOGITS_VOCAB = 4500  # blocks of 2048: two full, one partial


def _logits_case(poison: str):
    n = 6  # tokens 0 and 4 ignored (_labels), 5 untouched
    s, t = torch.randn(n, LOGITS_VOCAB) * 3, torch.randn(n, LOGITS_VOCAB) * 3
    if poison == "first_block_neginf":  # empty states for a whole block, then finite
        s[1, :2048] = t[1, :2048] = -math.inf
        s[2, :2100] = -math.inf  # the student only: reverse KL finite, forward KL +inf
        t[3, 100:4400] = -math.inf
    elif poison == "nan_in_empty_block":  # a NaN while the running maximum is still -inf
        s[1, :2048] = -math.inf
        s[1, 5] = math.nan
        t[2, :2048] = -math.inf
        t[2, 2000] = math.nan
    elif poison == "inf_in_last_block":
        s[1, 4400] = math.inf
        t[2, 4499] = math.inf
    elif poison == "nan_first_then_finite":
        t[1, 0] = math.nan
        s[3, 2047] = math.nan
    masked = s.isneginf().any(0).nonzero().flatten().tolist()
    return s, t, masked


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "poison", ["first_block_neginf", "nan_in_empty_block", "inf_in_last_block", "nan_first_then_finite"]
)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_logits_across_blocks(divergence, poison, reduction):
    s, t, masked = _logits_case(poison)
    labels = _labels(s.shape[0], LOGITS_VOCAB, masked)

    def run(loss_fn, dtype, **extra):
        student = s.to(device=DEVICE, dtype=dtype).requires_grad_(True)
        out = loss_fn(
            student, t.to(device=DEVICE, dtype=dtype), labels, divergence=divergence, temperature=2.0,
            alpha=0.6, reduction=reduction, return_components=True, **extra,
        )  # fmt: skip
        return out, torch.autograd.grad(out[0].sum() + 0.3 * out[1].sum(), [student])[0]

    (values, grad), (ref_values, ref_grad) = (
        run(fusedkd.kd_loss, torch.float32, backend="triton"),
        run(reference_kd_loss, torch.float64),
    )
    for name, a, e in zip(("loss", "distill", "ce"), values, ref_values):
        _check(a, e, f"{reduction} {name}")
    _check(grad, ref_grad, f"{reduction} gradient")
