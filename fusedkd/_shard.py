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
