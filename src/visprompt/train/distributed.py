"""Training on several processes (`torchrun`): which process this is, and the few collective
operations the trainer needs. One process is the same code with `world == 1`, where every
operation is a no-op.

    torchrun --nproc-per-node 4 -m visprompt.train recipe.yaml                # one machine
    torchrun --nnodes 2 --node-rank 0 --rdzv-endpoint host:29500 ... -m visprompt.train recipe.yaml

CPU processes talk over gloo, GPUs over NCCL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that logs, evaluates and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all processes."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return self.sum([float(flag)])[0] > 0

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every process, in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def setup() -> Dist:
    """This process's place, from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); joins the
    process group on first use. Without torchrun: one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """The module the training step calls: `model` itself, or DistributedDataParallel over it (which
    averages gradients over processes in backward). Parts a batch may not use (no image in a batch,
    frozen parts) are allowed."""
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, find_unused_parameters=True)


def teardown() -> None:
    """Leave the process group (at the end of a torchrun worker)."""
    if dist.is_initialized():
        dist.destroy_process_group()
