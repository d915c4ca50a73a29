"""The tile kernel (`fusedkd.kernels.kd_tile.kd_tile_terms_triton`) against `tiles.kd_tile_terms`, whose
drop-in it is, and against float64 autograd of the definitions (`fusedkd.reference`).

Every case builds float32 tiles holding `folded * z` (as the fused linear loss's GEMMs leave them), runs
the kernel and `kd_tile_terms` on fresh clones (both overwrite a tile with G), and takes the ground truth
from the same float32 tiles in float64: z = tile / folded, D and C by `reference.kd_terms_from_logits`,
G = d(sum_i w_D,i D_i + w_C,i C_i) / dz by autograd. Shapes are small and odd (c = 5, 11; V = 37, 1,021,
1,500) with BLOCK_V below V, so every pass runs several blocks and a masked last one (the interpreter
runs each block as numpy operations: a few parametrizations, not a cross product).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from fusedkd import kernels, reference
from fusedkd._options import KDOptions
from fusedkd.torch_backend import tiles
from tests._helpers import DEVICE, rel_err

pytestmark = pytest.mark.skipif(
    kernels.unavailable_reason(DEVICE) is not None, reason=str(kernels.unavailable_reason(DEVICE))
)

# Norm-wise relative error of the float32 kernel against float64: float32 rounding (2^-24 = 6e-8)
# amplified by the log-sum-exp's sums over up to 1,500 entries and by the cancellation in
# A / Z_b - log Z_b + log Z_a (terms of size log V ~ 7 for divergences of size ~0.1-1): the project's
# FP32_RTOL (docs/design.md §6).
RTOL = 2e-5
# Against `kd_tile_terms`: the sum of the two float32 errors. Its JSD gradient is the less accurate of
# the two (the kernel's is relative to the student's top token): up to 2.8e-5 from float64 on a peaked
# row at T = 0.7 (seeds 0-3 of "jsd-T0.7-tempered-wce-none"), where the kernel's is 3e-6.
RTOL_VS_TORCH = 5e-5

IGNORE = -100


def _options(divergence, temperature, *, vocab, labels=True, heads=None, beta=0.3) -> KDOptions:
    options = KDOptions.of(
        dict(
            divergence=divergence,
            beta=beta,
            temperature=temperature,
            alpha=0.5 if labels else 1.0,
            ignore_index=IGNORE,
            reduction="none",
            **(heads or {}),
        )
    )
    return options.resolve(vocab_size=vocab, has_labels=labels)


def _logits(c: int, vocab: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 projections z_s, z_t [c, V]: random rows of standard deviation 3, row 0 peaked (one
    entry 12 above the others: q and p near one-hot), row 1 flat (near-uniform); "big": of magnitude
    ~60 (through a soft cap of 3, saturated); "extreme": every row offset by +-1e4, with a few entries
    another 1e4 below (their probabilities underflow to exactly 0)."""
    z_s = torch.randn(c, vocab, dtype=torch.float64) * 3
    z_t = torch.randn(c, vocab, dtype=torch.float64) * 3
    for z in (z_s, z_t):
        z[0, torch.randint(0, vocab, ())] += 12.0
        z[1] *= 0.01
    if kind == "big":
        z_s *= 20
        z_t *= 20
    elif kind == "extreme":
        z_s += 1e4
        z_t -= 1e4
        low = torch.randint(0, vocab, (c, 3))
        z_s.scatter_add_(1, low, torch.full(low.shape, -1e4, dtype=torch.float64))
        z_t.scatter_add_(1, low.flip(0), torch.full(low.shape, -1e4, dtype=torch.float64))
    return z_s, z_t


def _tiles(z_s, z_t, folded):
    return (folded[0] * z_s).float(), (folded[1] * z_t).float()


def _expected(s, t, labels, options, grad_weights, folded, valid):
    """(D, C, G) in float64 from the definitions, for the z the float32 tiles hold."""
    z_s = (s.double() / folded[0]).requires_grad_(True)
    z_t = t.double() / folded[1]
    counts = torch.ones(s.shape[0], dtype=torch.bool) if valid is None else valid
    ref_labels = None if labels is None else torch.where(counts, labels, IGNORE)
    # Rows that do not count are never read (the reference does this itself for ignored labels only).
    z_s_read = torch.where(counts[:, None], z_s, 0.0)
    z_t = torch.where(counts[:, None], z_t, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, divergence, ce = reference.kd_terms_from_logits(z_s_read, z_t, ref_labels, options)
    divergence = torch.where(counts, divergence, 0.0)
    ce = torch.where(counts, ce, 0.0)
    grad = None
    if grad_weights is not None:
        w_distill, w_ce = grad_weights
        total = (w_distill.double() * divergence).sum()
        if w_ce is not None and labels is not None:
            total = total + (w_ce.double() * ce).sum()
        (grad,) = torch.autograd.grad(total, z_s)
    return divergence.detach(), ce.detach(), grad


def _run_both(s, t, labels, options, grad_weights, *, tempered, folded, valid, grad_out=None, block_v=None):
    from fusedkd.kernels.kd_tile import kd_tile_terms_triton

    s_k, t_k = s.clone(), t.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's "invalid value" for -inf - (-inf) in masked columns
        kernel = kd_tile_terms_triton(
            s_k,
            t_k,
            labels,
            options,
            grad_weights,
            teacher_tempered=tempered,
            folded=folded,
            valid=valid,
            grad_out=grad_out,
            block_v=block_v,
        )
    s_ts, t_ts = s.clone(), t.clone()
    torch_terms = tiles.kd_tile_terms(
        s_ts, t_ts, labels, options, grad_weights, teacher_tempered=tempered, folded=folded, valid=valid
    )
    return kernel, torch_terms, (s_k, t_k)


def _assert_matches(actual, expected, what, rtol=RTOL):
    """NaN and +-inf exactly where `expected` has them, the finite rest within `rtol` norm-wise."""
    actual = actual.double()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(actual.isinf(), expected.isinf()), f"{what}: inf positions differ"
    assert torch.equal(actual[actual.isinf()], expected[expected.isinf()]), f"{what}: inf signs differ"
    finite = expected.isfinite()
    err = rel_err(actual[finite], expected[finite])
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:.3g}"


def _check(kernel, torch_terms, expected, what=""):
    for name, k, ts, e in zip(("divergence", "ce", "G"), kernel, torch_terms, expected):
        if e is None:
            assert k is None and ts is None
            continue
        _assert_matches(k, e, f"{what}{name} vs float64")
        _assert_matches(k, ts.double(), f"{what}{name} vs kd_tile_terms", rtol=RTOL_VS_TORCH)


def _weights(c, want_grad, w_ce):
    if not want_grad:
        return None
    return torch.rand(c) + 0.5, (torch.rand(c) + 0.5 if w_ce else None)


# (divergence, T, teacher_tempered, labels, grad ("ce": w_D and w_C, "distill": w_C None, None: values
# only), heads, logits kind, c, V, BLOCK_V, valid rows)
CASES = {
    "fkl-T1": ("forward_kl", 1.0, False, True, "ce", {}, "random", 5, 37, 16, False),
    "fkl-T2.5-tempered": ("forward_kl", 2.5, True, True, "ce", {}, "random", 11, 1021, 256, True),
    "fkl-T0.7-nolabels-values": ("forward_kl", 0.7, False, False, None, {}, "random", 5, 1500, 512, False),
    "rkl-T0.7-wce-none": ("reverse_kl", 0.7, False, True, "distill", {}, "random", 5, 1500, 512, True),
    "rkl-T1-tempered-nolabels": ("reverse_kl", 1.0, True, False, "ce", {}, "random", 11, 37, 8, True),
    "rkl-T2.5-values": ("reverse_kl", 2.5, True, True, None, {}, "random", 5, 1021, 128, False),
    "jsd-T2.5": ("jsd", 2.5, False, True, "ce", {}, "random", 5, 1021, 128, True),
    "jsd-T1-tempered-values": ("jsd", 1.0, True, True, None, {}, "random", 11, 37, 16, False),
    "jsd-T0.7-tempered-wce-none": ("jsd", 0.7, True, True, "distill", {}, "random", 5, 1500, 256, False),
    # Head transforms: logit scales, soft caps (30: tanh's argument small and moderate; 3 on logits of
    # ~60: saturated, where the cap's derivative 1 / cosh^2 is tiny but not 0).
    "fkl-scales": (
        "forward_kl",
        2.5,
        True,
        True,
        "ce",
        dict(student_logit_scale=0.5, teacher_logit_scale=2.0),
        "random",
        5,
        1021,
        256,
        False,
    ),
    "rkl-caps30": (
        "reverse_kl",
        1.0,
        True,
        True,
        "ce",
        dict(student_softcap=30.0, teacher_softcap=30.0, teacher_logit_scale=0.5),
        "random",
        11,
        1021,
        256,
        True,
    ),
    "jsd-caps3-saturated": (
        "jsd",
        0.7,
        False,
        True,
        "ce",
        dict(student_softcap=3.0, teacher_softcap=3.0, student_logit_scale=2.0),
        "big",
        11,
        37,
        16,
        False,
    ),
    "fkl-cap3-saturated-tempered": (
        "forward_kl",
        2.5,
        True,
        True,
        "ce",
        dict(student_softcap=3.0, teacher_softcap=30.0),
        "big",
        5,
        1500,
        512,
        True,
    ),
    # Logits of magnitude 1e4: the log-probabilities stay exact relative to the row maxima (§6).
    "fkl-extreme": ("forward_kl", 0.7, True, True, "ce", {}, "extreme", 5, 1021, 256, False),
    "rkl-extreme": ("reverse_kl", 2.5, False, True, "ce", {}, "extreme", 5, 37, 16, True),
    "jsd-extreme": ("jsd", 1.0, True, True, "ce", {}, "extreme", 5, 1021, 256, False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference(case):
    divergence, T, tempered, has_labels, grad, heads, kind, c, vocab, block_v, has_valid = case
    options = _options(divergence, T, vocab=vocab, labels=has_labels, heads=heads)
    folded = tiles.gemm_scales(options, temper_teacher=tempered)
    z_s, z_t = _logits(c, vocab, kind)
    valid = None
    if has_valid:  # rows that do not count hold NaN and +inf: never read
        valid = torch.ones(c, dtype=torch.bool)
        valid[[1, c - 1]] = False
        z_s[1, 3] = z_t[c - 1, 0] = math.nan
        z_s[c - 1, 2] = math.inf
    s, t = _tiles(z_s, z_t, folded)
    labels = torch.randint(0, vocab, (c,)) if has_labels else None
    grad_weights = _weights(c, grad is not None, grad == "ce")
    kernel, torch_terms, _ = _run_both(
        s, t, labels, options, grad_weights, tempered=tempered, folded=folded, valid=valid, block_v=block_v
    )
    expected = _expected(s, t, labels, options, grad_weights, folded, valid)
    _check(kernel, torch_terms, expected)
    if valid is not None:
        assert (kernel[0][~valid] == 0).all() and (kernel[1][~valid] == 0).all()
        if kernel[2] is not None:
            assert (kernel[2][~valid] == 0).all()


def test_logits_level_folding():
    """kd_loss's tiles: the caller's logits, folded (1, 1), the teacher divided by T in the kernel."""
    options = _options("forward_kl", 2.5, vocab=37, heads=dict(student_logit_scale=2.0, teacher_softcap=30.0))
    z_s, z_t = _logits(5, 37, "random")
    s, t = _tiles(z_s, z_t, (1.0, 1.0))
    labels = torch.randint(0, 37, (5,))
    grad_weights = _weights(5, True, True)
    kernel, torch_terms, _ = _run_both(
        s, t, labels, options, grad_weights, tempered=False, folded=(1.0, 1.0), valid=None, block_v=16
    )
    _check(kernel, torch_terms, _expected(s, t, labels, options, grad_weights, (1.0, 1.0), None))


# Rows of the non-finite tile (c = 11): 1-3 a non-distribution student, 4-6 teacher, 7-8 do not count
# (poisoned anyway), the others clean with -inf entries, placed so that every divergence stays finite.
NONFINITE_ROWS = {
    1: ("student", math.nan),
    2: ("student", math.inf),
    3: ("student", "row"),
    4: ("teacher", math.nan),
    5: ("teacher", math.inf),
    6: ("teacher", "row"),
}


def _poisoned_logits(divergence, vocab):
    c = 11
    z_s, z_t = _logits(c, vocab, "random")
    for row, (side, poison) in NONFINITE_ROWS.items():
        z = z_s if side == "student" else z_t
        if poison == "row":
            z[row] = -math.inf
        else:
            z[row, 5] = poison
    z_s[7, 0], z_t[7, 1], z_s[8, 2] = math.nan, math.nan, math.inf
    # -inf entries: both at columns 10-12; the teacher alone at 13-14 (p = 0: forward KL and JSD finite);
    # the student alone at 15-16 (q = 0: reverse KL and JSD finite).
    clean = [0, 9, 10]
    for row in clean:
        z_s[row, 10:13] = z_t[row, 10:13] = -math.inf
        if divergence != "reverse_kl":
            z_t[row, 13:15] = -math.inf
        if divergence != "forward_kl":
            z_s[row, 15:17] = -math.inf
    if divergence == "forward_kl":  # q = 0 < p: KL(p || q) = +inf (its gradient (q - p) / T stays finite)
        z_s[10, 17:19] = -math.inf
    valid = torch.ones(c, dtype=torch.bool)
    valid[[7, 8]] = False
    labels = torch.randint(20, vocab, (c,))  # never a -inf logit: a finite CE
    return z_s, z_t, labels, valid


@pytest.mark.parametrize(
    "divergence, T, heads",
    [
        ("forward_kl", 1.0, {}),
        ("reverse_kl", 2.5, {}),
        ("jsd", 0.7, {}),
        # Capped heads map +-inf to +-cap: a student's +inf or -inf row is then a distribution.
        ("forward_kl", 2.5, dict(student_softcap=30.0, teacher_softcap=3.0)),
    ],
)
def test_nonfinite_rows(divergence, T, heads):
    vocab = 37
    options = _options(divergence, T, vocab=vocab, heads=heads)
    folded = tiles.gemm_scales(options, temper_teacher=True)
    z_s, z_t, labels, valid = _poisoned_logits(divergence, vocab)
    s, t = _tiles(z_s, z_t, folded)
    grad_weights = _weights(11, True, True)
    kernel, torch_terms, _ = _run_both(
        s, t, labels, options, grad_weights, tempered=True, folded=folded, valid=valid, block_v=16
    )
    expected = _expected(s, t, labels, options, grad_weights, folded, valid)
    # The rule itself, not only agreement with the reference.
    divergence_nan, ce_nan, grad_rows_nan = expected[0].isnan(), expected[1].isnan(), expected[2].isnan()
    if not heads:
        assert divergence_nan.nonzero().view(-1).tolist() == [1, 2, 3, 4, 5, 6]
        assert ce_nan.nonzero().view(-1).tolist() == [1, 2, 3]
        assert expected[0].isinf().nonzero().view(-1).tolist() == ([10] if divergence == "forward_kl" else [])
    assert torch.equal(grad_rows_nan.all(-1), divergence_nan) and torch.equal(
        grad_rows_nan.any(-1), divergence_nan
    )
    _check(kernel, torch_terms, expected)
    assert (kernel[2][~valid] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_grad_out(divergence, dtype):
    """G cast on store into a separate `grad_out` equals the cast of the float32 G, the tiles untouched;
    without `grad_out`, G is written over `tiles.grad_tile` and returned."""
    c, vocab = 5, 1021
    options = _options(divergence, 2.5, vocab=vocab, heads=dict(student_softcap=30.0))
    folded = tiles.gemm_scales(options, temper_teacher=True)
    z_s, z_t = _logits(c, vocab, "random")
    z_s[2, 7] = math.nan  # a NaN row stays NaN through the cast
    s, t = _tiles(z_s, z_t, folded)
    labels = torch.randint(0, vocab, (c,))
    grad_weights = _weights(c, True, True)
    valid = torch.tensor([True, True, True, False, True])
    run = dict(tempered=True, folded=folded, valid=valid, block_v=256)

    grad_out = torch.full((c, vocab), 7.0, dtype=dtype)
    kernel, torch_terms, (s_k, t_k) = _run_both(s, t, labels, options, grad_weights, grad_out=grad_out, **run)
    assert kernel[2] is grad_out
    assert _same(s_k, s) and _same(t_k, t)  # read only
    in_place, _, (s_i, t_i) = _run_both(s, t, labels, options, grad_weights, **run)
    assert in_place[2].data_ptr() == tiles.grad_tile(options, s_i, t_i).data_ptr()
    assert all(_same(a, b.to(a.dtype)) for a, b in zip(kernel, in_place))
    bound = RTOL if dtype == torch.float32 else torch.finfo(dtype).eps
    _assert_matches(kernel[2], torch_terms[2].to(dtype).double(), "G vs kd_tile_terms", rtol=bound)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_grad_in_the_student_tiles_bytes(divergence, dtype):
    """G written into the student tile's own storage (`s.view(dtype)[:, :V]`, as the tiles backend
    does: no buffer for G) equals G into a separate buffer, bit for bit, over several blocks per row
    (each block of G lands on columns of s that earlier blocks read); other overlaps are refused."""
    from fusedkd.kernels.kd_tile import kd_tile_terms_triton

    c, vocab = 6, 1021  # 4 blocks of 256 per row, the last one partial
    options = _options(divergence, 2.5, vocab=vocab, heads=dict(student_softcap=30.0))
    folded = tiles.gemm_scales(options, temper_teacher=True)
    z_s, z_t = _logits(c, vocab, "random")
    z_s[2, 700] = math.nan  # a NaN row stays NaN, and leaves the other rows alone
    s, t = _tiles(z_s, z_t, folded)
    labels = torch.randint(0, vocab, (c,))
    grad_weights = _weights(c, True, True)
    valid = torch.tensor([True, True, True, False, True, True])
    run = dict(teacher_tempered=True, folded=folded, valid=valid, block_v=256)

    separate = torch.empty(c, vocab, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = kd_tile_terms_triton(
            s.clone(), t.clone(), labels, options, grad_weights, grad_out=separate, **run
        )
        s_in, t_in = s.clone(), t.clone()
        in_s = s_in.view(dtype)[:, :vocab]
        got = kd_tile_terms_triton(s_in, t_in, labels, options, grad_weights, grad_out=in_s, **run)
    assert got[2] is in_s and in_s.stride() == (2 * vocab, 1)
    assert all(_same(a, b) for a, b in zip(got, expected))
    assert _same(t_in, t)  # the teacher's tile untouched
    assert _same(s_in[:, (vocab + 1) // 2 :], s[:, (vocab + 1) // 2 :])  # s past G's bytes untouched

    # G over the teacher's bytes, or over the second half of the student's, would be read after written.
    s_bad, t_bad = s.clone(), t.clone()
    for bad in (t_bad.view(dtype)[:, :vocab], s_bad.view(dtype)[:, vocab:]):
        with pytest.raises(ValueError, match="grad_out shares a tile's memory"):
            kd_tile_terms_triton(s_bad, t_bad, labels, options, grad_weights, grad_out=bad, **run)
    # Slices of one buffer that do not overlap are apart: accepted, and the same results.
    buffer = torch.empty(3, c, vocab)
    buffer[0], buffer[1] = s, t
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = kd_tile_terms_triton(
            buffer[0],
            buffer[1],
            labels,
            options,
            grad_weights,
            grad_out=buffer[2].view(dtype)[:, :vocab],
            **run,
        )
    assert all(_same(a, b) for a, b in zip(got, expected))


def _same(a, b):
    """Equal, NaN where NaN."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


def test_empty_chunk():
    from fusedkd.kernels.kd_tile import kd_tile_terms_triton

    options = _options("jsd", 2.0, vocab=37)
    s = torch.empty(0, 37)
    divergence, ce, grad = kd_tile_terms_triton(s, s.clone(), None, options, (torch.empty(0), None))
    assert divergence.shape == ce.shape == (0,) and grad.shape == (0, 37)
