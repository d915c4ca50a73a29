"""Tile arithmetic shared by the PyTorch backend's losses: chunk sizes, logit tiles, the per-row
divergence, cross-entropy and gradient of a tile, and the tokens that count.

The PyTorch backend (backend="torch") is token-chunked, exact, for CPUs and any device. Each chunk of
`c` tokens computes its `c x V` logit tiles once, into buffers allocated once per call, in the compute
dtype (float32, or float64 for float64 inputs). It derives the per-token divergence and cross-entropy
and, when a gradient is wanted, the tile of G = dloss/dlogits (docs/design.md §4) in place of a logit tile;
G is multiplied straight into the student's gradients. No tensor with N*V elements is ever allocated.

On a CPU, where matmul throughput rather than memory bandwidth is the bottleneck, computing each tile
once (no recomputation) is the fast choice (docs/design.md §5). Two things decide the rest of the time there:

- Large chunks. Every chunk streams both heads through the cache and makes a rank-c update of the
  V x H student weight gradient, so the GEMMs run near peak only when c is a hundred tokens or more
  (`LINEAR_TILE_BYTES`).
- No fresh `c x V` allocations, and element-wise passes that stay in the cache. A freshly allocated
  tile of tens of MB costs the kernel its page faults, more than the element-wise pass that fills it;
  the arithmetic therefore runs in place in the two reused tiles, a few rows at a time
  (`GROUP_BYTES`), with up to four small reused scratch blocks of those rows (the fourth only for a
  soft-capped student).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from fusedkd._options import KDOptions, head_chain_rule, head_factors

# Default working-set target of the logits-level loss, `teacher_topk` and the gathered-rows path of
# the sparse top-k loss: one `chunk x V` compute-dtype tile (or a `chunk x k x H` input-dtype tile of
# gathered head rows) of about 32 MiB.
TILE_BYTES = 32 * 2**20
# The fused linear losses (dense: student and teacher tiles; top-k: a student tile) run two or three
# GEMMs per chunk and a rank-chunk update of the weight gradient, whose efficiency grows with the
# chunk: tiles of 64 MiB.
LINEAR_TILE_BYTES = 64 * 2**20
# On a CPU the element-wise passes work on groups of rows of about this many bytes per tile, so the
# ~15 passes over a group run in the cache rather than the ~15 passes over the whole tile in memory.
GROUP_BYTES = 2 * 2**20
MIN_CHUNK, MAX_CHUNK = 8, 4096


def default_chunk_size(vocab_size: int, element_size: int = 4, tile_bytes: int | None = None) -> int:
    """Tokens per chunk: a `chunk x vocab_size` tile of `element_size` bytes is about `tile_bytes`
    (default `TILE_BYTES`), within [MIN_CHUNK, MAX_CHUNK]."""
    chunk = (TILE_BYTES if tile_bytes is None else tile_bytes) // max(1, vocab_size * element_size)
    return int(min(MAX_CHUNK, max(MIN_CHUNK, chunk)))


class Scratch:
    """Reusable element-wise scratch of one loss call: blocks of `rows` x `vocab`, made lazily.

    `rows` is the row-group size of `kd_tile_terms`: a few rows on a CPU (so a group stays in the
    cache), the whole chunk on other devices (where each pass is one kernel launch).
    """

    # Blocks 0-2: the divergences' arithmetic; block 3: the student's soft-cap derivative (made only
    # when the student's head is soft-capped).
    BLOCKS = 4

    def __init__(
        self,
        chunk: int,
        vocab: int,
        dtype: torch.dtype,
        device: torch.device,
        group_bytes: int | None = None,
    ):
        group_bytes = GROUP_BYTES if group_bytes is None else group_bytes
        self.rows = max(1, min(self.group_rows(chunk, vocab, dtype, device, group_bytes), chunk))
        self.vocab, self.dtype, self.device = vocab, dtype, device
        self._blocks: list[torch.Tensor | None] = [None] * self.BLOCKS

    @staticmethod
    def group_rows(chunk: int, vocab: int, dtype: torch.dtype, device: torch.device, group_bytes: int) -> int:
        if device.type != "cpu":
            return chunk
        return group_bytes // max(1, vocab * (torch.finfo(dtype).bits // 8))

    def groups(self, count: int) -> Iterator[slice]:
        """The row groups of a tile of `count` rows."""
        for start in range(0, count, self.rows):
            yield slice(start, min(count, start + self.rows))

    def block(self, index: int, rows: int) -> torch.Tensor:
        if self._blocks[index] is None:
            self._blocks[index] = torch.empty(self.rows, self.vocab, dtype=self.dtype, device=self.device)
        return self._blocks[index][:rows]


def gemm_scales(options: KDOptions, *, temper_teacher: bool) -> tuple[float, float]:
    """The scales a fused linear loss folds into its student and teacher GEMMs (`gemm.project`).

    Each tile then holds the argument of the head's last step, which `kd_tile_terms` finishes in place:
    `scale / softcap` for a soft-capped head (tanh's argument), else `scale` (the student) and
    `scale / T` (the teacher, when `temper_teacher`: its tile is then t / T, `teacher_tempered`).
    """
    student = options.student_logit_scale
    if options.student_softcap is not None:
        student /= options.student_softcap
    teacher = options.teacher_logit_scale
    if options.teacher_softcap is not None:
        teacher /= options.teacher_softcap
    elif temper_teacher:
        teacher /= options.temperature
    return student, teacher


def finish_head(
    x: torch.Tensor, folded: float, logit_scale: float, softcap: float | None, divisor: float
) -> None:
    """In place: `x` = folded * z (z = W h + b) becomes head(z) / divisor, with head(z) = scale z, then
    softcap tanh(. / softcap) when capped. Its chain rule: `_options.head_chain_rule`, on the tile
    before this call."""
    mult, cap_mult = head_factors(logit_scale, softcap, folded, divisor)
    if mult != 1.0:
        x.mul_(mult)
    if softcap is not None:
        x.tanh_().mul_(cap_mult)


def grad_tile(options: KDOptions, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Which of the two logit tiles `kd_tile_terms` overwrites with G."""
    return s if options.divergence == "forward_kl" else t


def kd_tile_terms(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    options: KDOptions,
    grad_weights: tuple[torch.Tensor, torch.Tensor | None] | None,
    *,
    teacher_tempered: bool = False,
    scratch: Scratch | None = None,
    folded: tuple[float, float] = (1.0, 1.0),
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk of rows: (divergence [c], ce [c], G [c, V] or None), from logit tiles it overwrites.

    Shared by the fused linear loss (after its two logit GEMMs) and the logits-level loss.
    `folded`: the factors the student and teacher tiles already carry, relative to the projections
    z = W h + b (the fused linear loss folds `gemm_scales` into its GEMMs; kd_loss's tiles are the
    caller's logits, (1, 1)); each model's head transform (logit scale, soft cap) is finished here.
    `teacher_tempered`: the teacher's tile is to become t / T here (with the fused linear loss's
    `gemm_scales(temper_teacher=True)`), not t.
    G, when wanted, is written over `grad_tile(options, s, t)` and returned.

    `s`, `t` are [c, V] tiles in the compute dtype; `labels` are safe (ignored rows hold any valid id,
    their weights are 0). `grad_weights` = (w_distill [c], w_ce [c] or None): G = w_distill dD/ds +
    w_ce dC/ds (docs/design.md §4). The rows are processed in groups of `scratch.rows`.
    `valid` ([c] bool, or None when every row counts): rows that do not count get 0 and a zero G row,
    whatever their logits hold; a counted row that is not a distribution gets NaN (§9).
    """
    c, vocab = s.shape
    if scratch is None:
        scratch = Scratch(c, vocab, s.dtype, s.device)
    divergence = s.new_empty(c)
    ce = s.new_empty(c)
    for rows in scratch.groups(c):
        _group_terms(
            s[rows],
            t[rows],
            select_rows(labels, rows),
            options,
            select_rows(grad_weights, rows),
            teacher_tempered,
            scratch,
            divergence[rows],
            ce[rows],
            folded,
            select_rows(valid, rows),
        )
    return divergence, ce, None if grad_weights is None else grad_tile(options, s, t)


def select_rows(x, rows: slice):
    """`x[rows]` for a tensor, for each tensor of a tuple (None entries stay None), or None."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(None if w is None else w[rows] for w in x)
    return x[rows]


def _group_terms(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    options: KDOptions,
    grad_weights: tuple[torch.Tensor, torch.Tensor | None] | None,
    teacher_tempered: bool,
    scratch: Scratch,
    divergence_out: torch.Tensor,
    ce_out: torch.Tensor,
    folded: tuple[float, float],
    valid: torch.Tensor | None,
) -> None:
    """`kd_tile_terms` on one group of rows, in place: few passes, no allocation of the group's size.

    With a = (s - max s) / T and b = (t - max t) / T (both <= 0), Eq = exp(a), Ep = exp(b), Zq, Zp
    their row sums, q = Eq / Zq and p = Ep / Zp. Logits of -inf are tokens of probability 0: a term
    whose weight is 0 is 0 even where its log-ratio is infinite or NaN (`nansum`, or
    `_zero_where_unweighted` where the log-ratio is reused for the gradient).
    """
    T = options.temperature
    n = s.shape[0]
    want_grad = grad_weights is not None
    w_distill, w_ce = grad_weights if want_grad else (None, None)
    want_ce_grad = want_grad and labels is not None and w_ce is not None
    rows = torch.arange(n, device=s.device)

    # Each head's transform: s = scale_s z_s, capped; t likewise (docs/design.md §2). The student's chain
    # rule (`head_chain_rule`): the scale into the per-row gradient weights, a soft cap's derivative
    # 1 - tanh^2 into a block of the group, from the tile before `finish_head` overwrites it.
    cap_derivative = None
    if want_grad:
        out = scratch.block(3, n) if options.student_softcap is not None else None
        w_distill, w_ce, cap_derivative = head_chain_rule(
            options.student_head, w_distill, w_ce, s, folded[0], out
        )
    finish_head(s, folded[0], options.student_logit_scale, options.student_softcap, 1.0)
    finish_head(
        t,
        folded[1],
        options.teacher_logit_scale,
        options.teacher_softcap,
        T if teacher_tempered else 1.0,
    )

    # Relative to the row maxima, as log_softmax does: the likely tokens' log-probabilities stay exact
    # even for logits of magnitude 1e4 (docs/design.md §6). A row whose maximum is not finite (a NaN or +inf
    # entry, or -inf everywhere) is not a distribution: its token's values and G row become NaN (§9).
    student_bad, teacher_bad = subtract_row_max(s), subtract_row_max(t)
    if valid is not None:  # ignored rows are never read: no value of theirs reaches an output
        student_bad &= valid
        teacher_bad &= valid
    distill_bad = student_bad | teacher_bad
    label_logit = None if labels is None else s[rows, labels]  # s_y - max s
    # The cross-entropy is at T = 1: for T != 1 its softmax, exp(s - max s) / Z1, differs from q.
    plain = z_plain = None
    if labels is not None and T != 1.0:
        plain = torch.exp(s, out=scratch.block(0, n))
        z_plain = plain.sum(-1)
    if T != 1.0:
        s.div_(T)  # a
        if not teacher_tempered:
            t.div_(T)  # b

    def finish(z_student: torch.Tensor, value: torch.Tensor) -> None:
        divergence_out.copy_(value.masked_fill_(distill_bad, math.nan))
        if labels is None:
            ce_out.zero_()
        else:  # C = LSE(s) - s_y = log Z1 - (s_y - max s)
            ce = (z_student if z_plain is None else z_plain).log() - label_logit
            ce_out.copy_(ce.masked_fill_(student_bad, math.nan))
        if valid is not None:
            divergence_out.masked_fill_(~valid, 0.0)
            ce_out.masked_fill_(~valid, 0.0)

    if options.divergence == "forward_kl":
        # D = sum p (log p - log q) = sum Ep (b - a) / Zp - log Zp + log Zq
        p_unnorm = torch.exp(t, out=scratch.block(1, n))
        z_teacher = p_unnorm.sum(-1)
        cross = torch.mul(p_unnorm, t.sub_(s), out=t).nansum(-1)  # Ep (b - a)
        s.exp_()  # Eq
        z_student = s.sum(-1)
        finish(z_student, cross / z_teacher - z_teacher.log() + z_student.log())
        if not want_grad:
            return
        # dD/ds = (q - p) / T;  dC/ds = softmax(s) - onehot(y)
        coef_q = w_distill / (T * z_student)
        if want_ce_grad and plain is None:
            coef_q = coef_q + w_ce / z_student  # T = 1: softmax(s) is q
        grad = s.mul_(coef_q[:, None]).addcmul_(p_unnorm, (-w_distill / (T * z_teacher))[:, None])
        if want_ce_grad and plain is not None:
            grad.addcmul_(plain, (w_ce / z_plain)[:, None])

    elif options.divergence == "reverse_kl":
        # K = sum q (a - b);  D = sum q (log q - log p) = K - log Zq + log Zp
        z_teacher = torch.exp(t, out=scratch.block(1, n)).sum(-1)
        log_ratio = _zero_where_unweighted(torch.sub(s, t, out=t))  # a - b
        s.exp_()  # Eq
        z_student = s.sum(-1)
        k = torch.mul(s, log_ratio, out=scratch.block(1, n)).sum(-1) / z_student
        finish(z_student, k - z_student.log() + z_teacher.log())
        if not want_grad:
            return
        # dD/ds = q (log q - log p - D) / T = q ((a - b) - K) / T
        grad = log_ratio.sub_(k[:, None]).mul_(s).mul_((w_distill / (T * z_student))[:, None])
        if want_ce_grad:
            if plain is None:
                grad.addcmul_(s, (w_ce / z_student)[:, None])
            else:
                grad.addcmul_(plain, (w_ce / z_plain)[:, None])

    else:
        # m = beta p + (1 - beta) q;  D = beta KL(p || m) + (1 - beta) KL(q || m)
        # dD/ds = (1 - beta) q (log q - log m - KL(q || m)) / T
        beta = options.beta
        z_student = torch.exp(s, out=scratch.block(1, n)).sum(-1)
        s.sub_(z_student.log()[:, None])  # log q
        t.sub_(torch.exp(t, out=scratch.block(1, n)).sum(-1).log()[:, None])  # log p
        log_m = torch.add(t, math.log(beta), out=scratch.block(1, n))
        torch.logaddexp(log_m, torch.add(s, math.log1p(-beta), out=scratch.block(2, n)), out=log_m)
        p = torch.exp(t, out=scratch.block(2, n))
        kl_teacher_mix = torch.mul(p, t.sub_(log_m), out=t).nansum(-1)  # p (log p - log m)
        log_ratio = _zero_where_unweighted(torch.sub(s, log_m, out=log_m))  # log q - log m
        s.exp_()  # q
        kl_student_mix = torch.mul(s, log_ratio, out=t).sum(-1)
        finish(z_student, beta * kl_teacher_mix + (1.0 - beta) * kl_student_mix)
        if not want_grad:
            return
        grad = torch.sub(log_ratio, kl_student_mix[:, None], out=t)
        grad.mul_(s).mul_(((1.0 - beta) / T * w_distill)[:, None])
        if want_ce_grad:
            if plain is None:
                grad.addcmul_(s, w_ce[:, None])  # T = 1: softmax(s) is q
            else:
                grad.addcmul_(plain, (w_ce / z_plain)[:, None])

    if want_ce_grad:
        grad[rows, labels] -= w_ce
    if cap_derivative is not None:
        grad.mul_(cap_derivative)
    fill_gradient_rows(grad, distill_bad, valid)


def fill_gradient_rows(grad: torch.Tensor, bad: torch.Tensor, valid: torch.Tensor | None) -> None:
    """In place: the G rows of non-distributions (`bad`) become NaN (§9), those of rows that do not count
    (not `valid`) 0, whatever they hold. On a CPU the pass is skipped when no row needs it (reading the
    flag costs nothing there, as for `compacts_ignored`; elsewhere it would be a host synchronization)."""
    fill = bad if valid is None else bad | ~valid
    if not compacts_ignored(grad.device) or bool(fill.any()):
        row_fill = torch.full(fill.shape, math.nan, dtype=grad.dtype, device=grad.device)
        if valid is not None:
            row_fill.masked_fill_(~valid, 0.0)
        torch.where(fill[:, None], row_fill[:, None], grad, out=grad)


def subtract_row_max(x: torch.Tensor) -> torch.Tensor:
    """In place: x minus each row's maximum (0 for a row whose maximum is not finite). Returns whether
    each row's maximum is NaN (a NaN entry), +inf (a +inf entry) or -inf (every entry -inf)."""
    row_max = x.amax(dim=-1)
    bad = ~torch.isfinite(row_max)
    x.sub_(row_max.masked_fill_(bad, 0.0)[:, None])
    return bad


def _zero_where_unweighted(log_ratio: torch.Tensor) -> torch.Tensor:
    """In place: -inf (its weight is 0, the other side finite) and NaN (both -inf) become 0; +inf (a
    truly infinite divergence) stays."""
    return log_ratio.nan_to_num_(nan=0.0, posinf=math.inf, neginf=0.0)


def compacts_ignored(device: torch.device) -> bool:
    """Whether ignored tokens are dropped before any matmul on `device`: on a CPU only. Compaction needs
    the number of valid tokens on the host, free on a CPU and a synchronization on an accelerator."""
    return device.type == "cpu"


class Tokens:
    """The tokens that count: on a CPU, ignored tokens are dropped before any matmul (`compacts_ignored`)."""

    def __init__(self, labels: torch.Tensor | None, options: KDOptions, n: int, device: torch.device):
        if labels is None:
            self.valid = torch.ones(n, dtype=torch.bool, device=device)
        else:
            self.valid = labels != options.ignore_index
        self.num_valid = self.valid.sum()
        # Compaction is pointless (a copy of the hidden states) when every token counts.
        self.index = None
        if compacts_ignored(device) and labels is not None and int(self.num_valid) < n:
            self.index = self.valid.nonzero().view(-1)
        self.safe_labels = (
            None if labels is None else torch.where(self.valid, labels, torch.zeros_like(labels))
        )

    @property
    def uncompacted_valid(self) -> torch.Tensor | None:
        """Which rows count, where ignored rows are still computed (labels given, not compacted), else
        None: every row computed counts."""
        if self.index is not None or self.safe_labels is None:
            return None
        return self.valid

    def zero_ignored(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """`x` ([n, ...]) with the rows of ignored tokens zeroed where they are still computed: they are
        never read, so a NaN there reaches no output (a differentiable copy; `x` itself otherwise)."""
        valid = self.uncompacted_valid
        if x is None or valid is None:
            return x
        return torch.where(valid.view(-1, *([1] * (x.dim() - 1))), x, 0)

    def take(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return x if x is None or self.index is None else x.index_select(0, self.index)

    def put(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """Scatter per-compact-token values back to [n, ...], zero where ignored."""
        if self.index is None:
            return values
        out = values.new_zeros((n, *values.shape[1:]))
        return out.index_copy_(0, self.index, values)


def finite(x: torch.Tensor) -> torch.Tensor:
    """x, with -inf (an empty set's log-sum-exp, a row of -inf's maximum) replaced by 0."""
    return x.masked_fill(x == -math.inf, 0.0)
