"""Language models: any transformers causal LM by hub id or folder, the packaged SmolLM2, or a
Llama built from a size spec with random weights."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from .config import VLMConfig
from .hub import quiet_loading, resolve_model_path

PACKAGED_LMS = {"smollm2-135m"}


def scratch_lm_config(cfg: VLMConfig, tokenizer):
    from transformers import LlamaConfig

    if cfg.lm_hidden_size % cfg.lm_heads:
        raise ConfigError(f"lm_hidden_size {cfg.lm_hidden_size} is not divisible by lm_heads {cfg.lm_heads}")
    intermediate = cfg.lm_intermediate_size or 64 * round(8 * cfg.lm_hidden_size / 3 / 64) or 4 * cfg.lm_hidden_size
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.lm_hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=cfg.lm_layers,
        num_attention_heads=cfg.lm_heads,
        num_key_value_heads=cfg.lm_kv_heads,
        max_position_embeddings=cfg.lm_max_position,
        attention_dropout=cfg.lm_dropout,
        tie_word_embeddings=cfg.lm_tie_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_language_model(cfg: VLMConfig, tokenizer=None) -> tuple[nn.Module, Any]:
    """Build the LM per cfg.lm_source. Returns (model, its tokenizer or the one passed in).

    A scratch LM needs `tokenizer` (trained on the data); a pretrained one brings its own.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = cfg.lm_source
    if src == "scratch":
        if tokenizer is None:
            raise ConfigError("a scratch language model needs a tokenizer trained on the data")
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(scratch_lm_config(cfg, tokenizer))
    elif src in PACKAGED_LMS:
        from .gguf import load_gguf_causal_lm, packaged_smollm2_path

        folder, gguf_file = packaged_smollm2_path()
        model, tokenizer = load_gguf_causal_lm(folder, gguf_file)
    else:
        path = resolve_model_path(src)
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def lm_config_dict(model: nn.Module) -> dict[str, Any]:
    d = model.config.to_dict()
    for k in ("transformers_version", "architectures", "_name_or_path"):
        d.pop(k, None)
    return d


def lm_config_from_dict(lm_config: dict[str, Any]):
    """The transformers config saved as a dict by `lm_config_dict`. Read sizes from it through the
    config's own attributes (`get_text_config().hidden_size`): each family names its keys differently
    (GPT-2's `n_embd`, `n_head`), and the attribute map translates."""
    from transformers import AutoConfig

    d = dict(lm_config)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def language_model_from_config(lm_config: dict[str, Any]) -> nn.Module:
    """Rebuild the saved architecture with empty weights (they come from the checkpoint)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(lm_config_from_dict(lm_config))


def text_dims(lm: nn.Module) -> tuple[int, int, int]:
    """(token-embedding width, decoder hidden size, attention heads) of a transformers causal LM.

    The embedding width is what `inputs_embeds` takes; it differs from the hidden size in LMs that
    project their embeddings (OPT's word_embed_proj_dim).
    """
    text = lm.config.get_text_config()
    heads = getattr(text, "num_attention_heads", None) or 0
    return lm.get_input_embeddings().embedding_dim, int(text.hidden_size), int(heads)
