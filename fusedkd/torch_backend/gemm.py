"""The GEMMs of the token-chunked losses: a chunk's logit tile, and its gradient products.

Per chunk of `c` tokens, `project` computes a `c x V` logit tile on the GEMM (16-bit heads: into a
float32 tile, unrounded, on CUDA), and `gradient_products` multiplies the chunk's G = dloss/dlogits into
the student's gradients: dh = G W_s, dW_s += G^T h_s, db_s += sum G; a 16-bit G (the tiles backend's,
in the weight's dtype) as 16-bit GEMMs accumulated in float32.
"""

from __future__ import annotations

import math

import torch


def _nonfinite_rows(a: torch.Tensor) -> torch.Tensor | None:
    """The rows of `a` holding a NaN or inf when `a` is the left operand that torch's CPU bfloat16 GEMM
    mishandles, else None.

    With an odd inner dimension, torch 2.13's CPU bfloat16 GEMM (measured; float16 and float32 are
    not affected) makes a row's product NaN when the row after it holds a NaN or inf: the neighbouring
    token's logits or hidden-state gradient would be NaN, where only the poisoned token's may be
    (docs/design.md §9). One `isfinite` pass over `a` finds such rows; the callers multiply them as zeros
    and set their products to NaN, which is what a non-finite row of hidden states (its logits row is
    not a distribution) or of G (a row the rule filled with NaN) leads to anyway."""
    if a.device.type != "cpu" or a.dtype != torch.bfloat16 or a.shape[-1] % 2 == 0 or a.numel() == 0:
        return None
    bad = ~torch.isfinite(a).all(-1)
    return bad if bool(bad.any()) else None


def _zero_nonfinite_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(`a` with `_nonfinite_rows`' rows zeroed, those rows or None): the caller's product is computed
    from the first and has the second's rows set to NaN."""
    bad = _nonfinite_rows(a)
    return (a if bad is None else a.masked_fill(bad[:, None], 0)), bad


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (into `out`), with `_nonfinite_rows`' rows of `a` NaN rows of the product."""
    a, bad = _zero_nonfinite_rows(a)
    product = torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    if bad is not None:
        product[bad] = math.nan
    return product


def mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of two 16-bit matrices as float32: on CUDA a 16-bit GEMM whose float32 accumulator is
    written out as is (cuBLAS, ``out_dtype``); where that is not available, the 16-bit product, rounded
    once to 16 bits, in float32."""
    if a.is_cuda and _FLOAT32_OUT.get("mm", True):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError):  # an older torch, or no such kernel
            _FLOAT32_OUT["mm"] = False
    return _mm(a, b).float()


def accumulate_float32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, first: bool) -> None:
    """``out = a @ b`` (`first`) or ``out += a @ b``: 16-bit a, b into a float32 `out`. On CUDA one GEMM
    whose float32 accumulator is added to `out` in place (cuBLAS, beta = 1: no product tensor); where
    that is not available, by blocks of WEIGHT_ROWS rows of `out` (`mm_float32`), so that the float32
    products stay small."""
    if a.is_cuda and _FLOAT32_OUT.get("addmm", True):
        try:
            torch.addmm(out, a, b, beta=0.0 if first else 1.0, out_dtype=torch.float32, out=out)
            return
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError):  # an older torch, or no such kernel
            _FLOAT32_OUT["addmm"] = False
    for row in range(0, out.shape[0], WEIGHT_ROWS):
        block = slice(row, min(out.shape[0], row + WEIGHT_ROWS))
        product = mm_float32(a[block], b)
        if first:
            out[block].copy_(product)
        else:
            out[block].add_(product)


# Which float32-output GEMMs this torch offers on the device (tried once, then remembered).
_FLOAT32_OUT: dict[str, bool] = {}
# Vocabulary rows per weight-gradient GEMM of a 16-bit G without an in-place float32 GEMM (its float32
# product: 64 MiB at H_s = 1024).
WEIGHT_ROWS = 16384


def project(
    out: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float = 1.0,
) -> torch.Tensor:
    """out <- scale * (hidden @ weight.T + bias): a logit tile in the compute dtype; the scale rides in
    the GEMM (alpha, beta). 16-bit inputs into a float32 tile: on CUDA one GEMM whose float32 result is
    the tile (cuBLAS, ``out_dtype``: the logits unrounded, as the fused kernels keep them, and no copy);
    elsewhere the GEMM's result is rounded to the inputs' dtype (as torch.nn.functional.linear) and
    copied into the tile."""
    clean, bad = _zero_nonfinite_rows(hidden)
    if bad is not None:  # torch's CPU bfloat16 GEMM would spread them to their neighbours' logits
        project(out, clean, weight, bias, scale)
        out[bad] = math.nan
        return out
    direct = weight.dtype == out.dtype
    sixteen_bit = hidden.dtype == weight.dtype and weight.element_size() == 2 and out.dtype == torch.float32
    if sixteen_bit and hidden.is_cuda and _FLOAT32_OUT.get("project", True):
        added = out if bias is None else bias.float()  # beta = 0 ignores `out`'s old contents
        try:
            return torch.addmm(
                added, hidden, weight.T, beta=0.0 if bias is None else scale, alpha=scale,
                out_dtype=torch.float32, out=out,
            )  # fmt: skip
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError):  # an older torch, or no such kernel
            _FLOAT32_OUT["project"] = False
    if bias is not None:
        if direct:
            return torch.addmm(bias, hidden, weight.T, beta=scale, alpha=scale, out=out)
        return out.copy_(torch.addmm(bias, hidden, weight.T, beta=scale, alpha=scale))
    if scale != 1.0:
        if direct:  # beta = 0: addmm ignores `out`'s old contents
            return torch.addmm(out, hidden, weight.T, beta=0.0, alpha=scale, out=out)
        return out.copy_(torch.addmm(hidden.new_zeros(()), hidden, weight.T, beta=0.0, alpha=scale))
    if direct:
        return torch.mm(hidden, weight.T, out=out)
    return out.copy_(hidden @ weight.T)


def gradient_products(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    rows: slice,
    *,
    dtype: torch.dtype,
    g_scale: float | None = None,
) -> None:
    """One chunk's G [c, V] into the student's gradients `grads` = (grad_hidden [N, H] in the input
    dtype, grad_weight [V, H] and grad_bias [V] or None in the compute `dtype`): grad_hidden[rows] = G W,
    grad_weight += G^T h (written, not added, for the first chunk, ``rows.start == 0``), grad_bias +=
    sum G. A 16-bit G runs 16-bit GEMMs with float32 results (`mm_float32`, `accumulate_float32`); an
    fp16 G multiplied by the power of two `g_scale` has it divided out of dh here (of dW and db by the
    caller, once, after the last chunk)."""
    grad_hidden, grad_weight, grad_bias = grads
    first = rows.start == 0
    if grad.device.type == "cpu" and grad.dtype == torch.bfloat16 and not grad.is_contiguous():
        # torch's CPU bfloat16 GEMM reads a row-strided operand past its last column (times zeros:
        # harmless, except that a NaN there, such as the float32 bits next to a G written into its
        # tile's bytes, comes out as NaN). Measured with torch 2.13; cuBLAS keeps to the columns.
        grad = grad.contiguous()
    if g_scale is not None:
        grad_hidden[rows] = (mm_float32(grad, weight) / g_scale).to(grad_hidden.dtype)
    elif weight.dtype == grad.dtype:
        _mm(grad, weight, out=grad_hidden[rows])
    else:
        grad_hidden[rows] = _mm(grad.to(weight.dtype), weight)
    if grad.dtype == dtype:
        if first:
            torch.mm(grad.T, hidden.to(dtype), out=grad_weight)
        else:
            grad_weight.addmm_(grad.T, hidden.to(dtype))
    else:  # a 16-bit G: 16-bit GEMMs accumulated into the float32 weight gradient
        accumulate_float32(grad_weight, grad.T, hidden, first=first)
    if grad_bias is not None:
        grad_bias.add_(grad.sum(0, dtype=dtype))
