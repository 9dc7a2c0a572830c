"""Write a visprompt model as a transformers `LlavaForConditionalGeneration` checkpoint.

The folder holds config.json, model.safetensors, generation_config.json and the processor (image
processor, tokenizer, chat template), so `AutoProcessor` + `AutoModelForImageTextToText` (and
vLLM, SGLang) load it like a llava-hf checkpoint. The mapping:

- vision tower: the transformers CLIP/SigLIP model as it is; `vision_feature_layer` as in the
  config (same hidden_states indexing); CLIP's CLS token dropped by the "default" select strategy,
  SigLIP (no CLS) keeps every token ("full");
- projector: the connector's two linears (`net.1`, `net.4`) as `linear_1`, `linear_2`, GELU between;
- language model: its weights and config unchanged; the image placeholder token and its count
  (`image_token_id`, `image_seq_length`) carried over;
- images: the image processor resizes as `image_resize_mode` says (bicubic; "squash" gives the
  same pixels as visprompt, "crop" and "pad" as LLaVA's processor does them, a pixel or so apart);
- generation: the model's stop tokens as EOS, and the placeholder token suppressed as visprompt does.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..files import staged_folder
from ..models.tokenizer import stop_token_ids
from ..models.vision_language_model import VisionLanguageModel, skip_init
from .chat_template import content_parts_template
from .checks import ExportError, require_llava_compatible

CONFIG_NAME = "config.json"


def llava_config(model: VisionLanguageModel):
    """The `LlavaConfig` that describes `model` (which must pass `require_llava_compatible`)."""
    from transformers import LlavaConfig

    cfg = model.cfg
    vision = model.vision.model.config.to_dict()
    text = model.lm.config.to_dict()
    for d in (vision, text):
        for k in ("transformers_version", "architectures", "_name_or_path"):
            d.pop(k, None)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=cfg.image_token_id,
        image_seq_length=cfg.tokens_per_image,
        vision_feature_select_strategy="default" if model.vision.num_leading_tokens else "full",
        vision_feature_layer=cfg.vision_feature_layer,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(model.lm.config, "tie_word_embeddings", False)),
    )


def to_llava(model: VisionLanguageModel):
    """A `LlavaForConditionalGeneration` with `model`'s weights (float32, eval mode)."""
    from transformers import LlavaForConditionalGeneration

    require_llava_compatible(model)
    with skip_init():
        llava = LlavaForConditionalGeneration(llava_config(model))
    parts = llava.model
    with torch.no_grad():
        parts.vision_tower.load_state_dict(model.vision.model.state_dict())
        parts.multi_modal_projector.linear_1.load_state_dict(model.connector.net[1].state_dict())
        parts.multi_modal_projector.linear_2.load_state_dict(model.connector.net[4].state_dict())
        parts.language_model.load_state_dict(model.lm.model.state_dict())
        llava.lm_head.load_state_dict(model.lm.lm_head.state_dict())
    if llava.config.tie_word_embeddings:
        llava.tie_weights()
    llava.generation_config = _generation_config(model)
    return llava.float().eval()


def _generation_config(model: VisionLanguageModel):
    from transformers import GenerationConfig

    tok = model.tokenizer
    stops = stop_token_ids(tok)
    return GenerationConfig(
        eos_token_id=stops if len(stops) > 1 else stops[0],
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        suppress_tokens=[model.cfg.image_token_id],  # an image slot is never generated (as in visprompt)
    )


def image_processor(model: VisionLanguageModel):
    """A LLaVA image processor that resizes and normalises as `model.cfg` says."""
    from transformers import LlavaImageProcessorPil

    cfg = model.cfg
    side = {"height": cfg.image_size, "width": cfg.image_size}
    size = {"shortest_edge": cfg.image_size} if cfg.image_resize_mode == "crop" else side
    return LlavaImageProcessorPil(
        size=size,
        crop_size=side,
        do_center_crop=True,  # a no-op after a square resize; the centre crop of "crop"
        do_pad=cfg.image_resize_mode == "pad",
        resample=3,  # bicubic, as visprompt resizes
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
    )


def llava_processor(model: VisionLanguageModel):
    """`LlavaProcessor` with `model`'s tokenizer and a chat template that takes content parts."""
    from transformers import LlavaProcessor

    cfg = model.cfg
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.chat_template = content_parts_template(tokenizer.chat_template, cfg.image_token, cfg.system_prompt)
    patch = int(model.vision.model.config.patch_size)
    processor = LlavaProcessor(
        image_processor=image_processor(model),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default" if model.vision.num_leading_tokens else "full",
        num_additional_image_tokens=model.vision.num_leading_tokens,
        chat_template=tokenizer.chat_template,
        image_token=cfg.image_token,
    )
    expected = (cfg.image_size // patch) ** 2
    if expected != cfg.tokens_per_image:  # the processor counts placeholders from the image size
        raise ExportError(
            f"the processor would expand an image to {expected} tokens, the model reads {cfg.tokens_per_image}"
        )
    return processor


def export_llava(model: VisionLanguageModel, output: str | Path) -> Path:
    """Write `model` as a LLaVA checkpoint folder (atomically: config.json is written last).

    Args:
        model: a prefix-fusion VisionLanguageModel with a CLIP/SigLIP tower and a "llava" connector.
        output: the folder to write (created; an existing export there is replaced).

    Returns:
        The folder.
    """
    llava = to_llava(model)
    processor = llava_processor(model)
    with staged_folder(output, commit_file=CONFIG_NAME) as tmp:
        processor.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)  # preprocessor_config.json, for readers before transformers 5
        _portable_tokenizer_config(tmp / "tokenizer_config.json")
        llava.save_pretrained(tmp)
    return Path(output)


def _portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class and special tokens as transformers 4 (vLLM, SGLang pins) reads them too."""
    data = json.loads(path.read_text())
    if data.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's name for a tokenizer.json tokenizer
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(data.get("extra_special_tokens"), list):
        data.setdefault("additional_special_tokens", data["extra_special_tokens"])
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
