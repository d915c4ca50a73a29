"""Triton helpers shared by every kernel of fusedkd: logit tiles, the online log-sum-exp, logaddexp.

The one online log-sum-exp convention (docs/design.md §3), used by the fused linear kernels and the
logits-level kernels alike: a running softmax state over a set of vocabulary entries is the raw
(unscaled) maximum logit `m` and `Z = sum_v exp((x_v - m) * scale)`, where `scale` is 1/T for the
temperature softmaxes and 1 for the cross-entropy (`inv_temperature` in every kernel; the logits-level
kernels take it as a float64 argument, so that float64 rows multiply by 1/T rounded in float64).
Keeping the raw maximum means the student's T-softmax and T=1 softmax share one maximum, and
log-probabilities are formed as `(x_v - m) * scale - log Z`: relative to the row maximum, so the
likely tokens' log-probabilities stay exact even for logits of magnitude 1e4. An empty state is
(m = -inf, Z = 0) and merges as the identity: every helper treats -inf as an exact zero probability
(docs/design.md §6) and never forms exp(-inf - (-inf)): the logits-level kernels take sums relative to
`lse_shift` (the maximum, or 0 while the state is empty), the fused linear statistics floor a slice's
maximum at -FLT_MAX (`NEG_FLT_MAX`).

Non-finite logits (docs/design.md §9) need no test of their own: the maxima drop NaN (`tl.max`,
`tl.maximum`), but a NaN logit makes its e^(x - m) NaN, and a +inf one makes m = +inf and its
e^(x - m) = e^(inf - inf) NaN, so Z is NaN and so is everything formed from it; a row of -inf only
has Z = 0 and log Z = -inf, and its log-probabilities (-inf) - (-inf) are NaN. What the kernels must
not do is turn such a NaN back into a number: a term p (log-ratio) is formed as
`p * tl.where(p > 0, log-ratio, 0)`, 0 where p is exactly 0 (no 0 * inf at -inf logits) and NaN where
p is NaN (never `tl.where(p > 0, p * log-ratio, 0)`, which drops it), and `logaddexp` propagates NaN.

Where 1/T is formed: `inverse_temperature(options)` below is the one place the temperature of
`KDOptions` becomes the kernels' `inv_temperature`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from fusedkd._options import KDOptions

# Divergence codes (the kernels' DIVERGENCE constexpr).
FORWARD_KL: tl.constexpr = tl.constexpr(0)
REVERSE_KL: tl.constexpr = tl.constexpr(1)
JSD: tl.constexpr = tl.constexpr(2)

DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


def inverse_temperature(options: KDOptions) -> float:
    """The one place where the temperature T of `KDOptions` becomes the kernels' `inv_temperature` = 1/T
    (the scale of the online log-sum-exp convention above)."""
    return 1.0 / options.temperature


# The most negative float32: a floor for maxima that must stay finite (statistics.fold_statistics).
NEG_FLT_MAX: tl.constexpr = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with float32 accumulation.

    UPCAST: compute the product in float32 (bf16 tiles under Triton's interpreter, whose bf16 dot is
    wrong, docs/design.md §7). DOT_PRECISION: "ieee", "tf32x3" or "tf32" for float32 tiles (ignored by
    the hardware for bf16/fp16 tiles), from torch.get_float32_matmul_precision().
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def logits_tile(
    hidden_ptr,
    row_offsets,
    row_mask,
    stride_hidden_h,
    weight_ptr,
    cols,
    col_mask,
    stride_weight_v,
    stride_weight_h,
    bias_ptr,
    stride_bias,
    hidden_dim,
    HAS_BIAS: tl.constexpr,
    EVEN_H: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    logit_scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    WEIGHT_EVICTION: tl.constexpr = "",
):
    """[BLOCK_N, BLOCK_V] float32 logits x = head(h W^T (+ b)) of one (token block x vocab block) tile.

    The epilogue applies the model's head transform (`KDOptions`): x = logit_scale * z, then
    x = softcap * tanh(x / softcap) when HAS_SOFTCAP (`soft_cap`).

    WEIGHT_EVICTION: the L2 eviction hint of the weight tiles ("evict_first" where they are streamed,
    read by one program and not again before the L2 would have evicted them: it keeps them from
    displacing the data that is re-read soon, the parked tiles and the hidden states).

    `row_offsets` are int64 element offsets of the rows in `hidden_ptr`; masked rows and columns load
    zeros (their logits are finite; callers mask them). The loop over the hidden dimension keeps the
    K-order of every dot fixed, so the gradient kernel recomputes the very same logits.
    """
    offs_h = tl.arange(0, BLOCK_H)
    # Addresses are rebuilt from the loop's scalar offset at each step (not carried as 64-bit pointer
    # tensors through the loop, which would cost registers in every pipeline stage).
    hidden_rows = hidden_ptr + row_offsets[:, None]
    weight_cols = weight_ptr + cols.to(tl.int64)[None, :] * stride_weight_v
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for start in range(0, hidden_dim, BLOCK_H):
        h = start + offs_h
        hidden_ptrs = hidden_rows + h[None, :] * stride_hidden_h
        # The weight tile is loaded transposed, [BLOCK_H, BLOCK_V], straight from its [V, H] layout.
        weight_ptrs = weight_cols + h[:, None] * stride_weight_h
        if EVEN_H:
            x = tl.load(hidden_ptrs, mask=row_mask[:, None], other=0.0)
            w = tl.load(weight_ptrs, mask=col_mask[None, :], other=0.0, eviction_policy=WEIGHT_EVICTION)
        else:
            in_h = h < hidden_dim
            x = tl.load(hidden_ptrs, mask=row_mask[:, None] & in_h[None, :], other=0.0)
            w = tl.load(
                weight_ptrs,
                mask=in_h[:, None] & col_mask[None, :],
                other=0.0,
                eviction_policy=WEIGHT_EVICTION,
            )
        acc = dot(x, w, acc, UPCAST, DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols.to(tl.int64) * stride_bias, mask=col_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    acc = acc * logit_scale
    if HAS_SOFTCAP:
        acc = soft_cap(acc, softcap)
    return acc


@triton.jit
def tanh(x):
    """tanh(x) = 2 sigmoid(2x) - 1 (`tl` has no tanh in every version): exactly -1 and 1 at saturation
    (sigmoid(-inf) = 1 / (1 + inf) = 0), never NaN for finite or infinite x."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def accurate_tanh(u):
    """tanh(u) to a few ulps for every u (NaN for NaN, +-1 at +-inf).

    With e = e^(-2|u|) in (0, 1]: tanh |u| = (1 - e) / (1 + e), whose 1 - e cancels for small |u|
    (relative error eps e / (1 - e), 2 eps at |u| = 0.2), so below 0.2 the odd Taylor series (the first
    term left out, 1382 u^11 / 155925, is < 1e-9 relative there). (`tanh` above, 2 sigmoid(2u) - 1,
    loses the low bits of small u: c tanh(x / c) would carry an absolute error of c eps.)
    """
    au = tl.abs(u)
    e = tl.exp(-2.0 * au)
    u2 = au * au
    # tanh u = u - u^3/3 + 2 u^5/15 - 17 u^7/315 + 62 u^9/2835 - ..., in Horner form in u^2
    series = -0.05396825396825397 + u2 * 0.021869488536155203
    series = 0.13333333333333333 + u2 * series
    series = au * (1.0 + u2 * (-0.3333333333333333 + u2 * series))
    th = tl.where(au < 0.2, series, (1.0 - e) / (1.0 + e))
    return tl.where(u < 0.0, -th, th)


@triton.jit
def soft_cap(x, softcap):
    """Final-logit soft-capping (Gemma): softcap * tanh(x / softcap)."""
    return softcap * tanh(x / softcap)


@triton.jit
def head_logits(x, in_vocab, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Loaded logits through the model's head transform (scale, then `soft_cap`); entries outside the
    vocabulary (loaded as -inf) stay -inf, where the cap would make them -softcap."""
    x = x * logit_scale
    if HAS_SOFTCAP:
        x = tl.where(in_vocab, soft_cap(x, softcap), float("-inf"))
    return x


@triton.jit
def soft_cap_derivative(x, softcap):
    """The soft cap's factor of the head's chain rule, in one place for every kernel (the torch code's
    is `_options.head_chain_rule`, whose logit scale the launchers fold into the gradient weights):

        d softcap tanh(x / softcap) / dx = 1 - tanh^2(u) = 1 / cosh^2(u) = 4 e / (1 + e)^2,

    u = x / softcap, e = e^(-2|u|) in (0, 1]: no cancellation where tanh saturates (1 - tanh^2 would
    round to 0 long before it underflows), 0 when e underflows (the right limit), NaN for NaN. With
    softcap 1, the derivative of tanh at x."""
    e = tl.exp(-2.0 * tl.abs(x / softcap))
    one_plus = 1.0 + e
    return 4.0 * e / (one_plus * one_plus)


def head_arguments(options: KDOptions) -> dict:
    """Each head's transform (`KDOptions`) as the kernels take it: the logit scale a runtime float, the
    soft cap a runtime float (1.0 when absent, unused) behind a STUDENT_SOFTCAP / TEACHER_SOFTCAP
    constexpr."""
    return dict(
        student_logit_scale=options.student_logit_scale,
        student_softcap=1.0 if options.student_softcap is None else options.student_softcap,
        teacher_logit_scale=options.teacher_logit_scale,
        teacher_softcap=1.0 if options.teacher_softcap is None else options.teacher_softcap,
        STUDENT_SOFTCAP=options.student_softcap is not None,
        TEACHER_SOFTCAP=options.teacher_softcap is not None,
    )


@triton.jit
def rescale(m_old, m_new, scale):
    """exp((m_old - m_new) * scale): the factor that moves a sum from maximum m_old to m_new (0 if empty)."""
    return tl.where(m_old == float("-inf"), 0.0, tl.exp((m_old - m_new) * scale))


@triton.jit
def merge_lse(m1, z1, m2, z2, scale):
    """(m1, Z1) ⊕ (m2, Z2) = (M, Z1 e^((m1-M) s) + Z2 e^((m2-M) s)),  M = max(m1, m2)."""
    m = tl.maximum(m1, m2)
    return m, z1 * rescale(m1, m, scale) + z2 * rescale(m2, m, scale)


@triton.jit
def lse_shift(m):
    """m, or 0 where m = -inf: the shift a running state's sums are taken relative to (its maximum, or 0
    while it is empty, so that differences of shifts are finite, never -inf - (-inf), and e^(x - shift)
    is 0 at x = -inf), or any finite stand-in for a -inf reference value. NaN and +inf stay."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def shift_kl_accumulator(acc, z_w, m_w_old, m_o_old, m_w, m_o, scale):
    """Move the one-pass KL accumulator of a state to new maxima (m_w, m_o).

    A = sum_v e^(w_v - m_w) ((w_v - m_w) - (o_v - m_o)) over the state's entries, in scaled units
    (w = weighting logits, o = other logits, both times `scale`; m_o may be any finite reference
    value). With d_w = (m_w - m_w_old) * scale and d_o = (m_o - m_o_old) * scale:
    A_new = e^(-d_w) (A + Z_w (d_o - d_w)). An empty state (Z_w = 0) stays 0: its old maxima are taken
    as the new ones. Where Z_w > 0 the maxima must be finite (statistics.fold_statistics floors a
    slice's maxima at -FLT_MAX, so that no -inf - (-inf) arises for a model whose entries are all -inf
    there); the callers leave entries of weight exactly 0 out of A (no 0 * inf at -inf logits), and an
    infinite A (a term of weight > 0 against o_v = -inf) stays infinite.
    """
    nonempty = z_w > 0.0
    m_w_old = tl.where(nonempty, m_w_old, m_w)
    m_o_old = tl.where(nonempty, m_o_old, m_o)
    moved = acc + z_w * (((m_o - m_o_old) - (m_w - m_w_old)) * scale)
    return moved * tl.exp((m_w_old - m_w) * scale)


@triton.jit
def running_max(old_max, block):
    """One online log-sum-exp step over a 1-D block that may hold -inf (masked entries): the new
    running maximum M = max(m, max(block)) and the shift c that sums are taken relative to: M, or 0
    while every value so far is -inf, so that exp(x - c) and the rescale factor exp(m - c) are 0
    there, never NaN."""
    new_max = tl.maximum(old_max, tl.max(block, 0))
    return new_max, lse_shift(new_max)


@triton.jit
def logaddexp(x, y):
    """log(e^x + e^y), elementwise, for values of any magnitude; -inf where both are -inf, NaN where
    either is NaN (a NaN log-probability, from a row that is not a distribution, stays NaN).

    One exp and one log: larger + log(1 + e^(smaller - larger)).
    """
    larger = tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL)
    smaller = tl.minimum(x, y, propagate_nan=tl.PropagateNan.ALL)
    both_empty = larger == float("-inf")
    return tl.where(both_empty, larger, larger + tl.log(1.0 + tl.exp(smaller - larger)))


def token_order(ignored: torch.Tensor | None, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_index [N] int64, num_valid [1] int64): every kernel's convention for the N tokens (rows)
    that count, those not `ignored` ([N] bool; all N for None, e.g. without labels): position
    p < num_valid holds a counted token, the counted ones first and in order, the ignored ones after.
    A stable sort on the device: no host sync."""
    if ignored is None:
        return torch.arange(n, device=device), torch.full((1,), n, dtype=torch.int64, device=device)
    ignored = ignored.reshape(-1)
    token_index = torch.sort(ignored.to(torch.uint8), stable=True).indices
    return token_index, (n - ignored.sum()).reshape(1)


def label_order(labels: torch.Tensor | None, ignore_index: int, n: int, device):
    """`token_order` of the tokens whose label is not `ignore_index` (all N without labels)."""
    return token_order(None if labels is None else labels == ignore_index, n, device)


def check_grad_storage(grad_out: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None = None) -> bool:
    """For a tile kernel writing G to `grad_out`: whether it is G in the student tile's own bytes
    (`s.view(dtype)[:, :V]`, 16-bit: the kernel then walks each row left to right with a CTA barrier
    before each store, `kd_tile`); raises for any other overlap with the tiles than that or a tile
    itself, which the kernel would corrupt. `t`: the teacher's tile, None for the student's alone."""

    def span(x):  # [first, last) byte of x's elements
        last = sum((n - 1) * d for n, d in zip(x.shape, x.stride()))
        return x.data_ptr(), x.data_ptr() + x.element_size() * (last + 1)

    tiles = (s,) if t is None else (s, t)
    (g0, g1), (s0, s1) = span(grad_out), span(s)
    if all(g1 <= x0 or x1 <= g0 for x0, x1 in map(span, tiles)):
        return False  # apart from every tile
    tiles_apart = t is None or span(t)[1] <= s0 or s1 <= span(t)[0]
    layout = (grad_out.dtype, g0, grad_out.stride())
    if tiles_apart and layout in {(x.dtype, x.data_ptr(), x.stride()) for x in tiles}:
        return False  # a tile itself: G in place of it, element by element
    if tiles_apart and grad_out.element_size() == 2 and (g0, 2 * grad_out.stride(0)) == (s0, 4 * s.stride(0)):
        return True
    raise ValueError(
        "grad_out shares a tile's memory: it must be apart from both tiles, a tile itself, or the student "
        f"tile's bytes as 16 bits (s.view(torch.bfloat16)[:, :V]), the tiles apart; got {grad_out.dtype} "
        f"with strides {grad_out.stride()} over tiles with strides {[x.stride() for x in tiles]}"
    )


@triton.jit
def token_of(token_index_ptr, num_valid_ptr):
    """(token, counts) of this program's position (one program per token): `token_order`'s token at
    position `program_id(0)`, and whether it counts."""
    position = tl.program_id(0)
    return tl.load(token_index_ptr + position), position < tl.load(num_valid_ptr)


@triton.jit
def zero_row(row_ptr, num_cols, BLOCK_V: tl.constexpr):
    """Write zeros to the `num_cols` entries of one contiguous row."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, num_cols, BLOCK_V):
        offsets = start + cols
        tl.store(row_ptr + offsets, tl.zeros([BLOCK_V], row_ptr.dtype.element_ty), mask=offsets < num_cols)


@triton.jit
def park_tile(scratch, x, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Store the float32 [BLOCK_N, BLOCK_V] tile `x` row-major in the program's own scratch (64 KiB at
    128 x 128; L2-resident), freeing the registers it held for the next dot; `unpark_tile` reads it
    back, whole or by column slices. This is how one program computes the teacher's and the
    student's logit tiles with one accumulator in registers at a time, and then works on them a
    slice at a time, so that the tiles can be twice as large (docs/design.md §5, kernels/config.py).

    The barrier first: the threads still reading the previous parked tile are done with it."""
    offsets = tl.arange(0, BLOCK_N)[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :]
    tl.debug_barrier()
    tl.store(scratch + offsets, x)


@triton.jit
def unpark_tile(scratch, first_col, row_stride, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Columns [first_col, first_col + BLOCK_V) of a tile `park_tile` stored with `row_stride` columns.

    The compiler lays loads out over the threads independently of the store: the barrier makes every
    thread's stores visible to the whole program first."""
    offsets = tl.arange(0, BLOCK_N)[:, None] * row_stride + (first_col + tl.arange(0, BLOCK_V))[None, :]
    tl.debug_barrier()
    return tl.load(scratch + offsets)


@triton.jit
def round_to_bfloat16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), still float32: the GPU's fp32 -> bf16
    conversion. Triton's interpreter truncates instead (`cast_impl` with no rounding mode), so under it
    (kd_tile.py's ROUND_BF16) the kernel rounds first and the cast is exact. NaN stays NaN, overflow
    becomes inf."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def store_gradient(g_row, v, g, mask, ROUND_BF16: tl.constexpr, G_IN_S: tl.constexpr):
    """The tile kernels' last step: a block of G stored at columns `v` of its row `g_row`, cast to G's
    dtype (rounded to bfloat16 first under the interpreter, `ROUND_BF16`, whose cast truncates); with
    G in the student tile's own bytes (`G_IN_S`), after a CTA barrier: every thread's loads of the
    blocks this store covers are done first (kd_tile.py's docstring)."""
    if ROUND_BF16:
        g = round_to_bfloat16(g)
    if G_IN_S:
        tl.debug_barrier()
    tl.store(g_row + v, g.to(g_row.dtype.element_ty), mask=mask)
