"""A module's weights version: it changes whenever a parameter (or buffer) is replaced or modified in
place, so caches of what the weights computed (image features, packed decoder weights) know when
they are stale. Version counters only grow, so their sum moves on with any in-place change (every
optimizer step, every `load_state_dict`); the ids tell a replaced tensor."""

from __future__ import annotations

import torch


def weights_version(module: torch.nn.Module, buffers: bool = False) -> tuple:
    """(ids of the tensors, sum of their version counters) over `module`'s parameters (and buffers).
    Walks the modules' own dicts: ~4x cheaper than `module.parameters()`, which matters for a check
    made on every request."""
    tensors: list[torch.Tensor] = []
    stack = [module]
    while stack:
        m = stack.pop()
        tensors.extend(p for p in m._parameters.values() if p is not None)
        if buffers:
            tensors.extend(b for b in m._buffers.values() if b is not None)
        stack.extend(c for c in m._modules.values() if c is not None)
    return (tuple(map(id, tensors)), sum(t._version for t in tensors))
