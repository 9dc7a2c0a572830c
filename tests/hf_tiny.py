"""Tiny random-weight transformers VLM checkpoints, built offline, for tests.

Each `write_*` function writes a complete model folder (config.json, model.safetensors,
generation_config.json, tokenizer files with a chat template, image processor and processor
configs) and returns its path. The folders load back through `AutoProcessor` /
`AutoModelForImageTextToText.from_pretrained` like a real hub checkpoint, and through
`visprompt.engine.backends.hf_vlm.HFVLMBackend.from_pretrained`.

The tokenizer is a byte-level BPE trained on a few sentences (so any text encodes), plus the special
tokens each processor expects. Everything is small enough that a forward pass takes milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from visprompt.engine.backends.hf_vlm import processor_without_video

_SENTENCES = [
    "a photo of a cat sitting on a red mat",
    "What is in this image? Describe it briefly.",
    "The quick brown fox jumps over the lazy dog.",
    "user assistant system User Assistant",
    "hello world, how are you today?",
    "Compare the two pictures and say which one is brighter.",
]

# A ChatML-style template that takes transformers' content parts. IMAGE is replaced per model with
# the text that stands for one image before the processor expands it.
_CHATML = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}IMAGE"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# SmolVLM's own style: "<|im_start|>User:<image>text<end_of_utterance>\nAssistant:".
_SMOLVLM_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def make_tokenizer(
    special_tokens: list[str],
    *,
    eos: str = "<|im_end|>",
    pad: str = "<|endoftext|>",
    bos: str | None = None,
    chat_template: str | None = None,
    vocab_size: int = 320,
):
    """A byte-level BPE tokenizer (transformers `TokenizersBackend`) with the given special tokens."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[pad],
        show_progress=False,
    )
    tok.train_from_iterator(_SENTENCES, trainer)
    named = {"eos_token": eos, "pad_token": pad}
    if bos is not None:
        named["bos_token"] = bos
    extra = [t for t in special_tokens if t not in named.values()]
    out = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=extra, **named)
    # Named tokens that are not in the trained vocab yet.
    out.add_special_tokens({k: v for k, v in named.items()})
    if chat_template is not None:
        out.chat_template = chat_template
    return out


# CLIP tower: 32 px images, 8 px patches -> 16 patch tokens (+ CLS, dropped by the "default" strategy).
_CLIP_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
}


def _llama_text(vocab: int, **kw) -> dict:
    cfg = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    cfg.update(kw)
    return cfg


def _finish(model, processor, tokenizer, folder: Path, *, eos_ids: list[int]) -> Path:
    """Set the generation config (EOS ids, pad), save model and processor, return the folder."""
    from transformers import GenerationConfig

    model.eval()
    gen_cfg = GenerationConfig(
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model.generation_config = gen_cfg
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _init_weights(model, seed: int) -> None:
    """Deterministic random weights with enough spread that greedy decoding is not one repeated token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif name.endswith("weight"):  # norms
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


# ---------------------------------------------------------------------------------------------- LLaVA


def write_llava(folder, seed: int = 0) -> Path:
    """LLaVA-1.5 style: CLIP vision tower (32 px, 8 px patches -> 16 image tokens), llama LM."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessorPil,
        LlavaProcessor,
    )

    folder = Path(folder)
    tok = make_tokenizer(["<image>", "<|im_start|>", "<|im_end|>"], chat_template=_CHATML.replace("IMAGE", "<image>\n"))
    vocab = len(tok)
    cfg = LlavaConfig(
        vision_config=dict(_CLIP_VISION),
        text_config=_llama_text(vocab, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    _init_weights(model, seed)
    ip = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    return _finish(model, proc, tok, folder, eos_ids=[tok.eos_token_id])


def write_llava_next(folder, seed: int = 0) -> Path:
    """LLaVA-NeXT style: AnyRes tiles from `image_grid_pinpoints` (32 px base), CLIP tower, llama LM."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    folder = Path(folder)
    tok = make_tokenizer(["<image>", "<|im_start|>", "<|im_end|>"], chat_template=_CHATML.replace("IMAGE", "<image>\n"))
    vocab = len(tok)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    cfg = LlavaNextConfig(
        vision_config=dict(_CLIP_VISION),
        text_config=_llama_text(vocab, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=pinpoints,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg)
    _init_weights(model, seed)
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    proc = LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    return _finish(model, proc, tok, folder, eos_ids=[tok.eos_token_id])


# -------------------------------------------------------------------------------------------- Qwen2-VL


def write_qwen2_vl(folder, seed: int = 0) -> Path:
    """Qwen2-VL style: 14 px patches merged 2x2 (28 px per image token), M-RoPE, native resolution
    capped at 56x84 px; EOS is both <|im_end|> and <|endoftext|> like the real checkpoints."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
    )

    folder = Path(folder)
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    image_text = "<|vision_start|><|image_pad|><|vision_end|>"
    tok = make_tokenizer(specials, chat_template=_CHATML.replace("IMAGE", image_text))
    vocab = len(tok)
    ids = tok.convert_tokens_to_ids
    cfg = Qwen2VLConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            # head_dim 16 -> 8 rotary frequencies split over (time, height, width)
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": None,
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "mlp_ratio": 2,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    _init_weights(model, seed)
    ip = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 28 * 28, "longest_edge": 56 * 84}, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    # The real class wants a torchvision video processor: build it without one (saved as Qwen2VLProcessor).
    proc = processor_without_video(Qwen2VLProcessor, ip, tok, chat_template=tok.chat_template)
    return _finish(model, proc, tok, folder, eos_ids=[ids("<|im_end|>"), ids("<|endoftext|>")])


# ---------------------------------------------------------------------------------- Idefics3 / SmolVLM


def _idefics3_like(folder, seed: int, model_type: str) -> Path:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessorPil,
    )

    folder = Path(folder)
    specials = ["<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"]
    specials += [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok = make_tokenizer(specials, eos="<end_of_utterance>", bos="<|im_start|>", chat_template=_SMOLVLM_TEMPLATE)
    vocab = len(tok)
    smol = model_type == "smolvlm"
    cfg_cls, model_cls, ip_cls = (
        (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil)
        if smol
        else (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil)
    )
    cfg = cfg_cls(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config=_llama_text(
            vocab, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg)
    _init_weights(model, seed)
    # Tiles of 32 px (4 tokens each after the 2x2 pixel shuffle); images up to 64 px -> at most 2x2 tiles + global.
    ip = ip_cls(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template)
    out = _finish(model, proc, tok, folder, eos_ids=[tok.eos_token_id])
    if smol:
        # Real SmolVLM(2) checkpoints name SmolVLMProcessor, which needs a torchvision video processor:
        # write the folder the way they are published so loading must fall back.
        _patch_json(out / "processor_config.json", {"processor_class": "SmolVLMProcessor"})
        _patch_json(out / "tokenizer_config.json", {"processor_class": "SmolVLMProcessor"})
    return out


def write_idefics3(folder, seed: int = 0) -> Path:
    """Idefics3 / SmolVLM-256M style (model_type idefics3, Idefics3Processor), image splitting on."""
    return _idefics3_like(folder, seed, "idefics3")


def write_smolvlm(folder, seed: int = 0) -> Path:
    """SmolVLM2 style (model_type smolvlm, folder names SmolVLMProcessor), image splitting on."""
    return _idefics3_like(folder, seed, "smolvlm")


def _patch_json(path: Path, updates: dict) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(updates)
    path.write_text(json.dumps(data, indent=2))


WRITERS = {
    "llava": write_llava,
    "llava_next": write_llava_next,
    "qwen2_vl": write_qwen2_vl,
    "idefics3": write_idefics3,
    "smolvlm": write_smolvlm,
}


def make_tiny_starter():
    """The starter backend over random stand-ins: an untrained EfficientNet-Lite0 and a tiny Llama
    with a ChatML template (its weights spread wide, so greedy decoding varies token to token)."""
    from efficientnet_lite_pytorch import EfficientNet
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from visprompt.engine.backends.starter import StarterBackend
    from visprompt.models.efficientnet_lite import EfficientNetLiteEncoder

    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = make_tokenizer(["<|im_start|>"], chat_template=template)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    lm = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in lm.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.4)
    lm.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    encoder = EfficientNetLiteEncoder(EfficientNet.from_name("efficientnet-lite0"))
    return StarterBackend(encoder=encoder, detector=StubDetector(), lm=lm, tokenizer=tok)


class StubDetector:
    """Stands in for the starter's YOLOv4-tiny: returns the detections it was given for every image."""

    names = ("person", "bicycle", "car", "cat", "dog", "cup", "dining table")

    def __init__(self, detections=()):
        self.detections = list(detections)

    def detect(self, image):
        return list(self.detections)
