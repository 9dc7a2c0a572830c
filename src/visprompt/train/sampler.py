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
        lengths: per example (tokens); given, batches hold examples of similar lengths (less
            padding): each window of `GROUP_WINDOW` global batches of the shuffle is sorted by
            length and cut into batches, and the full batches are shuffled again.
    """

    GROUP_WINDOW = 50

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        drop_last: bool = True,
        group: int = 1,
        rank: int = 0,
        world: int = 1,
        lengths: list[int] | None = None,
    ):
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} examples")
        self.n, self.seed, self.drop_last, self.group = n, seed, drop_last, group
        self.global_batch, self.local, self.rank = batch_size * world, batch_size, rank
        self.lengths = torch.tensor(lengths) if lengths is not None else None
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

    def _batches(self) -> list[torch.Tensor]:
        """This epoch's global batches of indices, in order (the same in every process)."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen)
        if self.lengths is not None:
            window = self.global_batch * self.GROUP_WINDOW
            parts = [order[i : i + window] for i in range(0, self.n, window)]
            order = torch.cat([p[torch.argsort(self.lengths[p], descending=True, stable=True)] for p in parts])
        batches = list(order.split(self.global_batch))
        if self.lengths is not None:  # shuffle the full batches; a short last one stays last
            full = len(batches) - (len(batches[-1]) < self.global_batch)
            batches[:full] = [batches[i] for i in torch.randperm(full, generator=gen).tolist()]
        return batches[: self.batches_per_epoch()]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches()[self.start :]:
            yield batch[self.rank * self.local : (self.rank + 1) * self.local].tolist()
