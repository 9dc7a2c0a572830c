"""Which precision a training run computes in: bf16 autocast where the hardware has bf16 units
(AVX512-BF16 or AMX on a CPU), fp32 elsewhere, where bf16 is emulated and runs far slower. The
weights and the optimizer stay fp32 either way."""

from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError
from ..runtime.cpu import cpu_info
from .config import DTYPES


def has_bf16_units() -> bool:
    info = cpu_info()
    return info.has("avx512_bf16") or info.has("amx_bf16")


def choose(setting: str) -> tuple[torch.dtype, str]:
    """(dtype, why) for the recipe's `dtype` setting."""
    if setting not in DTYPES:
        raise ConfigError(f"train.dtype must be one of {', '.join(DTYPES)}, got {setting!r}")
    cpu = cpu_info().summary()
    if setting == "float32":
        return torch.float32, "float32 (as set)"
    if setting == "bfloat16":
        if has_bf16_units():
            return torch.bfloat16, f"bfloat16 autocast (as set; {cpu} has bf16 units)"
        return torch.bfloat16, f"bfloat16 autocast (as set; {cpu} has no bf16 units: expect it far slower than float32)"
    if has_bf16_units():
        return torch.bfloat16, f"bfloat16 autocast ({cpu} has bf16 units)"
    return torch.float32, f"float32 ({cpu} has no bf16 units)"


def autocast(dtype: torch.dtype):
    """The context a training forward runs in."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)
