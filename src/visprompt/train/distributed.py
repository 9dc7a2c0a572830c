"""Training on several processes (`torchrun`): which process this is, and the few collective
operations the trainer needs. One process is the same code with `world == 1`, where every
operation is a no-op.

    torchrun --nproc-per-node 4 -m visprompt.train recipe.yaml                # one machine
    torchrun --nnodes 2 --node-rank 0 --rdzv-endpoint host:29500 ... -m visprompt.train recipe.yaml

CPU processes talk over gloo, GPUs over NCCL.
"""

from __future__ import annotations

import contextlib
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
        # gloo even where CUDA is present: the trainer keeps the model and the batches on the CPU
        dist.init_process_group(backend="gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def wrap(model: torch.nn.Module, d: Dist, fsdp: bool = False) -> torch.nn.Module:
    """The module the training step calls. One process: `model` itself. Several: DDP over it (every
    process holds the whole model; gradients are averaged in backward; parts a batch does not use,
    such as the image path of a text-only batch, are allowed), or with `fsdp` PyTorch's FSDP2
    (`fully_shard`: every transformer block, then the rest, sharded over the processes; gradients
    averaged the same way), for models that do not fit one device."""
    if not d.active:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, find_unused_parameters=True)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of every part (the entries of each ModuleList of 2 or more blocks that
    hold parameters, outermost lists only): FSDP's units."""
    blocks: list[torch.nn.Module] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and not any(name.startswith(t) for t in taken):
            kids = [m for m in module if any(True for _ in m.parameters())]
            if len(kids) == len(module):
                blocks.extend(kids)
                taken.append(name + ".")
    return blocks


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def accumulation_sync(module: torch.nn.Module, last: bool):
    """Gradient accumulation: synchronise gradients only in the backward of a step's last micro-batch."""
    if last:
        if is_sharded(module):
            module.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if is_sharded(module):
        module.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the main process (CPU tensors; empty elsewhere). Collective
    under FSDP: every process calls it."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(folder, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Each process writes its shards of the model and optimizer state (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))


def load_sharded(folder, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Read shards written by `save_sharded` into `module` (and `optimizer`), for any number of
    processes, one included (the checkpoint is resharded as it is read)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is None:
        state = {"model": module.state_dict()}
        dcp.load(state, checkpoint_id=str(folder))
        module.load_state_dict(state["model"])
        return
    model_sd, optim_sd = get_state_dict(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def teardown() -> None:
    """Leave the process group (at the end of a torchrun worker)."""
    if dist.is_initialized():
        dist.destroy_process_group()
