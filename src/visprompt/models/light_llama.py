"""A saved Llama-family causal LM and its tokenizer, loaded without importing transformers.

For a fast start of the `starter` (`visprompt describe` in a fresh process): importing transformers
alone takes longer than the whole answer. The lean decoder (`runtime/fast_decode.FastLM`) reads
only a model's weights, its config and its RoPE frequencies, so a module tree with transformers'
attribute names (`model.layers[i].self_attn.q_proj`, `lm_head`, `model.rotary_emb.inv_freq`, ...)
is enough for it, and `tokenizers` with the folder's chat template (rendered by jinja2 the way
transformers renders it) is enough for the prompts. The weights are memory-mapped from
`model.safetensors` (copy-on-write: pages are read when used, nothing is copied up front).

`LightLlama` has no forward pass of its own: run it with `FastLM`. `can_load_light(folder)` says
whether a folder fits (a Llama, Mistral or Qwen2 config with default RoPE, one safetensors file, a
tokenizer.json); otherwise load it with transformers.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .light_tokenizer import LightTokenizer

LIGHT_TYPES = ("llama", "mistral", "qwen2")
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


class LightConfig(SimpleNamespace):
    """A config.json as attributes (what FastLM reads: hidden_size, num_attention_heads, ...)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _rope_theta(cfg: LightConfig) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _rope_type(cfg: LightConfig) -> str:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"


def can_load_light(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a model and tokenizer `load_light_causal_lm` reads."""
    folder = Path(folder)
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    cfg = LightConfig(**raw)
    return (
        raw.get("model_type") in LIGHT_TYPES
        and _rope_type(cfg) == "default"
        and raw.get("hidden_act", "silu") in ("silu", "swish")
        and not raw.get("attention_bias", False)
        and not raw.get("mlp_bias", False)
        and not raw.get("use_sliding_window", False)
        and (folder / "model.safetensors").is_file()
        and (folder / "tokenizer.json").is_file()
    )


class _RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps


class _Attention(nn.Module):
    def __init__(self, cfg: LightConfig, head_dim: int):
        super().__init__()
        kv = cfg.num_key_value_heads or cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * head_dim, cfg.hidden_size, bias=False)


class _MLP(nn.Module):
    def __init__(self, cfg: LightConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)


class _Layer(nn.Module):
    def __init__(self, cfg: LightConfig, head_dim: int):
        super().__init__()
        self.self_attn = _Attention(cfg, head_dim)
        self.mlp = _MLP(cfg)
        self.input_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class _Rotary(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        # as transformers computes the default RoPE frequencies
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = 1.0


class _Model(nn.Module):
    def __init__(self, cfg: LightConfig, head_dim: int):
        super().__init__()
        # _weight: no random init (normal_ on a meta tensor imports torch's compiler stack, ~2 s)
        shape = (cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape))
        self.layers = nn.ModuleList(_Layer(cfg, head_dim) for _ in range(cfg.num_hidden_layers))
        self.norm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb: _Rotary | None = None  # set by the loader, off the meta device (as above, for pow)


class LightLlama(nn.Module):
    """Llama-shaped weights under transformers' names, for `FastLM`; no forward pass."""

    def __init__(self, cfg: LightConfig, generation: dict[str, Any] | None = None):
        super().__init__()
        self.config = cfg
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.model = _Model(cfg, head_dim)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        gen = generation or {}
        self.generation_config = SimpleNamespace(
            eos_token_id=gen.get("eos_token_id", getattr(cfg, "eos_token_id", None)),
            pad_token_id=gen.get("pad_token_id", getattr(cfg, "pad_token_id", None)),
            bos_token_id=gen.get("bos_token_id", getattr(cfg, "bos_token_id", None)),
        )

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, *args, **kwargs):
        raise NotImplementedError("LightLlama holds weights for the lean decoder (FastLM); it has no forward pass")


def mmap_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of a private (copy-on-write) memory map."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which is not read here")
        start, end = info["data_offsets"]
        count = (end - start) // torch.tensor([], dtype=dtype).element_size()
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=base + start)
        out[name] = flat.view(info["shape"])
    return out


def load_light_causal_lm(folder: str | os.PathLike) -> tuple[LightLlama, LightTokenizer]:
    """(model, tokenizer) from a saved model folder that `can_load_light` accepts."""
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    cfg = LightConfig(**raw)
    gen_path = folder / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    with torch.device("meta"):  # no random init: every weight comes from the file
        model = LightLlama(cfg, generation)
    state = mmap_safetensors(folder / "model.safetensors")
    if getattr(cfg, "tie_word_embeddings", False) or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    model.model.rotary_emb = _Rotary(head_dim, _rope_theta(cfg))  # computed on the CPU, not stored
    return model.eval(), LightTokenizer.from_folder(folder)
