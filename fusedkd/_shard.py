"""A rank's slice of a vocabulary-parallel loss: which vocabulary rows it holds and the collectives that
combine the ranks' per-token numbers (docs/design.md §10).

Kept apart from `fusedkd.vocab_parallel` (which reads DTensors and checks their layout) so that both
backends can take a `VocabShard` without importing the public API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def shard_offsets(rows: int, world: int) -> list[tuple[int, int]]:
    """(offset, rows) of each rank's block when `rows` vocabulary rows are split as ``Shard(0)`` splits
    them (``torch.chunk``: blocks of ceil(rows / world), the last ones shorter or empty)."""
    block = math.ceil(rows / world) if rows else 0
    return [(min(rows, r * block), max(0, min(rows, (r + 1) * block) - r * block)) for r in range(world)]


@dataclass(frozen=True)
class VocabShard:
    """This rank's block of the vocabulary and the process group that holds the others.

    `offset`: the global index of the block's first row; `rows`: how many of its rows count (those
    below `vocab`, the loss's vocabulary size: a padded head's last blocks count fewer, possibly none);
    `block`: ceil(padded rows / world), the rows of the first (largest) block.
    """

    group: object  # a torch.distributed ProcessGroup
    rank: int
    world: int
    offset: int
    rows: int
    block: int
    vocab: int

    def rows_of(self, rank: int) -> int:
        """How many counted rows rank `rank`'s block holds."""
        return max(0, min(self.block, self.vocab - rank * self.block))

    def realigned(self, local: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
        """This rank's counted rows, [offset, offset + self.rows) along `dim`, of a tensor of `rows` rows
        there sharded as ``Shard(dim)`` splits it (`local`: this rank's block of it), when its blocks are
        not this shard's (a teacher head padded to another size than the student's): the rows other
        ranks hold are exchanged point to point, at most |block difference| x rank rows per rank."""
        blocks = shard_offsets(rows, self.world)
        mine_offset, mine_rows = blocks[self.rank]
        shape = list(local.shape)
        shape[dim] = self.rows
        out = local.new_empty(shape)
        ops, landings = [], []
        dist = torch.distributed
        for peer in range(self.world):
            peer_offset, peer_rows = blocks[peer]
            # The rows of mine that `peer` holds.
            first, last = max(self.offset, peer_offset), min(self.offset + self.rows, peer_offset + peer_rows)
            if last > first:
                target = out.narrow(dim, first - self.offset, last - first)
                if peer == self.rank:
                    target.copy_(local.narrow(dim, first - peer_offset, last - first))
                else:
                    buffer = torch.empty_like(target, memory_format=torch.contiguous_format)
                    ops.append(
                        dist.P2POp(dist.irecv, buffer, dist.get_global_rank(self.group, peer), self.group)
                    )
                    landings.append((target, buffer))
            # The rows of `peer` that I hold.
            wanted_offset = min(self.vocab, peer * self.block)
            first, last = (
                max(wanted_offset, mine_offset),
                min(wanted_offset + self.rows_of(peer), mine_offset + mine_rows),
            )
            if peer != self.rank and last > first:
                piece = local.narrow(dim, first - mine_offset, last - first).contiguous()
                ops.append(dist.P2POp(dist.isend, piece, dist.get_global_rank(self.group, peer), self.group))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        for target, buffer in landings:
            target.copy_(buffer)
        return out

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[world, *x.shape]``: every rank's `x`, in rank order (= vocabulary order), on every rank."""
        out = x.new_empty((self.world, *x.shape))
        torch.distributed.all_gather(list(out.unbind(0)), x.contiguous(), group=self.group)
        return out

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """In place: the sum of every rank's `x`."""
        torch.distributed.all_reduce(x, group=self.group)
        return x

    def owned(self, labels: torch.Tensor) -> torch.Tensor:
        """Which of the global `labels` fall in this rank's rows."""
        return (labels >= self.offset) & (labels < self.offset + self.rows)

    def local_labels(self, labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor | None:
        """Labels as indices into this rank's rows; a counted label another rank owns becomes a negative
        index no column matches (and that is not `ignore_index`)."""
        if labels is None:
            return None
        elsewhere = -1 if ignore_index != -1 else -2
        local = torch.where(self.owned(labels), labels - self.offset, elsewhere)
        return torch.where(labels == ignore_index, labels, local)
