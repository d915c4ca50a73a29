"""Non-finite inputs (docs/design.md §9): a NaN or +inf in a counted token's logits, or a row of -inf,
makes that token's loss and every gradient it feeds NaN; -inf entries (masked vocabulary rows, -inf
biases) stay exact where the mathematics is finite; ignored tokens are never read.

Every case runs on every backend against `fusedkd.reference` in float64, which follows the same rule:
NaN and inf must appear exactly where the reference has them, and the finite entries must match it.
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedkd
from fusedkd.torch_backend import tiles
from tests._helpers import BACKENDS, DEVICE, assert_like_reference, reference_kd_loss, reference_topk_kd_loss

# The interpreter evaluates `-inf - -inf`, `x / 0` and `log(0)` in masked lanes and in rows the rule
# fills with NaN, whose results are discarded.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# The torch backend as on an accelerator: ignored tokens are computed (not compacted away) and masked.
BACKENDS = [*BACKENDS, pytest.param("torch", id="torch-uncompacted", marks=pytest.mark.uncompacted)]
# The fused linear loss has one more: the tiles backend (its chunks' tiles in one Triton pass).
LINEAR_BACKENDS = [
    *BACKENDS,
    pytest.param("tiles", id="tiles", marks=[m for b in BACKENDS if b.id == "triton" for m in b.marks]),
]


@pytest.fixture(autouse=True)
def _uncompacted(request, monkeypatch):
    if request.node.get_closest_marker("uncompacted") is not None:
        monkeypatch.setattr(tiles, "compacts_ignored", lambda device: False)


N, VOCAB, H_S, H_T = 9, 37, 6, 10
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
# float32 against float64 on tiny shapes: a few ulps of sums over 37 entries.
RTOL = 1e-4

LINEAR_POISONS = [
    "teacher_nan",
    "teacher_inf",
    "student_nan",
    "student_weight_nan",
    "ignored_nan",
    "bias_neginf",
    "teacher_bias_all_neginf",
]
LOGITS_POISONS = [
    "teacher_nan",
    "teacher_inf",
    "student_nan",
    "student_inf",
    "ignored_nan",
    "neginf_entries",
    "teacher_row_neginf",
    "student_row_neginf",
]


def _labels():
    labels = torch.randint(0, VOCAB, (N,))
    labels[[0, 5]] = -100  # tokens 0 and 5 are ignored; token 2 is the poisoned counted token
    return labels.to(DEVICE)


def _linear_inputs(poison: str):
    hs, ws = torch.randn(N, H_S) / H_S**0.5, torch.randn(VOCAB, H_S) * 2
    ht, wt = torch.randn(N, H_T) / H_T**0.5, torch.randn(VOCAB, H_T) * 2
    bs, bt = torch.randn(VOCAB), torch.randn(VOCAB)
    if poison == "teacher_nan":
        ht[2, 1] = math.nan
    elif poison == "teacher_inf":
        ht[2, 1] = math.inf
    elif poison == "student_nan":
        hs[2, 1] = math.nan
    elif poison == "student_weight_nan":
        ws[4, 0] = math.nan
    elif poison == "ignored_nan":
        hs[0, 1] = ht[5, 0] = math.nan
        hs[5, 0] = math.inf
    elif poison == "bias_neginf":
        bs[[3, 7]] = -math.inf
        bt[[3, 11, 20]] = -math.inf
    elif poison == "teacher_bias_all_neginf":
        bt[:] = -math.inf
    return hs, ws, bs, ht, wt, bt


def _logits_inputs(poison: str):
    s, t = torch.randn(N, VOCAB) * 3, torch.randn(N, VOCAB) * 3
    if poison == "teacher_nan":
        t[2, 4] = math.nan
    elif poison == "teacher_inf":
        t[2, 4] = math.inf
    elif poison == "student_nan":
        s[2, 4] = math.nan
    elif poison == "student_inf":
        s[2, 4] = math.inf
    elif poison == "ignored_nan":
        s[0, 3] = t[5, :] = math.nan
    elif poison == "neginf_entries":
        s[:, [3, 7]] = -math.inf
        t[:, [3, 11]] = -math.inf
        t[2, 20] = -math.inf
    elif poison == "teacher_row_neginf":
        t[2] = -math.inf
    elif poison == "student_row_neginf":
        s[2] = -math.inf
    return s, t


def _check(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert_like_reference(actual, expected, what, RTOL)


def _compare(run, reference_run, reduction: str, n_grads: int) -> None:
    values, grads = run(torch.float32)
    ref_values, ref_grads = reference_run(torch.float64)
    for name, a, e in zip(("loss", "distill", "ce"), values, ref_values):
        _check(a, e, f"{reduction} {name}")
    for i in range(n_grads):
        _check(grads[i], ref_grads[i], f"{reduction} gradient {i}")


REDUCTIONS = ["mean", "none"]


def nonfinite_cases(backends, poisons, crossed: dict[str, tuple[str, ...]]) -> list:
    """(backend, divergence, poison, reduction) parameters: every poison on every backend. A backend
    named in `crossed` runs every divergence with every poison, and with every reduction for the
    names in its tuple ("reduction"); otherwise the divergences and reductions are dealt out in turn
    (each backend still meets each of them, and each poison several divergences across backends)."""
    out, turn = [], 0
    for backend in backends:
        full = crossed.get(backend.id)
        for poison in poisons:
            divergences = DIVERGENCES if full is not None else [DIVERGENCES[turn % len(DIVERGENCES)]]
            for divergence in divergences:
                if full is not None and "reduction" in full:
                    reductions = REDUCTIONS
                else:
                    reductions = [REDUCTIONS[turn % len(REDUCTIONS)]]
                turn += 1
                for reduction in reductions:
                    out.append(
                        pytest.param(
                            backend.values[0],
                            divergence,
                            poison,
                            reduction,
                            id=f"{backend.id}-{divergence}-{poison}-{reduction}",
                            marks=backend.marks,
                        )
                    )
    return out


# Every (divergence, poison, reduction) on the torch backend; every (divergence, poison) on Triton's
# fused kernels, whose one gradient kernel serves every reduction; the other backends dealt out.
@pytest.mark.parametrize(
    "backend,divergence,poison,reduction",
    nonfinite_cases(LINEAR_BACKENDS, LINEAR_POISONS, {"torch": ("reduction",), "triton": ()}),
)
def test_fused_linear_nonfinite(backend, divergence, poison, reduction):
    inputs, labels = _linear_inputs(poison), _labels()

    def run_with(loss_fn, **extra):
        def run(dtype):
            hs, ws, bs, ht, wt, bt = (x.to(device=DEVICE, dtype=dtype) for x in inputs)
            student = [x.requires_grad_(True) for x in (hs, ws, bs)]
            out = loss_fn(
                hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt, divergence=divergence,
                temperature=2.0, alpha=0.6, reduction=reduction, return_components=True, **extra,
            )  # fmt: skip
            grads = torch.autograd.grad(out[0].sum() + 0.3 * out[1].sum(), student)
            return out, grads

        return run

    _compare(
        run_with(fusedkd.fused_linear_kd_loss, backend=backend),
        run_with(fusedkd.reference.fused_linear_kd_loss),
        reduction,
        3,
    )


# Triton's kd_loss forms G in its forward kernel for "mean" and in its backward kernel for "none": both.
@pytest.mark.parametrize(
    "backend,divergence,poison,reduction",
    nonfinite_cases(BACKENDS, LOGITS_POISONS, {"torch": ("reduction",), "triton": ("reduction",)}),
)
def test_kd_logits_nonfinite(backend, divergence, poison, reduction):
    inputs, labels = _logits_inputs(poison), _labels()

    def run_with(loss_fn, **extra):
        def run(dtype):
            s, t = (x.to(device=DEVICE, dtype=dtype) for x in inputs)
            s.requires_grad_(True)
            out = loss_fn(
                s, t, labels, divergence=divergence, temperature=2.0, alpha=0.6, reduction=reduction,
                return_components=True, **extra,
            )  # fmt: skip
            return out, torch.autograd.grad(out[0].sum() + 0.3 * out[1].sum(), [s])

        return run

    _compare(run_with(fusedkd.kd_loss, backend=backend), run_with(reference_kd_loss), reduction, 1)


TOPK_POISONS = ["student_nan", "student_inf", "student_weight_nan", "ignored_nan", "bias_neginf"]


TOPK_TAILS = [("bucket", 0.6), ("renormalize", 0.6), ("renormalize", 1.0)]


TILES_MARKS = [m for b in BACKENDS if b.id == "triton" for m in b.marks]


def topk_nonfinite_cases() -> list:
    """Every (tail, divergence, poison) on the torch backend and on the tiles backend (its kernels;
    renormalize with alpha=1 is the torch backend's sparse path there too); uncompacted, each poison
    once per backend, the tails and divergences dealt out in turn."""
    out = []
    for backend, marks in (("torch", []), ("tiles", TILES_MARKS)):
        for i, poison in enumerate(TOPK_POISONS):
            kls = ("forward_kl", "reverse_kl")
            cases = [(tail, alpha, d, False) for tail, alpha in TOPK_TAILS for d in kls]
            tail, alpha = TOPK_TAILS[i % len(TOPK_TAILS)]
            cases.append((tail, alpha, kls[i % 2], True))
            for tail, alpha, divergence, uncompacted in cases:
                kind = f"{backend}-uncompacted" if uncompacted else backend
                out.append(
                    pytest.param(
                        backend,
                        tail,
                        alpha,
                        divergence,
                        poison,
                        id=f"{kind}-{tail}-{alpha}-{divergence}-{poison}",
                        marks=[pytest.mark.uncompacted, *marks] if uncompacted else marks,
                    )
                )
    return out


@pytest.mark.parametrize("backend,tail,alpha,divergence,poison", topk_nonfinite_cases())
def test_topk_nonfinite(backend, tail, alpha, divergence, poison):
    """The sparse top-k loss (renormalize with alpha=1 reads only the k listed rows)."""
    hs, ws, bs = torch.randn(N, H_S) / H_S**0.5, torch.randn(VOCAB, H_S) * 2, torch.randn(VOCAB)
    teacher = torch.log_softmax(torch.randn(N, VOCAB) * 3, dim=-1)
    logprobs, ids = teacher.topk(5, dim=-1)
    labels = _labels()
    if poison == "student_nan":
        hs[2, 1] = math.nan
    elif poison == "student_inf":
        hs[2, 1] = math.inf
    elif poison == "student_weight_nan":
        ws[ids[3, 0], 0] = math.nan
    elif poison == "ignored_nan":
        hs[0, 1] = math.nan
        logprobs[5] = -math.inf  # a position that does not count need list no mass
    elif poison == "bias_neginf":
        bs[ids[4, 1]] = bs[ids[6, 0]] = -math.inf
        bs[[v for v in range(VOCAB) if v not in ids[:, :3].flatten().tolist()][:4]] = -math.inf

    def run_with(loss_fn, **extra):
        def run(dtype):
            student = [x.to(device=DEVICE, dtype=dtype).requires_grad_(True) for x in (hs, ws, bs)]
            out = loss_fn(
                student[0], student[1], ids.to(DEVICE), logprobs.to(device=DEVICE, dtype=dtype), labels,
                student_bias=student[2], divergence=divergence, temperature=2.0, alpha=alpha, tail=tail,
                reduction="none", **extra,
            )  # fmt: skip
            return (out, out, out), torch.autograd.grad(out.sum(), student)

        return run

    _compare(
        run_with(fusedkd.fused_linear_topk_kd_loss, backend=backend),
        run_with(reference_topk_kd_loss),
        "none",
        3,
    )


def test_fp16_teacher_overflow_is_nan_not_zero():
    """The realistic trigger: an fp16 teacher whose logits overflow 65,504 (+inf) under JSD."""
    s = torch.randn(4, 50)
    t = torch.randn(4, 50)
    t[1, 7] = 70000.0
    t = t.half()
    loss = fusedkd.kd_loss(s, t.float(), divergence="jsd", reduction="none", alpha=1.0)
    assert loss[1].isnan() and loss[[0, 2, 3]].isfinite().all()


TILES = LINEAR_BACKENDS[-1]


@pytest.mark.parametrize("backend", [pytest.param("torch", id="torch"), TILES])
@pytest.mark.parametrize("loss", ["dense", "topk"])
def test_bf16_cpu_gemm_keeps_a_nan_in_its_token(loss, backend):
    """bfloat16 with an odd hidden size and an odd vocabulary: torch's CPU bfloat16 GEMM, with an odd
    inner dimension, makes a row's product NaN when the next row holds a NaN (`gemm._nonfinite_rows`);
    the poisoned token's loss and hidden-state gradient are NaN, its neighbours' are not."""
    torch.manual_seed(3)
    n, vocab, h = 33, 65, 5  # odd K for the projection (h) and for dh = G W (vocab)
    hs = torch.randn(n, h)
    hs[1, 0] = math.nan  # the token after token 0
    ws, ht, wt = torch.randn(vocab, h), torch.randn(n, h), torch.randn(vocab, h)
    labels = torch.randint(0, vocab, (n,))
    student = [x.to(DEVICE, torch.bfloat16).requires_grad_(True) for x in (hs, ws)]
    teacher = [x.to(DEVICE, torch.bfloat16) for x in (ht, wt)]
    if loss == "dense":
        out = fusedkd.fused_linear_kd_loss(*student, *teacher, labels, backend=backend, reduction="none")
    else:
        ids, logprobs = fusedkd.teacher_topk(*teacher, 6)
        out = fusedkd.fused_linear_topk_kd_loss(
            *student, ids, logprobs, labels, backend=backend, reduction="none"
        )
    grad_hidden = torch.autograd.grad(out.sum(), student[0])[0]
    assert out.isnan().nonzero().flatten().tolist() == [1]
    assert grad_hidden.isnan().any(-1).nonzero().flatten().tolist() == [1]


NO_LABELS_CASES = [
    pytest.param(loss, b.values[0], id=f"{loss}-{b.id}", marks=b.marks)
    for b in LINEAR_BACKENDS
    for loss in ("dense", "topk")
    if not (loss == "topk" and b.values[0] == "triton")  # the top-k loss has no fused Triton kernels
]


@pytest.mark.parametrize("loss,backend", NO_LABELS_CASES)
def test_no_labels_ce_component_stays_zero_on_a_nan_token(loss, backend):
    """labels=None: no cross-entropy, so its component is 0 for every token, a NaN token's included
    (its divergence is NaN), as in `fusedkd.reference` (the top-k loss has no fused Triton kernels)."""
    hs, ws, _, ht, wt, _ = _linear_inputs("student_nan")
    kw = dict(alpha=1.0, return_components=True, reduction="none")
    if loss == "dense":
        args = [x.to(DEVICE) for x in (hs, ws, ht, wt)]
        loss_, distill, ce = fusedkd.fused_linear_kd_loss(*args, None, backend=backend, **kw)
        ref = fusedkd.reference.fused_linear_kd_loss(*(x.double() for x in args), None, **kw)
    else:
        ids, logprobs = fusedkd.teacher_topk(ht.to(DEVICE), wt.to(DEVICE), 5)
        args = [hs.to(DEVICE), ws.to(DEVICE), ids]
        loss_, distill, ce = fusedkd.fused_linear_topk_kd_loss(
            *args, logprobs, None, backend=backend, tail="bucket", **kw
        )
        ref = reference_topk_kd_loss(
            args[0].double(), args[1].double(), ids, logprobs.double(), None, tail="bucket", **kw
        )
    for name, actual, expected in zip(("loss", "distill", "ce"), (loss_, distill, ce), ref):
        _check(actual, expected, name)
    assert torch.equal(ce, torch.zeros_like(ce)) and distill.isnan().nonzero().flatten().tolist() == [2]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", LINEAR_BACKENDS[1:])
def test_nan_row_over_whole_blocks(backend, divergence):
    """A NaN token whose logit row fills whole vocabulary blocks (no masked column in any block): the
    reverse KL's argmax over an all-NaN block (Triton's interpreter raises there) and every other
    divergence give that token NaN, the others their finite values."""
    torch.manual_seed(5)
    n, vocab, h = 4, 256, 8
    hs, ws, ht, wt = torch.randn(n, h), torch.randn(vocab, h), torch.randn(n, h), torch.randn(vocab, h)
    hs[1, 0] = math.nan
    labels = torch.randint(0, vocab, (n,))
    args = [x.to(DEVICE) for x in (hs, ws, ht, wt)]
    out = fusedkd.fused_linear_kd_loss(
        *args, labels.to(DEVICE), divergence=divergence, backend=backend, reduction="none"
    )
    ref = fusedkd.reference.fused_linear_kd_loss(
        *(x.double() for x in args), labels.to(DEVICE), divergence=divergence, reduction="none"
    )
    _check(out, ref, divergence)
