"""The tiles backend (`backend="tiles"`): per chunk of tokens, both logit tiles on the GEMM and one
Triton pass (`fusedkd.kernels.kd_tile`) over them; and the rule of `backend="auto"` (`fusedkd._dispatch`).

Under the interpreter on a CPU the GEMMs are torch's and the kernel runs in Triton's interpreter; the
results must match the float64 reference like every backend's (`tests/test_contract.py`, the property
test and the non-finite cases run it too).
"""

from __future__ import annotations

import pytest
import torch

import fusedkd
from fusedkd import _dispatch, kernels, reference
from tests._helpers import DEVICE, FP32_RTOL, as_float64, assert_close, make_case, rel_err, run_loss

# The interpreter evaluates `-inf - -inf`, `x / 0` and `log(0)` in masked lanes and in rows the rule
# fills with NaN, whose results are discarded.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

TRITON = pytest.mark.skipif(kernels.unavailable_reason(DEVICE) is not None, reason="Triton cannot run here")


def tiles(**fixed):
    def fn(*args, **kwargs):
        return fusedkd.fused_linear_kd_loss(*args, backend="tiles", **fixed, **kwargs)

    return fn


@TRITON
@pytest.mark.parametrize(
    "options",
    [
        dict(divergence="forward_kl", temperature=2.0, alpha=0.6),
        dict(divergence="reverse_kl", temperature=0.7, alpha=0.3, reduction="sum"),
        dict(divergence="jsd", beta=0.3, temperature=1.5, alpha=0.8, return_components=True),
        dict(divergence="forward_kl", reduction="none", student_softcap=4.0, teacher_logit_scale=0.5),
        dict(divergence="jsd", beta=0.7, alpha=1.0, return_components=True, reduction="none"),
    ],
)
@pytest.mark.parametrize("chunk_size", [5, None])
def test_tiles_match_the_float64_reference(options, chunk_size):
    """Partial last chunks (5 tokens a chunk over 37) and one chunk; values and every gradient, for an
    output gradient of 1 (the gradient formed in the forward) and for "none" / components (recomputed)."""
    case = make_case(bias=True, teacher="peaked" if options["divergence"] == "reverse_kl" else "random")
    values, grads = run_loss(tiles(chunk_size=chunk_size), case, **options)
    ref_values, ref_grads = run_loss(reference.fused_linear_kd_loss, as_float64(case), **options)
    assert_close(values, ref_values, FP32_RTOL, "values")
    assert_close(grads, ref_grads, FP32_RTOL, "grads")


@TRITON
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_tiles_with_16_bit_heads_are_as_exact_as_the_naive_recipe(divergence, dtype, monkeypatch):
    """16-bit heads: G is written in their dtype over the student's tile (fp16 scaled by a power of
    two) and both gradient products are 16-bit GEMMs (the weight's accumulated into float32, here by
    blocks of 300 vocabulary rows). The error against float64 stays within a few times the naive
    16-bit recipe's own (which rounds its logits, softmax and gradients to 16 bits)."""
    from fusedkd.torch_backend import gemm

    monkeypatch.setattr(gemm, "WEIGHT_ROWS", 300)
    case = make_case(dtype=dtype, logit_scale=0.5)
    options = dict(divergence=divergence, temperature=2.0, alpha=0.5)
    values, grads = run_loss(tiles(chunk_size=7), case, **options)
    naive_values, naive_grads = run_loss(reference.fused_linear_kd_loss, case, **options)
    exact_values, exact_grads = run_loss(reference.fused_linear_kd_loss, as_float64(case), **options)
    for ours, naive, exact, what in zip(
        values + grads, naive_values + naive_grads, exact_values + exact_grads, "lhwb"
    ):
        bound = max(3 * rel_err(naive, exact), 4 * torch.finfo(dtype).eps)
        assert rel_err(ours, exact) <= bound, what


def test_auto_rule(monkeypatch):
    """auto: tiles on CUDA when a 256-token chunk fits the budget, else the fused kernels (the top-k loss:
    the PyTorch backend); torch on a CPU and for float64; "tiles" refused by the loss that has no logit
    tiles to make, "triton" by the one without fused kernels."""
    monkeypatch.setattr(kernels, "unavailable_reason", lambda device: None)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _dispatch.resolve_backend("auto", cuda, torch.bfloat16, has_tiles=True) == "tiles"
    assert (
        _dispatch.resolve_backend("auto", cuda, torch.bfloat16, has_tiles=True, tiles_fit=False) == "triton"
    )
    assert _dispatch.resolve_backend("auto", cuda, torch.bfloat16) == "triton"  # kd_loss: no tiles to make
    assert _dispatch.resolve_backend("auto", cuda, torch.float64, has_tiles=True) == "torch"
    assert _dispatch.resolve_backend("auto", cpu, torch.float32, has_tiles=True) == "torch"
    # The default budget gives 1,024-token chunks at Qwen3's vocabulary (two float32 tiles, G over one).
    assert _dispatch.tiles_chunk_size(151_936, None) == 1024
    assert _dispatch.tiles_chunk_size(151_936, 2**28) < _dispatch.MIN_TILES_CHUNK
    with pytest.raises(ValueError, match=r"kd_loss \(KDLoss\) has no logit tiles to make"):
        fusedkd.kd_loss(torch.randn(3, 9), torch.randn(3, 9), torch.tensor([1, 2, 3]), backend="tiles")
    # The top-k loss: a tile path (one tile: twice the dense loss's chunk) and no fused kernels, so auto
    # takes the tiles on CUDA when they fit and the PyTorch backend when they do not.
    assert _dispatch.tiles_chunk_size(151_936, None, _dispatch.TOPK_TILES_BYTES_PER_ENTRY) == 2048
    topk = dict(has_triton=False, has_tiles=True)
    assert _dispatch.resolve_backend("auto", cuda, torch.bfloat16, **topk) == "tiles"
    assert _dispatch.resolve_backend("auto", cuda, torch.bfloat16, **topk, tiles_fit=False) == "torch"
    with pytest.raises(
        ValueError, match=r"fused_linear_topk_kd_loss \(FusedLinearTopKKDLoss\) has no fused Triton kernels"
    ):
        fusedkd.FusedLinearTopKKDLoss(backend="triton")
    # float64 stays on torch: "tiles" refuses it up front, for both losses that have tiles.
    h, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    labels, ids = torch.randint(0, 20, (5,)), torch.arange(3).repeat(5, 1)
    with pytest.raises(TypeError, match="backend='tiles' takes float32, bfloat16 or float16 inputs"):
        fusedkd.fused_linear_kd_loss(h, w, h, w, labels, backend="tiles")
    with pytest.raises(TypeError, match="backend='tiles' takes float32, bfloat16 or float16 inputs"):
        fusedkd.fused_linear_topk_kd_loss(h, w, ids, torch.full((5, 3), -2.0), labels, backend="tiles")
    with pytest.raises(ValueError, match="memory_budget must be a positive int"):
        fusedkd.FusedLinearKDLoss(memory_budget=0)
