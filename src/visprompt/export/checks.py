"""What a LLaVA-style export can express, and why a model that does not fit cannot be exported.

`LlavaForConditionalGeneration` (and llama.cpp's `mlp` projector, which mirrors it) computes
`linear_2(gelu(linear_1(hidden_states[layer][:, k:])))` on a CLIP or SigLIP tower and writes the
result over the placeholder tokens' embeddings. A visprompt model exports when it computes exactly
that; every refusal is one line saying which part does not fit.
"""

from __future__ import annotations

from ..errors import VispromptError

VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")
LANGUAGE_MODELS = ("llama", "mistral", "qwen2")


class ExportError(VispromptError):
    """The model cannot be written in the asked format (the message says why, in one line)."""


def llava_unsupported_reason(model) -> str | None:
    """None when `model` (a VisionLanguageModel) is exactly a LLaVA model; else why not, in one line."""
    cfg = model.cfg
    if cfg.fusion != "prefix":
        return f"{cfg.fusion} fusion: LLaVA only writes image tokens over placeholder embeddings (prefix fusion)"
    if getattr(cfg, "image_tiling", "none") != "none":
        return (
            f"image_tiling {cfg.image_tiling!r}: LLaVA reads one view per image (LLaVA-NeXT's layout of tiles "
            "and newline tokens differs from this one)"
        )
    vision_type = model.vision.model_type
    if vision_type not in VISION_TOWERS:
        return f"vision encoder {vision_type!r}: LLaVA exports take a transformers CLIP or SigLIP tower"
    lm_type = getattr(model.lm.config, "model_type", None)
    if lm_type not in LANGUAGE_MODELS:
        return f"language model {lm_type!r}: exports take Llama, Mistral or Qwen2"
    if cfg.connector_pixel_shuffle > 1:
        return (
            "pixel-shuffle connector: LLaVA's projector reads one patch per token, and Idefics3/SmolVLM's "
            "connector (pixel shuffle + one bias-free Linear) cannot express this GELU MLP"
        )
    if cfg.connector_type != "llava":
        return (
            f"connector_type {cfg.connector_type!r} wraps the MLP in an input norm, an output LayerNorm and learned "
            "positions, which LLaVA's linear-GELU-linear projector cannot express (train with connector_type: llava)"
        )
    hidden = model.connector.net[1].out_features
    if hidden != model.lm.config.hidden_size:
        return f"connector hidden size {hidden}: LLaVA's projector is as wide as the LM ({model.lm.config.hidden_size})"
    if vision_type == "siglip_vision_model" and cfg.vision_feature_layer == -1:
        return (
            "SigLIP with vision_feature_layer -1 reads the post-layernormed output, which LLaVA's hidden_states[-1] "
            "lacks: use -2 or lower"
        )
    if any(type(m).__name__.startswith("Lora") for m in model.lm.modules()):
        return "unmerged LoRA adapters: save the model (which merges them) and export the saved folder"
    return None


def require_llava_compatible(model) -> None:
    reason = llava_unsupported_reason(model)
    if reason is not None:
        raise ExportError(f"cannot export as LLaVA: {reason}")
