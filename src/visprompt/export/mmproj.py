"""The vision half of a LLaVA-style model as the `mmproj` GGUF that llama.cpp's multimodal library
(libmtmd: `llama-mtmd-cli`, `llama-server --mmproj`, Ollama's second FROM) reads.

Tensor names and `clip.*` keys follow llama.cpp's own LLaVA conversion: the CLIP/SigLIP tower as
`v.*` (patch and position embeddings, CLIP's class embedding and pre-layernorm, blocks with
ln1/attn_q/k/v/out/ln2/ffn_up/ffn_down), the projector's two linears as `mm.0` and `mm.2` with
projector type "mlp" (linear, GELU, linear). The hidden state the projector reads is named by
`clip.vision.feature_layer` (transformers' hidden_states index, made non-negative) and only the
blocks up to it are written; no post-layernorm goes in (LLaVA reads a hidden state before it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..runtime.quantized import finish_gguf
from .checks import ExportError, require_llava_compatible

MMPROJ_TYPES = ("f16", "f32")


def feature_layer_index(feature_layer: int, n_layers: int) -> int:
    """transformers' hidden_states index (0: the embeddings, n_layers: the last block's output),
    negative ones counted from the end, as a non-negative index."""
    index = feature_layer if feature_layer >= 0 else n_layers + 1 + feature_layer
    if not 1 <= index <= n_layers:
        raise ExportError(f"vision_feature_layer {feature_layer} does not pick a block's output of {n_layers}")
    return index


def write_mmproj(model, path: str | os.PathLike, dtype: str = "f16") -> Path:
    """Write the vision tower and projector of `model` as an mmproj GGUF file.

    Args:
        model: a VisionLanguageModel that passes `require_llava_compatible`.
        path: the file to write (atomically).
        dtype: "f16" (matrices in half precision, norms and biases in f32) or "f32".

    Returns:
        The path.
    """
    import gguf

    require_llava_compatible(model)
    if dtype not in MMPROJ_TYPES:
        raise ExportError(f"mmproj type must be one of {', '.join(MMPROJ_TYPES)}, got {dtype!r}")
    cfg = model.cfg
    # CLIPVisionModel / SiglipVisionModel (their transformer under .vision_model before transformers 5)
    tower = getattr(model.vision.model, "vision_model", model.vision.model)
    vc = model.vision.model.config
    layers = feature_layer_index(cfg.vision_feature_layer, vc.num_hidden_layers)
    is_clip = model.vision.model_type == "clip_vision_model"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "clip")
    w.add_name("visprompt-mmproj")
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32))
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)  # read by libmtmd versions before projector types
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", int(cfg.image_size))
    w.add_uint32("clip.vision.patch_size", int(vc.patch_size))
    w.add_uint32("clip.vision.embedding_length", int(vc.hidden_size))
    w.add_uint32("clip.vision.feed_forward_length", int(vc.intermediate_size))
    w.add_uint32("clip.vision.projection_dim", int(model.connector.net[4].out_features))
    w.add_uint32("clip.vision.block_count", layers)
    w.add_uint32("clip.vision.attention.head_count", int(vc.num_attention_heads))
    w.add_float32("clip.vision.attention.layer_norm_epsilon", float(vc.layer_norm_eps))
    w.add_array("clip.vision.image_mean", [float(m) for m in cfg.image_mean])
    w.add_array("clip.vision.image_std", [float(s) for s in cfg.image_std])
    w.add_array("clip.vision.feature_layer", [layers])
    # the blocks' activation: GELU (llama.cpp's tanh form) or CLIP's quick GELU (no key)
    w.add_bool("clip.use_gelu", vc.hidden_act != "quick_gelu")

    def add(name: str, t: torch.Tensor) -> None:
        arr = t.detach().float().cpu().numpy()
        half = dtype == "f16" and arr.ndim >= 2
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float16 if half else np.float32))

    emb = tower.embeddings
    add("v.patch_embd.weight", emb.patch_embedding.weight)
    if emb.patch_embedding.bias is not None:
        add("v.patch_embd.bias", emb.patch_embedding.bias)
    add("v.position_embd.weight", emb.position_embedding.weight)
    if is_clip:
        add("v.class_embd", emb.class_embedding)
        add("v.pre_ln.weight", tower.pre_layrnorm.weight)
        add("v.pre_ln.bias", tower.pre_layrnorm.bias)
    for i, layer in enumerate(tower.encoder.layers[:layers]):
        att = layer.self_attn
        for ours, theirs in (("attn_q", att.q_proj), ("attn_k", att.k_proj), ("attn_v", att.v_proj)):
            add(f"v.blk.{i}.{ours}.weight", theirs.weight)
            add(f"v.blk.{i}.{ours}.bias", theirs.bias)
        add(f"v.blk.{i}.attn_out.weight", att.out_proj.weight)
        add(f"v.blk.{i}.attn_out.bias", att.out_proj.bias)
        add(f"v.blk.{i}.ln1.weight", layer.layer_norm1.weight)
        add(f"v.blk.{i}.ln1.bias", layer.layer_norm1.bias)
        add(f"v.blk.{i}.ln2.weight", layer.layer_norm2.weight)
        add(f"v.blk.{i}.ln2.bias", layer.layer_norm2.bias)
        add(f"v.blk.{i}.ffn_up.weight", layer.mlp.fc1.weight)
        add(f"v.blk.{i}.ffn_up.bias", layer.mlp.fc1.bias)
        add(f"v.blk.{i}.ffn_down.weight", layer.mlp.fc2.weight)
        add(f"v.blk.{i}.ffn_down.bias", layer.mlp.fc2.bias)
    add("mm.0.weight", model.connector.net[1].weight)
    add("mm.0.bias", model.connector.net[1].bias)
    add("mm.2.weight", model.connector.net[4].weight)
    add("mm.2.bias", model.connector.net[4].bias)
    return finish_gguf(w, tmp, path)
