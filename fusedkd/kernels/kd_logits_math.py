"""Triton helpers of the logits-level KD kernels: the online log-sum-exp step and a NaN-free logaddexp.

Every helper treats `-inf` as an exact zero probability (DESIGN.md §6): a block of padded or masked
vocabulary entries contributes nothing, and no `exp(-inf - (-inf))` ever produces a NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def running_max(old_max, block):
    """One online log-sum-exp step (DESIGN.md §3): the new running max M = max(m, max(block)), and the
    shift c that sums are taken relative to: M, or 0 while every value so far is -inf, so that
    exp(x - c) and the rescale factor exp(m - c) are 0 there, never NaN."""
    new_max = tl.maximum(old_max, tl.max(block, 0))
    return new_max, tl.where(new_max == float("-inf"), 0.0, new_max)


@triton.jit
def logaddexp(x, y):
    """log(e^x + e^y), elementwise; -inf where both are -inf."""
    larger = tl.maximum(x, y)
    shift = tl.where(larger == float("-inf"), 0.0, larger)
    return shift + tl.log(tl.exp(x - shift) + tl.exp(y - shift))


@triton.jit
def zero_row(row_ptr, num_cols, BLOCK_V: tl.constexpr):
    """Write zeros to the `num_cols` entries of one contiguous row."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, num_cols, BLOCK_V):
        offsets = start + cols
        tl.store(row_ptr + offsets, tl.zeros([BLOCK_V], row_ptr.dtype.element_ty), mask=offsets < num_cols)
