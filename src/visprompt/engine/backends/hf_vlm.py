"""Pretrained transformers VLMs (LLaVA, LLaVA-NeXT, Qwen2-VL, Idefics3/SmolVLM, ...) as a backend.

    backend = HFVLMBackend.from_pretrained("HuggingFaceTB/SmolVLM-256M-Instruct")   # or a local folder
    [result] = backend.generate([conversation], SamplingParams(max_new_tokens=64))
    for delta in backend.stream(conversation, SamplingParams()):
        print(delta, end="")

The model and processor come from `AutoModelForImageTextToText` / `AutoProcessor`. Generation runs
under the runtime's scheduler like every backend (continuous batching, streaming, cancellation, any
number of submitting threads). When the language model is Llama/Mistral/Qwen2-shaped (LLaVA,
LLaVA-NeXT, Idefics3/SmolVLM) it decodes on the lean fp32 decoder with the image-feature and prefix
caches, the vision tower and connector still running through transformers; otherwise (Qwen2-VL's
M-RoPE, other architectures; `fast_path_reason()` says why) through transformers' own forward and
generation hooks (engine/backends/hf_decoders.py). Either way greedy output equals
`model.generate(do_sample=False)` token for token.

A hub id is only read from the local Hugging Face cache: this backend never downloads (the hub is often
unreachable where visprompt runs); `visprompt pull ID` or `allow_download=True` fetches it first.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ...errors import ModelLoadError, VispromptError, one_line
from ...images import image_fingerprint, load_image
from ...models.chat import control_token_pattern, control_tokens, escape_control_tokens
from ...models.hub import quiet_loading, resolve_model_path
from ...runtime.caches import ImageFeatureCache, MiB, PrefixKVCache
from ...runtime.decoder import EmbeddingDecoder, Prompt
from ...runtime.scheduler import Scheduler
from ..backend import Conversation, ScheduledBackend, iter_parts
from .hf_decoders import HFGenerationDecoder, LanguageModelView, capture_input_embeds

__all__ = ["HFVLMBackend", "is_hf_vlm_folder", "load_processor", "resolve_hf_ref"]

# Processors whose real class needs torchvision (a video processor) and a stand-in that does the
# same thing for images. SmolVLMProcessor = Idefics3Processor + video support (+ num2words).
_PROCESSOR_STAND_INS = {"SmolVLMProcessor": "Idefics3Processor"}


# ------------------------------------------------------------------------------------------ resolving


def _vlm_mapping() -> tuple[set[str], set[str]]:
    """(model_types, architecture class names) that transformers loads as image-text-to-text."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as names,
    )

    types, archs = set(names), set()
    for v in names.values():
        archs.update(v if isinstance(v, (list, tuple)) else [v])
    return types, archs


def _read_config(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_hf_vlm_folder(path: str | os.PathLike) -> bool:
    """True when `path` is a folder whose config.json names a transformers image-text-to-text model."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    cfg = _read_config(folder)
    if cfg is None:
        return False
    types, archs = _vlm_mapping()
    return cfg.get("model_type") in types or any(a in archs for a in (cfg.get("architectures") or []))


# One resolver for every model reference; the name this module has always exported.
resolve_hf_ref = resolve_model_path


def _check_vlm_folder(folder: Path, ref: str) -> None:
    cfg = _read_config(folder)
    if cfg is None:
        raise VispromptError(f"'{ref}' is not a transformers model folder: no readable config.json in {folder}")
    if not is_hf_vlm_folder(folder):
        what = ", ".join(cfg.get("architectures") or []) or cfg.get("model_type") or "unknown model type"
        raise VispromptError(
            f"'{ref}' is not an image-text-to-text model ({what}); the HF VLM backend needs a model that "
            "AutoModelForImageTextToText loads, such as LLaVA, Qwen2-VL or SmolVLM"
        )


# ------------------------------------------------------------------------------------------ processor


def _without_video(cls: type) -> type:
    """A subclass of a processor class that takes no video processor (those need torchvision).

    ProcessorMixin counts its sub-processors from the `__init__` signature, so dropping the
    `video_processor` argument there is enough; images and text go through the original code."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        cls.__init__(
            self,
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )

    sub = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})
    sub.__qualname__ = cls.__qualname__
    return sub


def processor_without_video(cls: type, image_processor, tokenizer, **kwargs):
    """Build processor class `cls` from an image processor and a tokenizer, with no video processor."""
    params = inspect.signature(cls.__init__).parameters
    if "video_processor" in params:
        cls = _without_video(cls)
    return cls(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


def _processor_class_name(folder: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            value = json.loads((folder / name).read_text(encoding="utf-8")).get("processor_class")
        except (OSError, ValueError, AttributeError):
            continue
        if value:
            return value
    cfg = _read_config(folder) or {}
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    return PROCESSOR_MAPPING_NAMES.get(cfg.get("model_type"))


def _pil_image_processor(folder: Path):
    """The folder's image processor, as its PIL variant when the torchvision one cannot be built."""
    import transformers
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(folder)
    except Exception:
        cfg = {}
        for name in ("preprocessor_config.json", "processor_config.json"):
            try:
                data = json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            cfg = data.get("image_processor", data) if name == "processor_config.json" else data
            if cfg:
                break
        base = str(cfg.get("image_processor_type", "")).removesuffix("Fast").removesuffix("Pil")
        pil_cls = getattr(transformers, base + "Pil", None) if base else None
        if pil_cls is None:
            raise
        return pil_cls.from_dict({k: v for k, v in cfg.items() if k != "image_processor_type"})


def load_processor(folder: str | os.PathLike):
    """AutoProcessor for a local folder, rebuilt from its tokenizer and PIL image processor when the real
    processor class cannot be built here (it wants torchvision for a video processor)."""
    import transformers
    from transformers import AutoProcessor, AutoTokenizer

    folder = Path(folder)
    try:
        return AutoProcessor.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - ImportError/OSError/AttributeError depending on the class
        first = exc
    name = _processor_class_name(folder)
    name = _PROCESSOR_STAND_INS.get(name, name)
    cls = getattr(transformers, name, None) if name else None
    if cls is None or not isinstance(cls, type):
        raise VispromptError(f"cannot load the processor of '{folder}': {one_line(first)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        image_processor = _pil_image_processor(folder)
        processor_dict, _ = cls.get_processor_dict(folder)
        params = inspect.signature(cls.__init__).parameters
        skip = {"self", "image_processor", "tokenizer", "video_processor", "feature_extractor", "chat_template"}
        kwargs = {k: v for k, v in processor_dict.items() if k in params and k not in skip}
        chat_template = processor_dict.get("chat_template") or getattr(tokenizer, "chat_template", None)
        return processor_without_video(cls, image_processor, tokenizer, chat_template=chat_template, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise VispromptError(
            f"cannot load the processor of '{folder}': {one_line(first)} "
            f"(building {name} from its parts failed too: {one_line(exc)})"
        ) from None


# ------------------------------------------------------------------------------------------ messages


def _image_src(part: dict) -> Any:
    if part.get("type") == "image":
        return part.get("image", part.get("url", part.get("path")))
    url = part.get("image_url")
    return url.get("url") if isinstance(url, dict) else url


def to_hf_messages(conversation: Conversation, control: re.Pattern | None = None) -> tuple[list[dict], list[Any]]:
    """Our messages -> transformers chat messages with `{"type": "image"}` parts, plus the image sources
    in order. Content always becomes a list of parts (what VLM chat templates expect).

    `control` matches the tokenizer's control tokens; in text they are escaped (`escape_control_tokens`),
    so typed text opens no turn and adds no image slot. (The processor expands image tokens in the
    prompt string, so the text cannot be tokenized apart from it; transformers' own
    `sanitize_control_tokens` is not honoured by processors with their own `__call__`, Idefics3's.)"""
    messages, sources = [], []
    for msg in conversation:
        parts = []
        for part in iter_parts(msg):
            kind = part.get("type")
            if kind in ("image", "image_url"):
                src = _image_src(part)
                if src is None:
                    raise VispromptError("an image part has no image")
                sources.append(src)
                parts.append({"type": "image"})
            elif kind == "text":
                text = part.get("text", "")
                parts.append({"type": "text", "text": escape_control_tokens(text, control) if control else text})
            else:
                raise VispromptError(f"unsupported content part type {kind!r}")
        messages.append({"role": msg.get("role", "user"), "content": parts})
    return messages, sources


# ------------------------------------------------------------------------------------------ backend


class HFVLMBackend(ScheduledBackend):
    """A transformers image-text-to-text model behind the Backend protocol."""

    def __init__(
        self,
        model,
        processor,
        name: str = "hf-vlm",
        fast: bool = True,
        max_batch: int = 16,
        image_cache_bytes: int = 64 * MiB,
        prefix_cache_bytes: int = 256 * MiB,
    ):
        super().__init__()
        self.model = model.eval()
        self.fast = fast
        self.max_batch = max_batch
        self.image_cache = ImageFeatureCache(image_cache_bytes)
        self.prefix_cache = PrefixKVCache(prefix_cache_bytes)
        image_token = getattr(model.config, "image_token_id", None)
        self.image_token_id = int(image_token) if image_token is not None else None
        self.processor = processor
        self.name = name
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = [e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
        pad = getattr(gen_cfg, "pad_token_id", None)
        if pad is None:
            pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.eos_ids[0] if self.eos_ids else 0
        self.pad_id = int(pad)

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    @quiet_loading()
    def from_pretrained(
        cls,
        ref: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        cache_dir: str | os.PathLike | None = None,
        revision: str | None = None,
        allow_download: bool = False,
        **kwargs,
    ) -> HFVLMBackend:
        """Load a local folder or a cached hub id, printing nothing (no progress bars). Never downloads
        unless `allow_download`. Other keyword arguments go to the constructor (fast, max_batch, cache
        sizes)."""
        from transformers import AutoModelForImageTextToText

        name = os.fspath(ref)
        folder = resolve_hf_ref(name, cache_dir=cache_dir, revision=revision, allow_download=allow_download)
        _check_vlm_folder(folder, name)
        processor = load_processor(folder)
        try:
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype)
        except Exception as exc:  # noqa: BLE001 - truncated or mismatched weights, a broken config: many kinds
            raise ModelLoadError(f"cannot load the model in '{folder}': {one_line(exc)}") from None
        model.to(device)
        return cls(model, processor, name=name, **kwargs)

    @property
    def eos_ids(self) -> list[int]:
        """Token ids that end a reply (the generation config's EOS ids); settable."""
        return self._eos_ids

    @eos_ids.setter
    def eos_ids(self, ids) -> None:
        self._eos_ids = sorted({int(t) for t in ids})
        if self._scheduler is not None:  # requests submitted from now on stop at the new ids
            self._scheduler.stop_ids = frozenset(self._eos_ids)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- prompts ---------------------------------------------------------------------------------

    def prompt_texts(self, conversations: list[Conversation]) -> tuple[list[str], list[list[Any]]]:
        """The chat-templated prompt text of each conversation and its image sources."""
        if not (getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)):
            raise VispromptError(
                f"model '{self.name}' has no chat template (a base model?); "
                "the HF VLM backend needs an instruction-tuned checkpoint with one"
            )
        texts, sources = [], []
        pattern = control_token_pattern(control_tokens(self.tokenizer))
        for conv in conversations:
            messages, srcs = to_hf_messages(conv, pattern)
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            sources.append(srcs)
        return texts, sources

    def prepare_inputs(self, conversations: list[Conversation]) -> dict[str, Any]:
        """Processor output (input_ids, attention_mask, pixel inputs...) for a left-padded batch; the same
        inputs `model.generate(**inputs)` would take."""
        texts, sources = self.prompt_texts(conversations)
        images = [load_image(s) for srcs in sources for s in srcs]
        return self._tensors(self.processor(text=texts, images=images or None, padding=True, return_tensors="pt"))

    def _tensors(self, inputs) -> dict[str, Any]:
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(self.model.dtype)
            out[k] = v
        return out

    def prompts(self, conversations: list[Conversation]) -> list[Prompt]:
        """Each conversation through the processor on its own (no padding): its token ids, its
        processor inputs, and its images' fingerprints (the caches tell images apart by them)."""
        texts, sources = self.prompt_texts(conversations)
        out = []
        for text, srcs in zip(texts, sources):
            images = [load_image(s) for s in srcs]
            inputs = self._tensors(self.processor(text=[text], images=images or None, return_tensors="pt"))
            keys = [image_fingerprint(im) for im in images]
            # one key for all the prompt's images: their token runs may differ in length
            key = (hashlib.sha256("|".join(keys).encode()).hexdigest(),) if keys else ()
            out.append(Prompt(inputs["input_ids"][0].tolist(), image_keys=key, inputs=inputs))
        return out

    # -- generation ------------------------------------------------------------------------------

    def fast_path_reason(self) -> str | None:
        """None when the lean decoder runs this model's language model; otherwise why not (the model
        then decodes through transformers' own forward)."""
        from ...runtime.fast_decode import unsupported_reason

        if not self.fast:
            return "disabled (fast=False)"
        if self.model.device.type != "cpu" or self.model.dtype != torch.float32:
            return "the lean decoder runs fp32 on the CPU"
        try:
            view = LanguageModelView(self.model)
        except (AttributeError, NotImplementedError, TypeError) as exc:
            return f"no separate language model to run ({exc})"
        if self.image_token_id is None:
            return "the model config names no image token id"
        return unsupported_reason(view)

    def _build_scheduler(self) -> Scheduler:
        from ...runtime.fast_decode import FastLM

        self.prefix_cache.clear()
        self.image_cache.clear()
        if self.fast_path_reason() is None:
            decoder = EmbeddingDecoder(FastLM(LanguageModelView(self.model), max_batch=self.max_batch), self._embed)
            prefix_cache = self.prefix_cache
        else:
            decoder, prefix_cache = HFGenerationDecoder(self.model, max_batch=self.max_batch), None
        return Scheduler(
            decoder,
            self.tokenizer,
            self.eos_ids,
            image_token_id=self.image_token_id if self.image_token_id is not None else -1,
            prefix_cache=prefix_cache,
        )

    def _embed(self, prompt: Prompt) -> torch.Tensor:
        """[T, D] input embeddings of a prompt: the image features from the cache when these images
        were seen before (the vision tower does not run), else from the model's own forward."""
        ids = torch.tensor(prompt.ids, device=self.device)
        is_image = ids == self.image_token_id
        feats = self.image_cache.get(prompt.image_keys) if prompt.image_keys else None
        if feats is not None and feats.shape[0] == int(is_image.sum()):
            with torch.inference_mode():
                embeds = self.model.get_input_embeddings()(ids)  # [T, D]
                return embeds.masked_scatter(is_image.unsqueeze(-1), feats.to(embeds.dtype))
        embeds = capture_input_embeds(self.model, prompt.inputs)[0]  # [T, D]
        if prompt.image_keys:
            self.image_cache.put(prompt.image_keys, embeds[is_image])
        return embeds
