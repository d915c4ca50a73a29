"""Distillation loss over logits the caller already holds: `kd_loss` and the `KDLoss` module.

A drop-in for the common ``DistillationLoss(alpha, temperature)`` recipe, with the semantics of
`fusedkd.fused_linear_kd_loss` (DESIGN.md §2) on given ``[..., V]`` logits. Neither backend makes a
softmax, a log-softmax or a float32 copy of the inputs: the Triton kernels (fusedkd/kernels/kd_logits*)
stream each row with an online log-sum-exp, and the PyTorch backend below works on `chunk x V` tiles.
The only ``[N, V]`` allocation is the gradient of the student logits, in their dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fusedkd._inputs import check_devices, check_float, check_labels, check_options, check_tensor
from fusedkd._options import KDOptions
from fusedkd.chunked import (
    Scratch,
    _has_ce_grad,
    _reduce,
    _Tokens,
    compute_dtype,
    default_chunk_size,
    kd_tile_terms,
)
from fusedkd.loss import BACKENDS, resolve_backend


@dataclass
class LogitsKDInputs:
    """Checked inputs of `kd_loss`: logits untouched (any strides), labels flattened to [N] int64."""

    student_logits: torch.Tensor  # [..., V_s]
    teacher_logits: torch.Tensor  # [..., V_t], same leading shape
    labels: torch.Tensor | None  # [N] int64
    leading_shape: torch.Size
    options: KDOptions


def _logits_vocab_size(vocab_size: int | None, student_vocab: int, teacher_vocab: int) -> int:
    if vocab_size is None:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"vocabulary sizes differ: student_logits has {student_vocab} entries in its last dimension "
                f"and teacher_logits has {teacher_vocab}; pass vocab_size= (e.g. vocab_size="
                f"{min(student_vocab, teacher_vocab)}) to use the shared first entries of both"
            )
        return student_vocab
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    for name, size in (("student_logits", student_vocab), ("teacher_logits", teacher_vocab)):
        if vocab_size > size:
            raise ValueError(f"vocab_size={vocab_size} is larger than the last dimension of {name} ({size})")
    return vocab_size


def prepare_logits_kd(
    student_logits,
    teacher_logits,
    labels,
    *,
    divergence: str,
    beta: float,
    temperature: float,
    alpha: float,
    ignore_index: int,
    reduction: str,
    vocab_size: int | None,
) -> LogitsKDInputs:
    """Check every argument of `kd_loss` (raising a ValueError / TypeError that names it) before any work."""
    check_tensor("student_logits", student_logits, min_ndim=1)
    check_tensor("teacher_logits", teacher_logits, min_ndim=1)
    check_float("student_logits", student_logits)
    check_float("teacher_logits", teacher_logits)
    if labels is not None:
        check_tensor("labels", labels)
    check_devices({"student_logits": student_logits, "teacher_logits": teacher_logits, "labels": labels})
    leading_shape = student_logits.shape[:-1]
    if teacher_logits.shape[:-1] != leading_shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same leading (token) shape; got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    vocab = _logits_vocab_size(vocab_size, student_logits.shape[-1], teacher_logits.shape[-1])
    options = check_options(
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index,
        reduction=reduction,
        vocab_size=vocab,
        has_labels=labels is not None,
    )
    flat_labels = (
        None
        if labels is None
        else check_labels(labels, leading_shape, vocab, ignore_index, shape_name="student_logits")
    )
    return LogitsKDInputs(student_logits, teacher_logits, flat_labels, leading_shape, options)


class _Rows:
    """The rows of a [..., V] tensor as N rows of its first `vocab` entries, without copying the tensor.

    A [N, V] view when the leading dimensions allow one, else per-chunk gathers by multi-index (as for
    `logits[:, :-1]`, whose rows cannot be flattened into a view).
    """

    def __init__(self, x: torch.Tensor, vocab: int):
        self.x, self.vocab, self.leading = x, vocab, x.shape[:-1]
        try:
            self.flat = x.view(-1, x.shape[-1])[:, :vocab]
        except RuntimeError:
            self.flat = None

    def tile(self, rows: slice | torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (a [c, vocab] buffer in the compute dtype) filled with the selected rows."""
        if self.flat is not None:
            if isinstance(rows, slice):
                return out.copy_(self.flat[rows])
            if self.flat.dtype == out.dtype and self.flat.is_contiguous():
                return torch.index_select(self.flat, 0, rows, out=out)
            return out.copy_(self.flat.index_select(0, rows))
        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop, device=self.x.device)
        return out.copy_(self.x[torch.unravel_index(rows, self.leading)][:, : self.vocab])


def _stream(
    student: _Rows,
    teacher: _Rows,
    labels: torch.Tensor | None,
    options: KDOptions,
    chunk_size: int,
    index: torch.Tensor | None,
    n: int,
    grad_weights: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    grad_shape: torch.Size | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Stream over token chunks: (divergence [N], ce [N], grad [..., V_s] or None).

    `index` lists the rows to compute (the valid ones, on a CPU) or is None (all rows). `labels` and
    `grad_weights` are per row of the full [N]. Rows not computed get 0 and a zero gradient.
    """
    x = student.x
    dtype = compute_dtype(x.dtype)
    divergence = torch.zeros(n, dtype=dtype, device=x.device)
    ce = torch.zeros(n, dtype=dtype, device=x.device)
    grad = None
    if grad_weights is not None:
        grad = torch.zeros(grad_shape, dtype=x.dtype, device=x.device)
        grad_rows = grad.view(-1, grad.shape[-1])[:, : options.vocab_size]
    count = n if index is None else index.numel()
    if count == 0:
        return divergence, ce, grad
    # Two compute-dtype tiles and the scratch, allocated once and reused by every chunk.
    chunk = min(count, chunk_size)
    tiles = [torch.empty(chunk, options.vocab_size, dtype=dtype, device=x.device) for _ in range(2)]
    scratch = Scratch(chunk, options.vocab_size, dtype, x.device)
    for start in range(0, count, chunk_size):
        stop = min(count, start + chunk_size)
        rows = slice(start, stop) if index is None else index[start:stop]

        chunk_divergence, chunk_ce, chunk_grad = kd_tile_terms(
            student.tile(rows, tiles[0][: stop - start]),
            teacher.tile(rows, tiles[1][: stop - start]),
            _pick(labels, rows),
            options,
            None if grad_weights is None else tuple(_pick(w, rows) for w in grad_weights),
            scratch=scratch,
        )
        divergence[rows] = chunk_divergence
        ce[rows] = chunk_ce
        if chunk_grad is not None:
            if index is None:
                grad_rows[rows] = chunk_grad
            else:
                grad_rows.index_copy_(0, rows, chunk_grad.to(x.dtype))
        del chunk_grad
    return divergence, ce, grad


def _pick(values: torch.Tensor | None, rows: slice | torch.Tensor) -> torch.Tensor | None:
    return None if values is None else values[rows]


class _LogitsKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, options: KDOptions, chunk_size: int):
        n = math.prod(student_logits.shape[:-1])
        dtype = compute_dtype(student_logits.dtype)
        tokens = _Tokens(labels, options, n, student_logits.device)
        scale = tokens.reduction_scale(options, dtype)
        valid = tokens.valid.to(dtype)
        grad_weights = None
        if ctx.needs_input_grad[0] and options.reduction != "none":
            grad_weights = (
                valid * (options.distill_weight * scale),
                valid * (options.ce_weight * scale) if _has_ce_grad(options, None) else None,
            )
        divergence, ce, grad = _stream(
            _Rows(student_logits, options.vocab_size),
            _Rows(teacher_logits, options.vocab_size),
            tokens.safe_labels,
            options,
            chunk_size,
            tokens.index,
            n,
            grad_weights,
            student_logits.shape,
        )
        divergence = divergence * valid
        ce = ce * valid
        loss = options.distill_weight * divergence + options.ce_weight * ce

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(student_logits, teacher_logits, labels)
        ctx.options, ctx.chunk_size, ctx.scale = options, chunk_size, scale
        ctx.eager_grad = grad
        return tuple(_reduce(x, options, scale) for x in (loss, divergence, ce))

    @staticmethod
    def backward(ctx, grad_loss, grad_divergence, grad_ce):
        student_logits, teacher_logits, labels = ctx.saved_tensors
        options: KDOptions = ctx.options
        no_grads = (None,) * 5
        if not ctx.needs_input_grad[0] or (grad_loss is None and grad_divergence is None and grad_ce is None):
            return no_grads
        if ctx.eager_grad is not None and grad_divergence is None and grad_ce is None:
            # G was formed in the forward for an output gradient of 1: scale it (once; a second backward
            # through a retained graph takes the recomputing path below).
            grad = ctx.eager_grad.mul_(grad_loss.to(ctx.eager_grad.dtype))
            ctx.eager_grad = None
            return (grad, *no_grads[1:])

        n = math.prod(student_logits.shape[:-1])
        dtype = compute_dtype(student_logits.dtype)
        tokens = _Tokens(labels, options, n, student_logits.device)
        zero = torch.zeros((), dtype=dtype, device=student_logits.device)
        g_loss, g_div, g_ce = (
            zero if g is None else g.to(dtype) for g in (grad_loss, grad_divergence, grad_ce)
        )
        valid = tokens.valid.to(dtype)
        w_distill = ((g_loss * options.distill_weight + g_div) * ctx.scale * valid).expand(n)
        w_ce = ((g_loss * options.ce_weight + g_ce) * ctx.scale * valid).expand(n)
        _, _, grad = _stream(
            _Rows(student_logits, options.vocab_size),
            _Rows(teacher_logits, options.vocab_size),
            tokens.safe_labels,
            options,
            ctx.chunk_size,
            tokens.index,
            n,
            (w_distill, w_ce if _has_ce_grad(options, grad_ce) else None),
            student_logits.shape,
        )
        return (grad, *no_grads[1:])


def kd_logits_torch(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    options: KDOptions,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch backend: checked inputs -> (loss, distill, ce), reduced per `options`, flat for "none".

    Token chunks of `chunk_size` rows are cast to `chunk x V` tiles of the compute dtype (float32, or
    float64 for float64 logits); no tensor with N*V elements is made but the student-logits gradient.
    """
    if chunk_size is None:
        chunk_size = default_chunk_size(
            options.vocab_size, torch.finfo(compute_dtype(student_logits.dtype)).bits // 8
        )
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    teacher_logits = teacher_logits.detach()
    if torch.is_grad_enabled() and student_logits.requires_grad:
        return _LogitsKDFunction.apply(student_logits, teacher_logits, labels, options, chunk_size)
    with torch.no_grad():
        return _LogitsKDFunction.apply(student_logits.detach(), teacher_logits, labels, options, chunk_size)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    vocab_size: int | None = None,
    backend: str = "auto",
    return_components: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Distillation loss of student logits against frozen teacher logits, without softmax copies.

    The loss of `fusedkd.fused_linear_kd_loss` (DESIGN.md §2), for callers that already hold the logits.
    For every token ``i`` whose label is not ``ignore_index``, with ``s``, ``t`` its logit rows::

        q = softmax(s / T)    p = softmax(t / T)
        loss_i = alpha * T^2 * D(p, q) + (1 - alpha) * (-log softmax(s)[y_i])

    with ``D`` the forward KL ``KL(p || q)``, the reverse KL ``KL(q || p)`` or the generalized JSD
    ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``. Logits of ``-inf`` are
    tokens of probability 0. No softmax, log-softmax or float32 copy of the logits is made: the only
    ``[N, V]`` allocation is the gradient of ``student_logits``, in their dtype (peak memory of forward
    and backward: the inputs, one student-logits-sized gradient and O(N)). Views such as
    ``logits[:, :-1]`` are read in place, not copied.

    Args:
        student_logits: ``[..., V_s]`` float32 / bfloat16 / float16 / float64 student logits; receives a
            gradient of the same shape and dtype (zero past ``vocab_size`` and on ignored tokens).
        teacher_logits: ``[..., V_t]`` teacher logits with the same leading shape, any float dtype. The
            teacher is frozen: no gradient flows to it.
        labels: ``[...]`` integer targets, already shifted (position i predicts token i+1);
            ``ignore_index`` marks tokens that count for nothing. ``None``: every token counts and
            there is no cross-entropy term, which requires ``alpha == 1``.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD mixture weight in [0, 1]; ``beta=0`` is forward KL and ``beta=1`` reverse KL.
            Used only by ``"jsd"``.
        temperature: softmax temperature ``T > 0`` of the distillation term (the cross-entropy uses
            the plain logits); the divergence is scaled by ``T^2``.
        alpha: weight in [0, 1] of the distillation term; ``1 - alpha`` weights the cross-entropy.
        ignore_index: label value of ignored tokens.
        reduction: ``"mean"`` (over valid tokens; 0 when none is valid), ``"sum"`` or ``"none"``
            (per-token losses of the leading shape, 0 where ignored).
        vocab_size: use only the first ``vocab_size`` entries of both logits' last dimension (padded
            vocabularies). Required when ``V_s != V_t``.
        backend: ``"auto"`` (the Triton kernel on CUDA tensors when Triton is importable, else
            PyTorch), ``"torch"`` (token-chunked, any device) or ``"triton"``.
        return_components: also return the two terms, ``(loss, distill, ce)``, each reduced like
            ``loss``: ``loss = alpha * T^2 * distill + (1 - alpha) * ce``.
        chunk_size: tokens per chunk of the PyTorch backend (default: as `fused_linear_kd_loss`, one
            ``chunk x V`` float32 tile of `fusedkd.chunked.TILE_BYTES`). Not accepted by the Triton backend.

    Returns:
        The loss (a float32 scalar, float64 for float64 logits, or ``[...]`` for ``reduction="none"``),
        or ``(loss, distill, ce)``.

    Example:
        >>> import torch
        >>> from fusedkd.logits import kd_loss
        >>> student_logits = torch.randn(2, 9, 100, requires_grad=True)
        >>> teacher_logits = torch.randn(2, 9, 100)
        >>> labels = torch.randint(0, 100, (2, 9))
        >>> labels[:, :3] = -100  # e.g. prompt tokens
        >>> loss = kd_loss(student_logits, teacher_logits, labels, alpha=0.7, temperature=5.0)
        >>> loss.backward()
        >>> student_logits.grad.shape, student_logits.grad.dtype
        (torch.Size([2, 9, 100]), torch.float32)
    """
    inputs = prepare_logits_kd(
        student_logits,
        teacher_logits,
        labels,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index,
        reduction=reduction,
        vocab_size=vocab_size,
    )
    chosen = resolve_backend(backend, student_logits.device)
    args = (inputs.student_logits, inputs.teacher_logits, inputs.labels, inputs.options)
    if chosen == "torch":
        loss, distill, ce = kd_logits_torch(*args, chunk_size=chunk_size)
    else:
        if chunk_size is not None:
            raise ValueError("chunk_size applies to backend='torch' only; the Triton backend tiles itself")
        from fusedkd.kernels.kd_logits import kd_logits

        loss, distill, ce = kd_logits(*args)
    if reduction == "none":
        loss, distill, ce = (x.reshape(inputs.leading_shape) for x in (loss, distill, ce))
    return (loss, distill, ce) if return_components else loss


class KDLoss(torch.nn.Module):
    """`kd_loss` as a module, a drop-in for the common ``DistillationLoss(alpha, temperature)``.

    ``forward(student_logits, teacher_logits, labels=None)`` returns
    ``alpha * T^2 * KL(p || q) + (1 - alpha) * CE`` (or the divergence chosen); the other options of
    `kd_loss` are keyword arguments.

    Example:
        >>> import torch
        >>> from fusedkd.logits import KDLoss
        >>> criterion = KDLoss(0.7, 5.0)  # alpha, temperature
        >>> loss = criterion(torch.randn(6, 50), torch.randn(6, 50), torch.randint(0, 50, (6,)))
        >>> loss.dim()
        0
    """

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 1.0,
        *,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        ignore_index: int = -100,
        reduction: str = "mean",
        vocab_size: int | None = None,
        backend: str = "auto",
        return_components: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        # Fail at construction, not at the first batch.
        check_options(
            divergence=divergence,
            beta=beta,
            temperature=temperature,
            alpha=alpha,
            ignore_index=ignore_index,
            reduction=reduction,
            vocab_size=1,
            has_labels=True,
        )
        if vocab_size is not None:
            _logits_vocab_size(vocab_size, vocab_size, vocab_size)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
        self.options = dict(
            alpha=alpha,
            temperature=temperature,
            divergence=divergence,
            beta=beta,
            ignore_index=ignore_index,
            reduction=reduction,
            vocab_size=vocab_size,
            backend=backend,
            return_components=return_components,
            chunk_size=chunk_size,
        )

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None
    ):
        return kd_loss(student_logits, teacher_logits, labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
