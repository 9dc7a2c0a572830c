"""LoRA adapters on the language model, through peft, merged into plain weights on save.

Adapters are injected into the LM in place (`peft.inject_adapter_in_model`), so the rest of the
model keeps calling the same modules. A saved model holds merged weights under the original names:
it loads like any other, with no peft needed at inference.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def add_lora(lm: nn.Module, rank: int, alpha: float, targets: str) -> int:
    """Inject LoRA adapters (A random, B zero: the LM is unchanged until trained); returns their size."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError('lm_lora_rank > 0 needs peft: pip install "visprompt[lora]" (or pip install peft)') from None

    names = [t.strip() for t in targets.split(",") if t.strip()]
    present = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in names if t not in present]
    if not names or missing:
        raise ConfigError(
            f"lm_lora_targets {targets!r}: no Linear layers named {missing or names} in the LM (it has {', '.join(sorted(present))})"
        )
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0), lm)
    return sum(p.numel() for n, p in lm.named_parameters() if "lora_" in n)


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every LoRA layer's delta added to its base weight, under the names the
    model has without adapters (no `base_layer.`, no `lora_` tensors). Tensors are copies."""
    from peft.tuners.lora import LoraLayer

    merged: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
            merged[f"{prefix}.weight"] = (base.weight.detach() + delta).contiguous()
    state = model.state_dict()
    tied = shared_names(state)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if "lora_" in name or name in tied:
            continue
        name = name.replace(".base_layer.", ".")
        out[name] = merged.get(name, tensor.detach()).clone().contiguous()
    return out


def shared_names(state: dict[str, torch.Tensor]) -> set[str]:
    """Names whose tensor shares its memory with an earlier entry (tied weights): a checkpoint
    stores each such tensor once, under its first name, and loading ties it back."""
    seen: set[tuple] = set()
    shared = set()
    for name, tensor in state.items():
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tensor.shape,
            tensor.stride(),
        )
        if key in seen:
            shared.add(name)
        seen.add(key)
    return shared
