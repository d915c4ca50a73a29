"""`teacher_topk` on the PyTorch backend: the teacher's top-k log-probabilities, vocabulary block by block.

The teacher's lm_head runs once, block by block over the vocabulary, for token chunks; a running top-k
merge and an online log-sum-exp give each token's k most likely ids and their log-probabilities,
normalized over the full vocabulary, without an ``[N, V]`` tensor (working set: ``chunk x block``).
"""

from __future__ import annotations

import torch

from fusedkd._options import compute_dtype
from fusedkd.torch_backend import gemm, tiles
from fusedkd.torch_backend.tiles import MAX_CHUNK, MIN_CHUNK, finite


def _order_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is (value descending, id ascending): the top-k tie rule, made exact.

    The float32 value's bits become an int32 with the same order (negative floats have their magnitude
    bits flipped; -0.0 is first made +0.0), placed above 32 bits that decrease with the id.
    """
    bits = (values + 0.0).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(torch.int64) << 32) | (0xFFFFFFFF - ids)


def ordered_top(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k entries of each row first in (value descending, id ascending) order, in that order.

    `ids` [c, w] or [w] (broadcast). float32 uses exact int64 keys and one topk; float64 a stable sort
    of the values, whose equal entries then keep the increasing-id order of their columns.
    """
    ids = ids.expand_as(values)
    if values.dtype == torch.float32:
        _, order = torch.topk(_order_keys(values, ids), k, dim=-1, sorted=True)
    else:
        increasing = torch.argsort(ids, dim=-1, stable=True)
        values, ids = values.gather(-1, increasing), ids.gather(-1, increasing)
        order = torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]
    return values.gather(-1, order), ids.gather(-1, order)


def block_top(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`ordered_top(values, ids, k)` for a [c, w] block of logits with `ids` [w], without keys for all.

    A plain top-k finds the k largest values; the tie rule only decides their order, done on the k,
    unless the k-th value is tied with an entry left out (more than k entries at or above it in a
    row): then, and for NaN rows, the block takes the exact rule over all its entries. Deciding that
    costs one host synchronization per block on an accelerator (`teacher_topk` runs offline, once).
    """
    top_values, positions = torch.topk(values, k, dim=-1, sorted=False)
    kth = top_values.amin(dim=-1, keepdim=True)
    if bool(((values >= kth).sum(-1) != k).any()):
        return ordered_top(values, ids, k)
    return ordered_top(top_values, ids[positions], k)


def teacher_topk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    temperature: float,
    *,
    chunk_size: int | None = None,
    block_size: int = 8192,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend entry point: checked [N, H] hidden states, a [V, H] head (its first V rows), a [V] bias or
    None -> (ids [N, k] int64, logprobs [N, k] in the compute dtype), by decreasing log-probability, ties
    by increasing id. `chunk_size` None: a ``chunk x block`` float32 tile of `tiles.TILE_BYTES`.
    `logit_scale`, `softcap`: the teacher head's transform (`KDOptions`), applied before the temperature.
    """
    vocab = weight.shape[0]
    block = min(max(block_size, k), vocab)  # a block holds at least k entries, so one topk fills the list
    if chunk_size is None:
        chunk_size = int(min(MAX_CHUNK, max(MIN_CHUNK, tiles.TILE_BYTES // (4 * block))))
    hidden, weight = hidden.detach(), weight.detach()
    bias = None if bias is None else bias.detach()
    dtype = compute_dtype(hidden.dtype)
    n, device = hidden.shape[0], hidden.device
    ids = torch.empty(n, k, dtype=torch.int64, device=device)
    logprobs = torch.empty(n, k, dtype=dtype, device=device)
    block_ids = torch.arange(block, device=device)
    # One logits buffer, reused by every block of every chunk (a block's tile is a contiguous prefix).
    buffer = torch.empty(min(n, chunk_size) * block, dtype=dtype, device=device)
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            rows = slice(start, min(n, start + chunk_size))
            top_values = top_ids = lse = None
            for v0 in range(0, vocab, block):
                v1 = min(vocab, v0 + block)
                # b = head(h W^T + bias) / T for this block.
                count = rows.stop - rows.start
                b = _scaled_logits(
                    buffer[: count * (v1 - v0)].view(count, v1 - v0),
                    hidden[rows],
                    weight[v0:v1],
                    None if bias is None else bias[v0:v1],
                    temperature,
                    logit_scale,
                    softcap,
                )
                # Running top-k: the block's first k, then the first k of (kept so far, block's).
                values, value_ids = block_top(b, block_ids[: v1 - v0] + v0, min(k, v1 - v0))
                # Online log-sum-exp over blocks: LSE = logaddexp(LSE_so_far, LSE(block)), the block's
                # in place (b is not used after).
                block_max = finite(b.amax(dim=-1, keepdim=True))
                block_lse = b.sub_(block_max).exp_().sum(-1).log_().add_(block_max[:, 0])
                lse = block_lse if lse is None else torch.logaddexp(lse, block_lse)
                if top_values is not None:
                    values, value_ids = ordered_top(
                        torch.cat([top_values, values], dim=-1), torch.cat([top_ids, value_ids], dim=-1), k
                    )
                top_values, top_ids = values, value_ids
            ids[rows] = top_ids
            # log p = b - LSE(b). For a confident teacher with large logits the rounding of LSE(b) (an
            # absolute eps |b|) can leave the listed mass above 1, which the losses reject: take the
            # excess, a few units of that rounding, off the listed log-probabilities.
            listed = top_values - lse[:, None]
            logprobs[rows] = listed - torch.logsumexp(listed, dim=-1, keepdim=True).clamp(min=0.0)
    return ids, logprobs


def _scaled_logits(
    out: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """out <- head(hidden @ weight.T + bias) / T, `out` a contiguous tile in the compute dtype (the GEMM
    in the inputs' dtype, as the losses do), head(z) = scale z, then softcap tanh(. / softcap) when
    capped. The GEMM carries scale / T, or tanh's argument scale / softcap (`tiles.gemm_scales`)."""
    folded = logit_scale / (temperature if softcap is None else softcap)
    gemm.project(out, hidden, weight, bias, folded)
    tiles.finish_head(out, folded, logit_scale, softcap, temperature)
    return out
