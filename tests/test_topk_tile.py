"""The top-k tile kernels (`fusedkd.kernels.topk_tile.topk_tile_terms_triton`) against the torch backend's
`topk_kd._tile_chunk`, whose drop-in they are, and the tiles backend of `fused_linear_topk_kd_loss`
against the float64 reference.

Each case builds a float32 tile holding `folded * z` (as the GEMM leaves it), runs both on fresh clones
(both overwrite the tile), and compares the divergence, the cross-entropy and G row by row. Shapes are
small and odd, with BLOCK_V below V so that each pass runs several blocks and a masked last one.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import fusedkd
from fusedkd import kernels
from fusedkd._options import SupportOptions, TopKOptions, tail_precision
from fusedkd.torch_backend import tiles
from fusedkd.torch_backend.topk_kd import _tile_chunk
from tests._helpers import DEVICE, FP32_RTOL, rel_err

pytestmark = [
    pytest.mark.skipif(kernels.unavailable_reason(DEVICE) is not None, reason="Triton cannot run here"),
    # The interpreter evaluates inf - inf and log(0) in masked lanes and in rows the rule fills with NaN.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

RTOL = 2e-5  # float32 against float32: both against float64 are within FP32_RTOL (docs/design.md §6)


def _setup(divergence, tail, T, *, c=11, vocab=1021, k=16, softcap=None, scale=1.0, labels=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    options = TopKOptions.of(
        dict(
            divergence=divergence,
            temperature=T,
            alpha=0.6 if labels else 1.0,
            tail=tail,
            reduction="none",
            student_softcap=softcap,
            student_logit_scale=scale,
        )
    ).resolve(vocab_size=vocab, has_labels=labels)
    support = SupportOptions(tail, tail_precision(torch.float32, torch.float32), need_ce=labels)
    folded = tiles.gemm_scales(options, temper_teacher=False)[0]
    z = torch.randn(c, vocab, generator=generator, dtype=torch.float64) * 3
    z[0, 5] += 14.0  # a peaked row
    teacher = torch.randn(c, vocab, generator=generator, dtype=torch.float64) * 3
    log_p_full = torch.log_softmax(teacher / T, dim=-1)
    log_p, ids = log_p_full.topk(k, dim=-1)
    label_ids = torch.randint(0, vocab, (c,), generator=generator)
    label_ids[1] = ids[1, 3]  # a label on the support
    weights = (torch.rand(c, generator=generator) + 0.5, torch.rand(c, generator=generator) + 0.5)
    return options, support, folded, z, ids, log_p.float(), label_ids if labels else None, weights


def _tile(z, folded):
    return (z * folded).float()


def _run(fn, s, ids, log_p, labels, options, support, weights, folded, valid, **kwargs):
    c, vocab = s.shape
    scratch = tiles.Scratch(c, vocab, torch.float32, s.device, 4 * vocab * 3)  # groups of 3 rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        divergence, ce, grad = fn(
            s.clone(), ids, log_p, labels, options, support, weights, scratch, folded, valid, **kwargs
        )
    return divergence, ce, grad


def _same_nan(a, b):
    assert torch.equal(a.isnan(), b.isnan())


def _compare(kernel, torch_terms, rtol=RTOL):
    for what, a, b in zip(("divergence", "ce", "G"), kernel, torch_terms):
        if b is None:
            assert a is None, what
            continue
        a, b = a.double(), b.double()
        _same_nan(a, b)
        finite = ~b.isnan()
        if a.dim() == 2:  # G row by row: each row's error relative to that row's norm
            rows = finite.all(-1)
            for r in rows.nonzero().view(-1).tolist():
                assert rel_err(a[r], b[r]) <= rtol, (what, r, rel_err(a[r], b[r]))
        else:
            assert torch.allclose(a[finite], b[finite], rtol=rtol, atol=rtol), (what, a, b)


@pytest.mark.parametrize(
    "divergence, tail, T, heads",
    [
        ("forward_kl", "bucket", 2.0, {}),
        ("reverse_kl", "bucket", 0.7, dict(scale=2.0)),
        ("forward_kl", "renormalize", 1.0, {}),
        ("reverse_kl", "renormalize", 3.0, dict(softcap=5.0)),
        ("forward_kl", "bucket", 1.5, dict(softcap=4.0, scale=0.5)),
    ],
)
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "no-labels"])
def test_matches_the_torch_tile_chunk(divergence, tail, T, heads, labels):
    options, support, folded, z, ids, log_p, label_ids, weights = _setup(
        divergence, tail, T, softcap=heads.get("softcap"), scale=heads.get("scale", 1.0), labels=labels
    )
    if not labels:
        weights = (weights[0], None)
    valid = torch.ones(z.shape[0], dtype=torch.bool)
    valid[[4, 9]] = False
    s = _tile(z, folded)
    from fusedkd.kernels.topk_tile import topk_tile_terms_triton

    args = (s, ids, log_p, label_ids, options, support)
    for w in (weights, None):  # with a gradient, and values only
        kernel = _run(topk_tile_terms_triton, *args, w, folded, valid, block_v=256)
        torch_terms = _run(_tile_chunk, *args, w, folded, valid)
        _compare(kernel, torch_terms)
        assert (kernel[0][~valid] == 0).all() and (kernel[1][~valid] == 0).all()
        if w is not None:
            assert (kernel[2][~valid] == 0).all()


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "capped"])
def test_nonfinite_rows_and_infinite_logits(softcap):
    """NaN, +inf and all--inf rows: NaN values and G rows, as the torch backend; raw -inf entries in the
    tail (a capped head maps them to -cap, a probability the kernels must count) and on the support."""
    options, support, folded, z, ids, log_p, label_ids, weights = _setup(
        "forward_kl", "bucket", 2.0, softcap=softcap
    )
    z[2, 100] = math.nan
    z[3, 200] = math.inf
    z[5, :] = -math.inf
    z[6, 300:340] = -math.inf  # the tail's own -inf entries
    z[7, ids[7, :2]] = -math.inf  # -inf on the support
    s = _tile(z, folded)
    from fusedkd.kernels.topk_tile import topk_tile_terms_triton

    valid = torch.ones(z.shape[0], dtype=torch.bool)
    args = (s, ids, log_p, label_ids, options, support, weights, folded, valid)
    kernel = _run(topk_tile_terms_triton, *args, block_v=128)
    torch_terms = _run(_tile_chunk, *args)
    _compare(kernel, torch_terms)
    bad = [2, 3, 5] if softcap is None else [2]  # a cap maps +-inf to +-cap: still a distribution
    assert kernel[0].isnan().nonzero().view(-1).tolist() == bad
    assert torch.isfinite(kernel[2][6]).all()


def test_full_support():
    """k = V: the tail is empty (bucket gives the dense loss's divergence)."""
    options, support, folded, z, ids, log_p, label_ids, weights = _setup(
        "forward_kl", "bucket", 2.0, vocab=37, k=37
    )
    s = _tile(z, folded)
    from fusedkd.kernels.topk_tile import topk_tile_terms_triton

    args = (s, ids, log_p, label_ids, options, support, weights, folded, None)
    _compare(_run(topk_tile_terms_triton, *args, block_v=16), _run(_tile_chunk, *args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_in_the_tiles_bytes(dtype):
    """G written into the tile's own storage (`s.view(dtype)[:, :V]`) equals G into a separate buffer,
    bit for bit, over several blocks per row; G into the tile's second half is refused."""
    from fusedkd.kernels.topk_tile import topk_tile_terms_triton

    options, support, folded, z, ids, log_p, label_ids, weights = _setup(
        "reverse_kl", "bucket", 2.0, softcap=5.0
    )
    z[2, 700] = math.nan
    s = _tile(z, folded)
    valid = torch.ones(z.shape[0], dtype=torch.bool)
    valid[4] = False
    args = (ids, log_p, label_ids, options, support, weights, None, folded, valid)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        separate = torch.empty(s.shape, dtype=dtype)
        expected = topk_tile_terms_triton(s.clone(), *args, grad_out=separate, block_v=256)
        s_in = s.clone()
        in_s = s_in.view(dtype)[:, : s.shape[1]]
        got = topk_tile_terms_triton(s_in, *args, grad_out=in_s, block_v=256)
    assert got[2] is in_s
    for a, b in zip(got, expected):
        _same_nan(a, b)
        assert torch.equal(a[~a.isnan()], b[~b.isnan()])
    with pytest.raises(ValueError, match="grad_out shares a tile's memory"):
        s_bad = s.clone()
        topk_tile_terms_triton(s_bad, *args, grad_out=s_bad.view(dtype)[:, s.shape[1] :])


def _topk_inputs(dtype=torch.float32, n=37, vocab=1003, k=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, 24, generator=generator) / 24**0.5).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, 24, generator=generator) * 3).to(dtype).requires_grad_(True)
    bias = torch.randn(vocab, generator=generator).to(dtype).requires_grad_(True)
    teacher = torch.randn(n, vocab, generator=generator, dtype=torch.float64) * 3
    log_p, ids = torch.log_softmax(teacher / 2.0, dim=-1).topk(k, dim=-1)
    labels = torch.randint(0, vocab, (n,), generator=generator)
    labels[torch.rand(n, generator=generator) < 0.2] = -100
    return hidden, weight, bias, ids, log_p.float(), labels


def _loss_and_grads(hidden, weight, bias, ids, log_p, labels, grad=1.7, **options):
    for x in (hidden, weight, bias):
        x.grad = None
    out = fusedkd.fused_linear_topk_kd_loss(hidden, weight, ids, log_p, labels, student_bias=bias, **options)
    outputs = out if isinstance(out, tuple) else (out,)
    (outputs[0].sum() * grad + sum(o.sum() for o in outputs[1:])).backward()
    return [o.detach().double() for o in outputs] + [x.grad.double() for x in (hidden, weight, bias)]


@pytest.mark.parametrize(
    "options",
    [
        dict(divergence="forward_kl", tail="bucket", temperature=2.0, alpha=0.6),
        dict(divergence="reverse_kl", tail="bucket", temperature=0.7, alpha=0.3, reduction="sum"),
        dict(divergence="forward_kl", tail="renormalize", temperature=1.0, alpha=0.5, return_components=True),
        dict(divergence="reverse_kl", tail="bucket", reduction="none", student_softcap=4.0, alpha=0.8),
    ],
)
@pytest.mark.parametrize("chunk_size", [5, None])
def test_tiles_backend_matches_the_float64_reference(options, chunk_size):
    """`backend="tiles"`: every chunk's tile through the two kernels; values and gradients against the
    float64 reference (partial last chunks, an output gradient of 1.7 on the loss)."""
    from tests._helpers import reference_topk_kd_loss

    inputs = _topk_inputs()
    ours = _loss_and_grads(*inputs, backend="tiles", chunk_size=chunk_size, **options)
    hidden, weight, bias, ids, log_p, labels = inputs
    as64 = [x.detach().double().requires_grad_(True) for x in (hidden, weight, bias)]
    for x in as64:
        x.grad = None
    out = reference_topk_kd_loss(as64[0], as64[1], ids, log_p, labels, student_bias=as64[2], **options)
    outputs = out if isinstance(out, tuple) else (out,)
    (outputs[0].sum() * 1.7 + sum(o.sum() for o in outputs[1:])).backward()
    expected = [o.detach() for o in outputs] + [x.grad for x in as64]
    for i, (a, b) in enumerate(zip(ours, expected)):
        assert rel_err(a, b) <= FP32_RTOL, (i, rel_err(a, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiles_backend_with_16_bit_heads_is_as_exact_as_the_naive_recipe(dtype):
    """A 16-bit head: G in its dtype over the tile's bytes (fp16 scaled by a power of two); the error
    against float64 within a few times the naive 16-bit recipe's own."""
    from tests._helpers import reference_topk_kd_loss

    hidden, weight, bias, ids, log_p, labels = _topk_inputs(dtype)
    options = dict(divergence="forward_kl", tail="bucket", temperature=2.0, alpha=0.6)
    ours = _loss_and_grads(hidden, weight, bias, ids, log_p, labels, backend="tiles", chunk_size=7, **options)

    def reference(*tensors):
        for x in tensors[:3]:
            x.grad = None
        loss = reference_topk_kd_loss(
            tensors[0], tensors[1], ids, log_p, labels, student_bias=tensors[2], **options
        )
        (loss * 1.7).backward()
        return [loss.detach().double()] + [x.grad.double() for x in tensors[:3]]

    naive = reference(hidden, weight, bias)
    exact = reference(*[x.detach().double().requires_grad_(True) for x in (hidden, weight, bias)])
    for i, (a, b, e) in enumerate(zip(ours, naive, exact)):
        bound = max(3 * rel_err(b, e), 4 * torch.finfo(dtype).eps)
        assert rel_err(a, e) <= bound, (i, rel_err(a, e), bound)


def test_gradient_products_read_only_gs_columns():
    """A bfloat16 G written into its tile's bytes (row stride 2V): the float32 bits beside it may read as
    NaN, which torch's CPU GEMM would carry into dh (it reads a row-strided operand past its last
    column); the products equal those of a contiguous G."""
    from fusedkd.torch_backend.gemm import gradient_products

    c, vocab, hidden_dim = 30, 37, 24
    buffer = torch.randn(c, 2 * vocab).to(torch.bfloat16)
    buffer[:, vocab:] = math.nan
    grad = buffer[:, :vocab]
    hidden = torch.randn(c, hidden_dim).to(torch.bfloat16)
    weight = torch.randn(vocab, hidden_dim).to(torch.bfloat16)

    def products(g):
        grads = (torch.zeros(c, hidden_dim, dtype=torch.bfloat16), torch.empty(vocab, hidden_dim), None)
        gradient_products(g, hidden, weight, grads, slice(0, c), dtype=torch.float32)
        return grads

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the single-threaded CPU GEMM is the one that reads past the columns
    try:
        got, expected = products(grad), products(grad.contiguous())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize(
    "softcap, T, offset", [(30.0, 0.25, 0.0), (None, 2.0, -120.0)], ids=["capped-T0.25", "plain-low"]
)
def test_a_tail_of_raw_minus_inf(softcap, T, offset):
    """Every tail entry raw -inf, so that pass 1 counts no tail entry: a capped head maps them to -cap
    (e^(cap / T) would overflow at cap / T > 88), a plain one to zero probabilities (e^(-m) would
    overflow for a row maximum below -88). G as the torch backend's, finite, on rows that are
    distributions."""
    from fusedkd.kernels.topk_tile import topk_tile_terms_triton

    options, support, folded, z, ids, log_p, label_ids, weights = _setup(
        "forward_kl", "bucket", T, softcap=softcap, vocab=61, k=8
    )
    z = z + offset
    tail = torch.ones_like(z, dtype=torch.bool).scatter_(1, ids, False)
    z[2:5] = torch.where(tail[2:5], -math.inf, z[2:5])
    label_ids[2:5] = ids[2:5, 0]  # a finite cross-entropy
    s = _tile(z, folded)
    args = (s, ids, log_p, label_ids, options, support, weights, folded, None)
    kernel, torch_terms = _run(topk_tile_terms_triton, *args, block_v=16), _run(_tile_chunk, *args)
    _compare(kernel, torch_terms)
    assert torch.isfinite(kernel[2]).all()


def test_an_infinite_divergence_gives_the_torch_backends_gradient():
    """Reverse KL against a teacher log-probability of -inf on the support: D = inf, and G on the support
    is NaN on both paths (the tail's coefficient is not finite), finite elsewhere as there."""
    from fusedkd.kernels.topk_tile import topk_tile_terms_triton

    options, support, folded, z, ids, log_p, label_ids, weights = _setup("reverse_kl", "bucket", 2.0)
    log_p[3, 5] = -math.inf
    s = _tile(z, folded)
    args = (s, ids, log_p, label_ids, options, support, weights, folded, None)
    kernel, torch_terms = _run(topk_tile_terms_triton, *args, block_v=256), _run(_tile_chunk, *args)
    assert kernel[0][3] == math.inf
    _same_nan(kernel[2], torch_terms[2])


def test_the_tiles_backend_runs_the_kernels_on_tiles_only(monkeypatch):
    """backend="tiles" runs the two kernels over each chunk's tile, with chunks from `memory_budget`;
    the sparse path (renormalize, no cross-entropy: no tile) keeps its own chunks of gathered rows."""
    import fusedkd.kernels.topk_tile as topk_tile

    chunks = []
    original = topk_tile.topk_tile_terms_triton

    def spy(s, *args, **kwargs):
        chunks.append(s.shape[0])
        return original(s, *args, **kwargs)

    monkeypatch.setattr(topk_tile, "topk_tile_terms_triton", spy)
    hidden, weight, bias, ids, log_p, labels = _topk_inputs(n=300, vocab=257)
    budget = 64 * 257 * 4  # one 64-token tile
    fusedkd.fused_linear_topk_kd_loss(
        hidden, weight, ids, log_p, labels, backend="tiles", memory_budget=budget
    )
    counted = int((labels != -100).sum())
    assert chunks == [64] * (counted // 64) + ([counted % 64] if counted % 64 else [])
    chunks.clear()
    streamed = []
    from fusedkd.torch_backend import topk_kd

    stream = topk_kd.stream
    monkeypatch.setattr(
        topk_kd, "stream", lambda *a, **k: (streamed.append(a[8]), stream(*a, **k))[1]
    )  # its chunk_size
    fusedkd.fused_linear_topk_kd_loss(
        hidden, weight, ids, log_p, None, alpha=1.0, tail="renormalize", backend="tiles", memory_budget=budget
    )
    assert chunks == [] and streamed == [None]  # the sparse path sizes its own chunks


def test_ignored_tokens_computed_with_weight_zero(monkeypatch):
    """As on a GPU, ignored tokens streamed through the tiles (not compacted away): their rows count
    for nothing, values and gradients as the float64 reference."""
    from fusedkd.torch_backend import tiles as torch_tiles
    from tests._helpers import reference_topk_kd_loss

    monkeypatch.setattr(torch_tiles, "compacts_ignored", lambda device: False)
    hidden, weight, bias, ids, log_p, labels = _topk_inputs()
    options = dict(divergence="reverse_kl", tail="bucket", temperature=2.0, alpha=0.6, reduction="sum")
    ours = _loss_and_grads(hidden, weight, bias, ids, log_p, labels, backend="tiles", chunk_size=8, **options)
    as64 = [x.detach().double().requires_grad_(True) for x in (hidden, weight, bias)]
    loss = reference_topk_kd_loss(as64[0], as64[1], ids, log_p, labels, student_bias=as64[2], **options)
    (loss * 1.7).backward()
    for a, b in zip(ours, [loss.detach()] + [x.grad for x in as64]):
        assert rel_err(a, b) <= FP32_RTOL


def test_launcher_refuses_what_the_kernels_cannot_take_and_runs_an_empty_chunk():
    from fusedkd.kernels.topk_tile import topk_tile_terms_triton

    options, support, folded, z, ids, log_p, label_ids, weights = _setup("forward_kl", "bucket", 2.0, c=4)
    s = _tile(z, folded)
    args = (ids, log_p, label_ids, options, support, weights)
    with pytest.raises(TypeError, match=r"\[c, V\] float32 tile"):
        topk_tile_terms_triton(s.double(), *args)
    with pytest.raises(ValueError, match="ids and log_p must be"):
        topk_tile_terms_triton(s, ids[:3], *args[1:])
    with pytest.raises(ValueError, match="grad_out must be a"):
        topk_tile_terms_triton(s.clone(), *args, grad_out=torch.empty(4, 7))
    with pytest.raises(ValueError, match="s must have unit column stride"):
        topk_tile_terms_triton(torch.empty(s.shape[1], 4).T, *args)
    empty = topk_tile_terms_triton(
        s[:0], ids[:0], log_p[:0], label_ids[:0], options, support, tuple(w[:0] for w in weights)
    )
    assert empty[0].shape == empty[1].shape == (0,) and empty[2].shape == (0, s.shape[1])


def test_the_sparse_path_under_tiles(monkeypatch):
    """renormalize without cross-entropy under backend="tiles": the k head rows, a capped head, ignored
    tokens streamed uncompacted; values and gradients as the float64 reference."""
    from fusedkd.torch_backend import tiles as torch_tiles
    from tests._helpers import reference_topk_kd_loss

    monkeypatch.setattr(torch_tiles, "compacts_ignored", lambda device: False)
    hidden, weight, bias, ids, log_p, labels = _topk_inputs()
    options = dict(tail="renormalize", alpha=1.0, temperature=2.0, student_softcap=5.0, reduction="sum")
    ours = _loss_and_grads(hidden, weight, bias, ids, log_p, labels, backend="tiles", **options)
    as64 = [x.detach().double().requires_grad_(True) for x in (hidden, weight, bias)]
    loss = reference_topk_kd_loss(as64[0], as64[1], ids, log_p, labels, student_bias=as64[2], **options)
    (loss * 1.7).backward()
    for a, b in zip(ours, [loss.detach()] + [x.grad for x in as64]):
        assert rel_err(a, b) <= FP32_RTOL
