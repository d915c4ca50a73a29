"""Pure-PyTorch backend (backend="torch"): token-chunked, exact, for CPUs and any device.

Each chunk of `c` tokens computes its `c x V` student and teacher logit tiles once, into two buffers
allocated once per call, in the compute dtype (float32, or float64 for float64 inputs). It derives the
per-token divergence and cross-entropy and, when a gradient is wanted, the tile of G = dloss/dlogits
(DESIGN.md §4) in place of one of the two logit tiles; G is multiplied straight into
grad_student_hidden and grad_student_weight. No tensor with N*V elements is ever allocated.

On a CPU, where matmul throughput rather than memory bandwidth is the bottleneck, computing each tile
once (no recomputation) is the fast choice (§5). Two things decide the rest of the time there:

- Large chunks. Every chunk streams both heads through the cache and makes a rank-c update of the
  V x H student weight gradient, so the GEMMs run near peak only when c is a hundred tokens or more
  (`LINEAR_TILE_BYTES`).
- No fresh `c x V` allocations, and element-wise passes that stay in the cache. A freshly allocated
  tile of tens of MB costs the kernel its page faults, more than the element-wise pass that fills it;
  the arithmetic therefore runs in place in the two reused tiles, a few rows at a time
  (`GROUP_BYTES`), with three small reused scratch blocks of those rows.

The gradient is computed eagerly, during the forward, for reductions "mean" and "sum" (backward then
only scales it by grad_output, a scalar). For reduction="none", or when the returned components are
themselves differentiated, backward recomputes the tiles with the per-token weights it receives.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from fusedkd._options import KDOptions

# Default working-set target of the logits-level loss, `teacher_topk` and the gathered-rows path of
# the sparse top-k loss: one `chunk x V` (or `chunk x k x H`) compute-dtype tile of about 32 MiB.
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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float accumulates in float32 (DESIGN.md §6)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Scratch:
    """Reusable element-wise scratch of one loss call: three blocks of `rows` x `vocab`, made lazily.

    `rows` is the row-group size of `kd_tile_terms`: a few rows on a CPU (so a group stays in the
    cache), the whole chunk on other devices (where each pass is one kernel launch).
    """

    BLOCKS = 3

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


def _logits(
    out: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float = 1.0,
) -> torch.Tensor:
    """out <- scale * (hidden @ weight.T + bias); the scale rides in the GEMM (alpha, beta)."""
    direct = weight.dtype == out.dtype
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk of rows: (divergence [c], ce [c], G [c, V] or None), from logit tiles it overwrites.

    Shared by the fused linear loss (after its two logit GEMMs) and the logits-level loss.
    `teacher_tempered`: `t` already holds t / T (the fused linear loss folds 1/T into its GEMM).
    G, when wanted, is written over `grad_tile(options, s, t)` and returned.

    `s`, `t` are [c, V] tiles in the compute dtype; `labels` are safe (ignored rows hold any valid id,
    their weights are 0). `grad_weights` = (w_distill [c], w_ce [c] or None): G = w_distill dD/ds +
    w_ce dC/ds (DESIGN.md §4). The rows are processed in groups of `scratch.rows`.
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

    # Relative to the row maxima, as log_softmax does: the likely tokens' log-probabilities stay exact
    # even for logits of magnitude 1e4 (DESIGN.md §6).
    s.sub_(_finite_row_max(s))
    t.sub_(_finite_row_max(t))
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
        divergence_out.copy_(value)
        if labels is None:
            ce_out.zero_()
        else:  # C = LSE(s) - s_y = log Z1 - (s_y - max s)
            ce_out.copy_((z_student if z_plain is None else z_plain).log() - label_logit)

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


def _zero_where_unweighted(log_ratio: torch.Tensor) -> torch.Tensor:
    """In place: -inf (its weight is 0, the other side finite) and NaN (both -inf) become 0; +inf (a
    truly infinite divergence) stays."""
    return log_ratio.nan_to_num_(nan=0.0, posinf=math.inf, neginf=0.0)


def _finite_row_max(x: torch.Tensor) -> torch.Tensor:
    """Each row's maximum, or 0 for a row of -inf (so that subtracting it never makes a NaN)."""
    row_max = x.amax(dim=-1, keepdim=True)
    return row_max.masked_fill_(row_max == -math.inf, 0.0)


def _stream(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    options: KDOptions,
    chunk_size: int,
    grad_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    need_bias_grad: bool = False,
):
    """Stream over token chunks. Returns (divergence [N], ce [N], grads or None).

    grads = (grad_student_hidden [N, H_s] input dtype, grad_student_weight [V, H_s] float32,
    grad_student_bias [V] float32 or None), with G weighted per token by `grad_weights`.
    """
    n = student_hidden.shape[0]
    vocab = student_weight.shape[0]
    dtype = compute_dtype(student_hidden.dtype)
    device = student_hidden.device
    divergence = torch.zeros(n, dtype=dtype, device=device)
    ce = torch.zeros(n, dtype=dtype, device=device)
    grads = None
    if grad_weights is not None:
        grad_hidden = torch.zeros_like(student_hidden)
        # Chunk 0 writes grad_weight whole (no zero fill), later chunks accumulate into it.
        allocate = torch.empty if n > 0 else torch.zeros
        grad_weight = allocate(student_weight.shape, dtype=dtype, device=device)
        grad_bias = torch.zeros(vocab, dtype=dtype, device=device) if need_bias_grad else None
        grads = (grad_hidden, grad_weight, grad_bias)
    if n == 0:
        return divergence, ce, grads

    # The two logit tiles and the scratch are allocated once and reused by every chunk.
    chunk = min(n, chunk_size)
    student_tile = torch.empty(chunk, vocab, dtype=dtype, device=device)
    teacher_tile = torch.empty(chunk, vocab, dtype=dtype, device=device)
    scratch = Scratch(chunk, vocab, dtype, device)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(n, start + chunk_size))
        count = rows.stop - rows.start
        hidden = student_hidden[rows]
        chunk_weights = select_rows(grad_weights, rows)
        s = _logits(student_tile[:count], hidden, student_weight, student_bias)
        t = _logits(
            teacher_tile[:count],
            teacher_hidden[rows],
            teacher_weight,
            teacher_bias,
            1.0 / options.temperature,
        )
        divergence[rows], ce[rows], grad = kd_tile_terms(
            s,
            t,
            select_rows(labels, rows),
            options,
            chunk_weights,
            teacher_tempered=True,
            scratch=scratch,
        )
        if grad is not None:
            if student_weight.dtype == grad.dtype:
                torch.mm(grad, student_weight, out=grad_hidden[rows])
            else:
                grad_hidden[rows] = grad.to(student_weight.dtype) @ student_weight
            if start == 0:
                torch.mm(grad.T, hidden.to(dtype), out=grad_weight)
            else:
                grad_weight.addmm_(grad.T, hidden.to(dtype))
            if grad_bias is not None:
                grad_bias.add_(grad.sum(0))
        del grad
    return divergence, ce, grads


class _Tokens:
    """The tokens that count: on a CPU, ignored tokens are dropped before any matmul."""

    def __init__(self, labels: torch.Tensor | None, options: KDOptions, n: int, device: torch.device):
        if labels is None:
            self.valid = torch.ones(n, dtype=torch.bool, device=device)
        else:
            self.valid = labels != options.ignore_index
        self.num_valid = self.valid.sum()
        # Compaction needs the count on the host: free on a CPU, a sync on an accelerator (skipped there),
        # and pointless (a copy of the hidden states) when every token counts.
        self.index = None
        if device.type == "cpu" and labels is not None and int(self.num_valid) < n:
            self.index = self.valid.nonzero().view(-1)
        self.safe_labels = (
            None if labels is None else torch.where(self.valid, labels, torch.zeros_like(labels))
        )

    def take(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return x if x is None or self.index is None else x.index_select(0, self.index)

    def put(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """Scatter per-compact-token values back to [n, ...], zero where ignored."""
        if self.index is None:
            return values
        out = values.new_zeros((n, *values.shape[1:]))
        return out.index_copy_(0, self.index, values)

    def reduction_scale(self, options: KDOptions, dtype: torch.dtype) -> torch.Tensor:
        if options.reduction == "mean":
            return 1.0 / self.num_valid.clamp(min=1).to(dtype)
        return torch.ones((), dtype=dtype, device=self.valid.device)


def _has_ce_grad(options: KDOptions, grad_ce: torch.Tensor | None) -> bool:
    """Whether G has a cross-entropy part at all (labels, and a nonzero weight or a gradient of ce)."""
    return options.has_labels and (options.ce_weight != 0.0 or grad_ce is not None)


def _reduce(per_token: torch.Tensor, options: KDOptions, scale: torch.Tensor) -> torch.Tensor:
    if options.reduction == "none":
        return per_token
    return per_token.sum() * scale


class _LinearKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        labels,
        options: KDOptions,
        chunk_size: int,
    ):
        n = student_hidden.shape[0]
        dtype = compute_dtype(student_hidden.dtype)
        tokens = _Tokens(labels, options, n, student_hidden.device)
        scale = tokens.reduction_scale(options, dtype)
        valid = tokens.valid.to(dtype)

        eager = options.reduction != "none"
        grad_weights = None
        if eager:
            grad_weights = (
                tokens.take(valid * (options.distill_weight * scale)),
                tokens.take(valid * (options.ce_weight * scale)) if _has_ce_grad(options, None) else None,
            )
        divergence, ce, grads = _stream(
            tokens.take(student_hidden),
            student_weight,
            student_bias,
            tokens.take(teacher_hidden),
            teacher_weight,
            teacher_bias,
            tokens.take(tokens.safe_labels),
            options,
            chunk_size,
            grad_weights,
            need_bias_grad=student_bias is not None and ctx.needs_input_grad[2],
        )
        divergence = tokens.put(divergence, n) * valid
        ce = tokens.put(ce, n) * valid
        loss = options.distill_weight * divergence + options.ce_weight * ce

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels
        )
        ctx.options, ctx.chunk_size, ctx.scale = options, chunk_size, scale
        ctx.eager_grads = grads
        if grads is not None:
            ctx.eager_grads = (tokens.put(grads[0], n), grads[1], grads[2])
        return tuple(_reduce(x, options, scale) for x in (loss, divergence, ce))

    @staticmethod
    def backward(ctx, grad_loss, grad_divergence, grad_ce):
        (
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            labels,
        ) = ctx.saved_tensors
        options: KDOptions = ctx.options
        wanted = ctx.needs_input_grad
        if grad_loss is None and grad_divergence is None and grad_ce is None:
            return (None,) * len(wanted)

        if ctx.eager_grads is not None and grad_divergence is None and grad_ce is None:
            # Gradients were formed in the forward for grad_output = 1: scale them (once; a second
            # backward through a retained graph takes the recomputing path below).
            grads = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.eager_grads)
            ctx.eager_grads = None
        else:
            grads = _recompute_grads(
                student_hidden,
                student_weight,
                student_bias,
                teacher_hidden,
                teacher_weight,
                teacher_bias,
                labels,
                options,
                ctx.chunk_size,
                ctx.scale,
                grad_loss,
                grad_divergence,
                grad_ce,
                need_bias_grad=student_bias is not None and wanted[2],
            )
        grad_hidden, grad_weight, grad_bias = grads
        by_input = {
            0: grad_hidden,
            1: None if grad_weight is None else grad_weight.to(student_weight.dtype),
            2: None if grad_bias is None else grad_bias.to(student_bias.dtype),
        }
        return tuple(by_input.get(i) if wanted[i] else None for i in range(len(wanted)))


def _recompute_grads(
    student_hidden,
    student_weight,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    labels,
    options,
    chunk_size,
    scale,
    grad_loss,
    grad_divergence,
    grad_ce,
    need_bias_grad,
):
    """Per-token weights from the output gradients, then one recomputing pass (DESIGN.md §4)."""
    n = student_hidden.shape[0]
    dtype = compute_dtype(student_hidden.dtype)
    tokens = _Tokens(labels, options, n, student_hidden.device)
    zero = torch.zeros((), dtype=dtype, device=student_hidden.device)

    def as_weight(g):
        return zero if g is None else g.to(dtype)

    g_loss, g_div, g_ce = (as_weight(g) for g in (grad_loss, grad_divergence, grad_ce))
    valid = tokens.valid.to(dtype)
    w_distill = (g_loss * options.distill_weight + g_div) * scale * valid
    w_ce = (g_loss * options.ce_weight + g_ce) * scale * valid
    w_distill, w_ce = (tokens.take(w.expand(n).contiguous()) for w in (w_distill, w_ce))
    if not _has_ce_grad(options, grad_ce):
        w_ce = None
    _, _, grads = _stream(
        tokens.take(student_hidden),
        student_weight,
        student_bias,
        tokens.take(teacher_hidden),
        teacher_weight,
        teacher_bias,
        tokens.take(tokens.safe_labels),
        options,
        chunk_size,
        (w_distill, w_ce),
        need_bias_grad=need_bias_grad,
    )
    return tokens.put(grads[0], n), grads[1], grads[2]


def fused_linear_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    options: KDOptions,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend entry point: checked, flattened inputs -> (loss, distill, ce), reduced per `options`.

    Inputs are [N, H] hidden states, [V, H] heads (already cut to `options.vocab_size` rows), [V]
    biases, [N] int64 labels (or None). Outputs are float32 (float64 for float64 inputs).
    """
    if chunk_size is None:
        chunk_size = default_chunk_size(
            options.vocab_size,
            torch.finfo(compute_dtype(student_hidden.dtype)).bits // 8,
            LINEAR_TILE_BYTES,
        )
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)
    )
    if needs_grad:
        return _LinearKDFunction.apply(
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            labels,
            options,
            chunk_size,
        )
    with torch.no_grad():
        n = student_hidden.shape[0]
        dtype = compute_dtype(student_hidden.dtype)
        tokens = _Tokens(labels, options, n, student_hidden.device)
        divergence, ce, _ = _stream(
            tokens.take(student_hidden),
            student_weight,
            student_bias,
            tokens.take(teacher_hidden),
            teacher_weight,
            teacher_bias,
            tokens.take(tokens.safe_labels),
            options,
            chunk_size,
        )
        valid = tokens.valid.to(dtype)
        divergence = tokens.put(divergence, n) * valid
        ce = tokens.put(ce, n) * valid
        loss = options.distill_weight * divergence + options.ce_weight * ce
        scale = tokens.reduction_scale(options, dtype)
        return tuple(_reduce(x, options, scale) for x in (loss, divergence, ce))
