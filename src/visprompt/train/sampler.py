"""The order of training batches: a shuffle per epoch that depends only on (seed, epoch), so a
resumed run takes the same batches from the same position as a run that was never stopped, and
several processes split each global batch between them (rank r takes the r-th slice), so that N
processes see the same global batches as one process with an N times larger batch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochBatches(Sampler[list[int]]):
    """Batches of dataset indices for one epoch, starting at batch `start` (a DataLoader's
    `batch_sampler`). Only whole groups of `group` batches are kept (one optimizer step each), so
    a step never spans two epochs.

    Args:
        n: dataset size.
        batch_size: examples per batch and process.
        seed: with `epoch`, fixes the shuffle.
        drop_last: drop a last batch smaller than `batch_size`.
        group: batches per optimizer step (gradient accumulation).
        rank, world: this process's slice of each global batch of `batch_size * world` examples.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, drop_last: bool = True, group: int = 1, rank: int = 0, world: int = 1
    ):
        self.n, self.seed, self.drop_last, self.group = n, seed, drop_last, group
        self.global_batch, self.local, self.rank = batch_size * world, batch_size, rank
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def batches_per_epoch(self) -> int:
        full = self.n // self.global_batch if self.drop_last else -(-self.n // self.global_batch)
        return full - full % self.group

    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch() // self.group

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        for b in range(self.start, self.batches_per_epoch()):
            batch = order[b * self.global_batch : (b + 1) * self.global_batch]
            yield batch[self.rank * self.local : (self.rank + 1) * self.local].tolist()
