"""The head transform's building blocks: `fusedkd.head_transform` on transformers configs, the Triton
soft cap (tanh as 2 sigmoid(2x) - 1, and the tile kernel's `accurate_tanh`) and the chain rule's cap
derivative (Triton's and torch's) against float64, saturation included.
The losses' exactness with scaled and capped heads is in test_contract.py."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import _triton_skip_reason

import fusedkd

# The interpreter's sigmoid evaluates exp(-x) = inf for very negative x, as intended (1 / (1 + inf) = 0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

# Arguments from 0 to far past saturation (tanh(x) rounds to 1 in float32 from |x| ~ 9, and its
# derivative underflows float32 from |x| ~ 52), and the infinities a masked logit can be.
EXTREMES = [0.0, 1e-6, 0.3, 1.0, 4.0, 9.0, 20.0, 45.0, 60.0, 1e4, 3e38, math.inf]


if _triton_skip_reason() is None:
    import triton
    import triton.language as tl

    from fusedkd.kernels.tl_utils import accurate_tanh, soft_cap, soft_cap_derivative

    @triton.jit
    def cap_kernel(x_ptr, cap_ptr, accurate_ptr, derivative_ptr, n, softcap, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        tl.store(cap_ptr + offsets, soft_cap(x, softcap), mask=mask)
        tl.store(accurate_ptr + offsets, softcap * accurate_tanh(x / softcap), mask=mask)
        tl.store(derivative_ptr + offsets, soft_cap_derivative(x, softcap), mask=mask)


def _check_derivative(derivative: torch.Tensor, exact_derivative: torch.Tensor) -> None:
    """float32's relative precision, also where 1 - tanh^2 would cancel to 0, down to its underflow
    (then exactly 0)."""
    assert not derivative.isnan().any()
    representable = exact_derivative > 1e-30
    rel = ((derivative.double() - exact_derivative).abs() / exact_derivative)[representable]
    assert rel.max() <= 1e-5
    assert (derivative.double()[~representable] <= 1e-30).all()


@pytest.mark.skipif(_triton_skip_reason() is not None, reason=str(_triton_skip_reason()))
def test_triton_soft_cap_and_derivative_match_float64_at_saturation():
    softcap = 30.0
    x = torch.tensor([s * v * softcap for v in EXTREMES for s in (1.0, -1.0)], dtype=torch.float32)
    capped, accurate, derivative = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    cap_kernel[(1,)](x, capped, accurate, derivative, x.numel(), softcap, BLOCK=64)
    exact = softcap * torch.tanh(x.double() / softcap)
    exact_derivative = 1.0 / torch.cosh(x.double() / softcap) ** 2
    assert torch.isfinite(capped).all() and torch.isfinite(accurate).all()
    # The cap to float32's absolute resolution of values of size `softcap`; `accurate_tanh` (the tile
    # kernel's) to a few ulps relative, small arguments included.
    assert (capped.double() - exact).abs().max() <= 4 * torch.finfo(torch.float32).eps * softcap
    nonzero = exact != 0
    assert (accurate == 0)[~nonzero].all()
    assert ((accurate.double() - exact).abs() / exact.abs())[nonzero].max() <= 4 * torch.finfo(
        torch.float32
    ).eps
    _check_derivative(derivative, exact_derivative)
    assert (capped[x == math.inf] == softcap).all() and (capped[x == -math.inf] == -softcap).all()


def test_torch_head_chain_rule_matches_float64_at_saturation():
    """`_options.head_chain_rule`: the scale into the gradient weights, the cap's derivative from a tile
    holding `folded` z, as the kernels' `soft_cap_derivative`."""
    from fusedkd._options import head_chain_rule

    scale, softcap, folded = 3.0, 30.0, 0.1  # the tile holds folded * z; tanh's argument is scale z / c
    z = torch.tensor([s * v * softcap / scale for v in EXTREMES for s in (1.0, -1.0)], dtype=torch.float64)
    tile = (folded * z).float()
    w_distill, w_ce = torch.tensor([0.5, -2.0]), torch.tensor([1.5, 0.25])
    head = fusedkd.HeadTransform(scale, softcap)
    out = torch.empty_like(tile)
    got_distill, got_ce, derivative = head_chain_rule(head, w_distill, w_ce, tile, folded, out)
    assert derivative is out
    assert torch.equal(got_distill, w_distill * scale) and torch.equal(got_ce, w_ce * scale)
    _check_derivative(derivative, 1.0 / torch.cosh(tile.double() / folded * scale / softcap) ** 2)
    # No cap: no derivative; a scale of 1: the weights as given.
    assert head_chain_rule(fusedkd.HeadTransform(scale), w_distill, None, tile)[1:] == (None, None)
    same = head_chain_rule(fusedkd.HeadTransform(1.0, softcap), w_distill, w_ce)
    assert same[0] is w_distill and same[1] is w_ce and same[2] is None


@pytest.mark.parametrize(
    "attributes,expected",
    [
        (dict(), fusedkd.HeadTransform()),
        (dict(logit_scale=0.0625), fusedkd.HeadTransform(0.0625)),
        (dict(logits_scaling=8.0), fusedkd.HeadTransform(0.125)),
        (dict(final_logit_softcapping=30.0), fusedkd.HeadTransform(1.0, 30.0)),
        (dict(final_logit_softcapping=None, logit_scale=None), fusedkd.HeadTransform()),
        (dict(logit_scale=2.0, final_logit_softcapping=30.0), fusedkd.HeadTransform(2.0, 30.0)),
        (dict(output_multiplier=1.0, lm_head_multiplier=1), fusedkd.HeadTransform()),
    ],
)
def test_head_transform_reads_a_config(attributes, expected):
    transformers = pytest.importorskip("transformers", reason="the train extra is not installed")
    config = transformers.PretrainedConfig(**attributes)
    transform = fusedkd.head_transform(config)
    assert transform == expected
    assert transform.options("teacher") == {
        "teacher_logit_scale": expected.logit_scale,
        "teacher_softcap": expected.softcap,
    }
    z = torch.randn(5, 7, dtype=torch.float64) * 50
    reference = z * expected.logit_scale
    if expected.softcap is not None:
        reference = expected.softcap * torch.tanh(reference / expected.softcap)
    assert torch.equal(transform(z), reference)


@pytest.mark.parametrize(
    "attributes,message",
    [
        (dict(logits_scaling=0.0), "config.logits_scaling must be finite and > 0"),
        (dict(logit_scale="2"), "config.logit_scale must be a positive float"),
        (
            dict(final_logit_softcapping=-30.0),
            "config.final_logit_softcapping must be None or finite and > 0",
        ),
        (dict(output_multiplier=2.0), "output_multiplier=2.0, a head multiplier fusedkd does not apply"),
        (dict(lm_head_multiplier=0.5), "lm_head_multiplier=0.5"),
        (dict(logits_scaling=1e-320), r"config.logits_scaling must be in \[1e-06, 1e\+06\]"),
    ],
)
def test_head_transform_refuses_what_it_does_not_model(attributes, message):
    transformers = pytest.importorskip("transformers", reason="the train extra is not installed")
    with pytest.raises((ValueError, TypeError), match=message):
        fusedkd.head_transform(transformers.PretrainedConfig(**attributes))
    with pytest.raises(ValueError, match="role must be 'student' or 'teacher'"):
        fusedkd.HeadTransform().options("both")


def test_head_transform_refuses_a_config_class_and_non_tensors():
    transformers = pytest.importorskip("transformers", reason="the train extra is not installed")
    with pytest.raises(TypeError, match="not the class Gemma2Config: make one"):
        fusedkd.head_transform(transformers.Gemma2Config)
    for head in (fusedkd.HeadTransform(), fusedkd.HeadTransform(2.0, 30.0)):
        with pytest.raises(TypeError, match="applies to a torch.Tensor of projections, got list"):
            head([1.0, 2.0])
