"""`kd_loss` on the PyTorch backend: the loss over logits the caller holds, and its autograd Function.

Token chunks of the logits are read into two `chunk x V` tiles of the compute dtype (float32, or
float64 for float64 logits) and go through `tiles.kd_tile_terms`; no softmax, log-softmax or float32
copy of the inputs is made, and the only ``[N, V]`` allocation is the gradient of the student logits,
in their dtype. Views such as ``logits[:, :-1]`` are read in place (`Rows`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from fusedkd._options import KDOptions, compute_dtype
from fusedkd._shard import VocabShard
from fusedkd.torch_backend import streamed
from fusedkd.torch_backend.tiles import Scratch, Tokens, default_chunk_size, kd_tile_terms, select_rows
from fusedkd.torch_backend.vocab_parallel import sharded_tile_terms


class Rows:
    """The rows of a [..., V] tensor as N rows of its first `vocab` entries, without copying the tensor.

    A [N, V] view when the leading dimensions allow one, else per-chunk gathers by multi-index (as for
    `logits[:, :-1]`, whose rows cannot be flattened into a view).
    """

    def __init__(self, x: torch.Tensor, vocab: int):
        self.x, self.vocab, self.leading = x, vocab, x.shape[:-1]
        try:
            # Explicit row count: a rank's empty vocabulary block ([..., 0]) cannot infer it.
            self.flat = x.view(math.prod(self.leading), x.shape[-1])[:, :vocab]
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


def stream(
    student: Rows,
    teacher: Rows,
    labels: torch.Tensor | None,
    options: KDOptions,
    chunk_size: int,
    index: torch.Tensor | None,
    n: int,
    grad_weights: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    grad_shape: torch.Size | None = None,
    valid: torch.Tensor | None = None,
    tile_terms: Callable = kd_tile_terms,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Stream over token chunks: (divergence [N], ce [N], grad [..., V_s] or None).

    `index` lists the rows to compute (the valid ones, on a CPU) or is None (all rows). `labels` and
    `grad_weights` are per row of the full [N]. Rows not computed get 0 and a zero gradient, and so do
    rows computed but not `valid` (`Tokens.uncompacted_valid`). `tile_terms`: the per-chunk arithmetic
    (`tiles.kd_tile_terms`, or a vocabulary-parallel rank's `vocab_parallel.sharded_tile_terms`); the
    tiles are `student.vocab` columns wide.
    """
    x = student.x
    dtype = compute_dtype(x.dtype)
    divergence = torch.zeros(n, dtype=dtype, device=x.device)
    ce = torch.zeros(n, dtype=dtype, device=x.device)
    grad = None
    if grad_weights is not None:
        grad = torch.zeros(grad_shape, dtype=x.dtype, device=x.device)
        grad_rows = grad.view(n, grad.shape[-1])[:, : student.vocab]
    count = n if index is None else index.numel()
    if count == 0:
        return divergence, ce, grad
    # Two compute-dtype tiles and the scratch, allocated once and reused by every chunk.
    chunk = min(count, chunk_size)
    tiles = [torch.empty(chunk, student.vocab, dtype=dtype, device=x.device) for _ in range(2)]
    scratch = Scratch(chunk, student.vocab, dtype, x.device)
    for start in range(0, count, chunk_size):
        stop = min(count, start + chunk_size)
        rows = slice(start, stop) if index is None else index[start:stop]

        chunk_divergence, chunk_ce, chunk_grad = tile_terms(
            student.tile(rows, tiles[0][: stop - start]),
            teacher.tile(rows, tiles[1][: stop - start]),
            select_rows(labels, rows),
            options,
            None if grad_weights is None else tuple(select_rows(w, rows) for w in grad_weights),
            scratch=scratch,
            valid=select_rows(valid, rows),
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


def kd_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    options: KDOptions,
    *,
    chunk_size: int | None = None,
    shard: VocabShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend entry point: checked inputs -> (loss, distill, ce), reduced per `options`, flat for "none".

    `student_logits` [..., V_s] and `teacher_logits` [..., V_t] (same leading shape, any strides, only the
    first `options.vocab_size` entries used); `labels` flat [N] int64 or None; `chunk_size` a positive int
    or None (the default: `tiles.TILE_BYTES` per tile). Outputs are float32 (float64 for float64 student
    logits); the gradient has the student logits' shape and dtype.

    `shard`: the logits are this rank's block of vocabulary-parallel logits (`fusedkd.vocab_parallel`),
    their first `shard.rows` entries counted; the per-token numbers are combined across the ranks per
    chunk (`vocab_parallel.sharded_tile_terms`).
    """
    tile_terms = kd_tile_terms if shard is None else functools.partial(sharded_tile_terms, shard=shard)
    width = options.vocab_size if shard is None else shard.rows
    if chunk_size is None:
        chunk_size = default_chunk_size(
            options.vocab_size,  # vocabulary-parallel too: the same chunks, tiles of V / P columns
            torch.finfo(compute_dtype(student_logits.dtype)).bits // 8,
        )

    def stream_chunks(tensors, tokens: Tokens, options: KDOptions, weights, needs):
        student, teacher, _ = tensors
        divergence, ce, grad = stream(
            Rows(student, width),
            Rows(teacher, width),
            tokens.safe_labels,
            options,
            chunk_size,
            tokens.index,
            math.prod(student.shape[:-1]),
            weights,
            student.shape,
            tokens.uncompacted_valid,
            tile_terms,
        )
        return divergence, ce, (grad,)  # rows that do not count hold 0: never computed, or masked

    loss = streamed.Streamed(stream_chunks, students=(0,), labels=2)
    return streamed.run(loss, options, (student_logits, teacher_logits.detach(), labels))
