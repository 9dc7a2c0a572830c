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


class LightTokenizer:
    """The parts of a transformers tokenizer the starter and the decode core use, over `tokenizers`:
    `__call__`, `decode`, `apply_chat_template`, special tokens and `convert_*`."""

    def __init__(self, tok, config: dict[str, Any], chat_template: str | None):
        self._tok = tok
        self.chat_template = chat_template
        self.padding_side = "left"

        def token(key: str) -> str | None:
            value = config.get(key)
            return value.get("content") if isinstance(value, dict) else value

        self.bos_token, self.eos_token = token("bos_token"), token("eos_token")
        self.unk_token, self.pad_token = token("unk_token"), token("pad_token")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> LightTokenizer:
        from tokenizers import Tokenizer

        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), config, template)

    # ---- ids -----------------------------------------------------------------------------------
    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        """id -> AddedToken (`.content`, `.special`), as transformers' tokenizers have it."""
        return self._tok.get_added_tokens_decoder()

    @property
    def backend_tokenizer(self):
        """The `tokenizers.Tokenizer` underneath (normalizer, pre-tokenizer, model)."""
        return self._tok

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def convert_ids_to_tokens(self, index: int) -> str | None:
        return self._tok.id_to_token(index)

    @property
    def eos_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.pad_token) if self.pad_token else None

    @property
    def bos_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.bos_token) if self.bos_token else None

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    # ---- text ----------------------------------------------------------------------------------
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self._tok.encode(text, add_special_tokens=add_special_tokens).ids}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tokenize: bool = True, add_generation_prompt: bool = False
    ):
        """Render the folder's chat template as transformers does (a sandboxed jinja2 environment
        with trim_blocks and lstrip_blocks)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        text = _compiled(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            unk_token=self.unk_token or "",
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


_TEMPLATES: dict[str, Any] = {}


def _compiled(template: str):
    if template not in _TEMPLATES:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        _TEMPLATES[template] = env.from_string(template)
    return _TEMPLATES[template]
