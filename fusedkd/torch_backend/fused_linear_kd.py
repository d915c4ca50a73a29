"""`fused_linear_kd_loss` on the PyTorch backend: the dense fused linear loss and its autograd Function.

Each chunk of `c` tokens computes its `c x V` student and teacher logit tiles once (`gemm.project`),
into two buffers allocated once per call, derives the per-token divergence and cross-entropy and, when
a gradient is wanted, the tile of G = dloss/dlogits (`tiles.kd_tile_terms`, docs/design.md §4), which is
multiplied straight into grad_student_hidden and grad_student_weight. No tensor with N*V elements is
ever allocated.

The gradient is formed during the forward for reductions "mean" and "sum" (backward then only scales
it by grad_output, a scalar). For reduction="none", or when the returned components are themselves
differentiated, backward recomputes the tiles with the per-token weights it receives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from fusedkd._autograd import gradient_scale
from fusedkd._options import KDOptions, compute_dtype, head_chain_rule
from fusedkd._shard import VocabShard
from fusedkd.torch_backend import streamed, tiles
from fusedkd.torch_backend.gemm import gradient_products, project
from fusedkd.torch_backend.tiles import (
    Scratch,
    Tokens,
    default_chunk_size,
    kd_tile_terms,
    select_rows,
)
from fusedkd.torch_backend.vocab_parallel import sharded_tile_terms


def stream(
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
    valid: torch.Tensor | None = None,
    tile_terms: Callable = kd_tile_terms,
    grad_in_weight_dtype: bool = False,
):
    """Stream over token chunks. Returns (divergence [N], ce [N], grads or None).

    `tile_terms` computes a chunk's divergence, cross-entropy and G from its two logit tiles:
    `tiles.kd_tile_terms` (torch element-wise passes), or the tiles backend's one Triton kernel
    (`fusedkd.kernels.kd_tile.kd_tile_terms_triton`), which writes G straight in a 16-bit weight's
    dtype so that the two gradient products run as 16-bit GEMMs (`grad_in_weight_dtype`), into the
    student tile's own bytes (`grad_out`, row stride 2V): a chunk costs its two float32 tiles only.

    `valid` ([N] bool or None): which tokens count, when ignored ones are streamed too
    (`Tokens.uncompacted_valid`); their hidden states must then be zero rows (`Tokens.zero_ignored`).

    grads = (grad_student_hidden [N, H_s] input dtype, grad_student_weight [V, H_s] and
    grad_student_bias [V] (or None) in the compute dtype (float32; float64 for float64 inputs)), with G
    weighted per token by `grad_weights`.
    """
    n = student_hidden.shape[0]
    vocab = student_weight.shape[0]
    # The one place where the temperature and the heads' logit scales become GEMM scales: t / T =
    # (scale_t / T) (h W^T + b) is folded into the teacher's GEMM (the student's tile is divided by T in
    # `kd_tile_terms`, after its cross-entropy); for a soft-capped head, tanh's argument (`gemm_scales`).
    folded = student_scale, teacher_scale = tiles.gemm_scales(options, temper_teacher=True)
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
    # A 16-bit head's G: in its dtype, in the student tile's own bytes. fp16 G is multiplied by a power of
    # two (through the token weights, G being linear in them), so that its small entries do not flush to
    # zero at large N under "mean", and the products are divided by it in float32 (`gradient_scale`).
    g_dtype = student_weight.dtype if grad_in_weight_dtype and grad_weights is not None else None
    g_dtype = g_dtype if g_dtype in (torch.bfloat16, torch.float16) else None
    g_scale = None
    if g_dtype == torch.float16:
        g_scale = gradient_scale(options, *head_chain_rule(options.student_head, *grad_weights)[:2], g_dtype)
        grad_weights = tuple(None if w is None else w * g_scale for w in grad_weights)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(n, start + chunk_size))
        count = rows.stop - rows.start
        hidden = student_hidden[rows]
        chunk_weights = select_rows(grad_weights, rows)
        s = project(student_tile[:count], hidden, student_weight, student_bias, student_scale)
        t = project(teacher_tile[:count], teacher_hidden[rows], teacher_weight, teacher_bias, teacher_scale)
        extra = {"grad_out": s.view(g_dtype)[:, :vocab]} if g_dtype is not None else {}
        divergence[rows], ce[rows], grad = tile_terms(
            s,
            t,
            select_rows(labels, rows),
            options,
            chunk_weights,
            teacher_tempered=True,
            scratch=scratch,
            folded=folded,
            valid=select_rows(valid, rows),
            **extra,
        )
        if grad is not None:
            gradient_products(grad, hidden, student_weight, grads, rows, dtype=dtype, g_scale=g_scale)
        del grad
    if grads is not None and g_scale is not None:  # exact: a power of two
        for grad in grads[1:]:
            if grad is not None:
                grad.div_(g_scale)
    return divergence, ce, grads


def _compact_stream(
    student_hidden,
    student_weight,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    tokens: Tokens,
    options: KDOptions,
    chunk_size: int,
    grad_weights=None,
    need_bias_grad=False,
    tile_terms: Callable = kd_tile_terms,
    grad_in_weight_dtype: bool = False,
):
    """`stream` over the tokens that count (`tokens`), per-token results scattered back to all N."""
    n = student_hidden.shape[0]
    divergence, ce, grads = stream(
        tokens.take(tokens.zero_ignored(student_hidden)),
        student_weight,
        student_bias,
        tokens.take(tokens.zero_ignored(teacher_hidden)),
        teacher_weight,
        teacher_bias,
        tokens.take(tokens.safe_labels),
        options,
        chunk_size,
        None if grad_weights is None else tuple(tokens.take(w) for w in grad_weights),
        need_bias_grad=need_bias_grad,
        valid=tokens.uncompacted_valid,
        tile_terms=tile_terms,
        grad_in_weight_dtype=grad_in_weight_dtype,
    )
    divergence = torch.where(tokens.valid, tokens.put(divergence, n), 0.0)
    ce = torch.where(tokens.valid, tokens.put(ce, n), 0.0)
    if grads is not None:
        grads = (tokens.zero_ignored(tokens.put(grads[0], n)), grads[1], grads[2])
    return divergence, ce, grads


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
    tile_terms: Callable = kd_tile_terms,
    shard: VocabShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend entry point: checked, flattened inputs -> (loss, distill, ce), reduced per `options`.

    Inputs are [N, H] hidden states, [V, H] heads (already cut to `options.vocab_size` rows), [V]
    biases, [N] int64 labels (or None), as `fusedkd._inputs.prepare_linear_kd` hands them; `chunk_size`
    a positive int or None (the default: `tiles.LINEAR_TILE_BYTES` per logit tile). Outputs are float32
    (float64 for float64 inputs). `tile_terms`: the per-chunk arithmetic (`stream`); the tiles backend
    passes its Triton kernel here and its own chunk size.

    `shard`: the heads are this rank's block of a vocabulary-parallel head (`fusedkd.vocab_parallel`):
    the chunks' tiles are its columns, combined across the ranks per chunk
    (`vocab_parallel.sharded_tile_terms`), and the hidden-state gradient is summed over the ranks.
    """
    gemm_dtype_grad = tile_terms is not kd_tile_terms  # the tiles backend's kernel writes G in 16 bits
    if shard is not None:
        tile_terms = functools.partial(sharded_tile_terms, shard=shard)
        gemm_dtype_grad = False
    if chunk_size is None:
        chunk_size = default_chunk_size(
            options.vocab_size,  # vocabulary-parallel too: the same chunks, tiles of V / P columns
            torch.finfo(compute_dtype(student_hidden.dtype)).bits // 8,
            tiles.LINEAR_TILE_BYTES,
        )
    teacher = tuple(None if x is None else x.detach() for x in (teacher_hidden, teacher_weight, teacher_bias))

    def stream_chunks(tensors, tokens: Tokens, options: KDOptions, weights, needs):
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, _ = (
            tensors
        )
        divergence, ce, grads = _compact_stream(
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            tokens,
            options,
            chunk_size,
            weights,
            need_bias_grad=student_bias is not None and needs[2],
            tile_terms=tile_terms,
            grad_in_weight_dtype=gemm_dtype_grad,
        )
        if shard is not None and grads is not None and needs[0]:  # each rank's columns' share of dh, summed
            shard.all_reduce_(grads[0])
        return divergence, ce, grads

    loss = streamed.Streamed(stream_chunks, students=(0, 1, 2), labels=6)
    return streamed.run(loss, options, (student_hidden, student_weight, student_bias, *teacher, labels))
