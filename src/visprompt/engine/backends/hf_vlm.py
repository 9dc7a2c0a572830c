"""Pretrained transformers VLMs (LLaVA, LLaVA-NeXT, Qwen2-VL, Idefics3/SmolVLM, ...) as a backend.

    backend = HFVLMBackend.from_pretrained("HuggingFaceTB/SmolVLM-256M-Instruct")   # or a local folder
    [result] = backend.generate([conversation], SamplingParams(max_new_tokens=64))
    for delta in backend.stream(conversation, SamplingParams()):
        print(delta, end="")

The model and processor come from `AutoModelForImageTextToText` / `AutoProcessor`. The decode loop is
our own (not `model.generate`): one prefill with the pixel inputs, then one token per step through the
model's KV cache, with positions and inputs prepared by the model's own generation hooks
(`prepare_inputs_for_generation`, and the position-id preparation transformers' `generate` uses, which
is where Qwen2-VL computes its M-RoPE positions and `rope_deltas`). Greedy output therefore equals
`model.generate(do_sample=False)` token for token, batched with left padding.

A hub id is only read from the local Hugging Face cache: this backend never downloads (the hub is often
unreachable where visprompt runs); `visprompt pull ID` or `allow_download=True` fetches it first.

Not thread-safe: Qwen2-VL keeps `rope_deltas` on the model between steps, so one backend object runs
one generation at a time (callers that serve requests should serialise calls, or batch them).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ...errors import ModelNotFoundError, VispromptError
from ...runtime.sampling import choose_next_tokens, make_generator
from ...runtime.sequence import find_stop
from ..backend import Conversation, GenerationResult, SamplingParams, iter_parts

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


def _looks_like_path(ref: str) -> bool:
    return (
        ref.startswith((".", "/", "~"))
        or os.sep in ref.strip("/").replace("/", "", 1)
        or (os.altsep is not None and os.altsep in ref)
        or ref.count("/") > 1
    )


def _not_cached(ref: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model '{ref}' is not in the local cache and the hub cannot be reached; "
        f"run `visprompt pull {ref}` on a connected machine, or pass a local folder"
    )


def resolve_hf_ref(
    ref: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    allow_download: bool = False,
) -> Path:
    """A local folder for `ref`: the folder itself, or the cached snapshot of a hub id.

    Raises ModelNotFoundError (one line, no traceback) when the folder does not exist or the hub id is
    not cached (and downloading is off or fails).
    """
    text = os.fspath(ref)
    folder = Path(text).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise ModelNotFoundError(f"model '{text}' is a file, not a model folder")
    if _looks_like_path(text):
        raise ModelNotFoundError(f"model folder '{text}' does not exist")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except HFValidationError:
        raise ModelNotFoundError(f"model '{text}' is neither a folder nor a valid hub id") from None
    except (LocalEntryNotFoundError, FileNotFoundError):
        if not allow_download:
            raise _not_cached(text) from None
    try:
        return Path(snapshot_download(text, revision=revision, cache_dir=cache_dir))
    except Exception:  # noqa: BLE001 - offline, unknown repo, gated: all mean "not available here"
        raise _not_cached(text) from None


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
        raise VispromptError(f"cannot load the processor of '{folder}': {_one_line(first)}") from None
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
            f"cannot load the processor of '{folder}': {_one_line(first)} "
            f"(building {name} from its parts failed too: {_one_line(exc)})"
        ) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------------------------------ messages


def _image_src(part: dict) -> Any:
    if part.get("type") == "image":
        return part.get("image", part.get("url", part.get("path")))
    url = part.get("image_url")
    return url.get("url") if isinstance(url, dict) else url


def to_hf_messages(conversation: Conversation) -> tuple[list[dict], list[Any]]:
    """Our messages -> transformers chat messages with `{"type": "image"}` parts, plus the image sources
    in order. Content always becomes a list of parts (what VLM chat templates expect)."""
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
                parts.append({"type": "text", "text": part.get("text", "")})
            else:
                raise VispromptError(f"unsupported content part type {kind!r}")
        messages.append({"role": msg.get("role", "user"), "content": parts})
    return messages, sources


def _load_image(src: Any):
    from ...images import load_image

    return load_image(src)


# ------------------------------------------------------------------------------------------ backend


class HFVLMBackend:
    """A transformers image-text-to-text model behind the Backend protocol."""

    def __init__(self, model, processor, name: str = "hf-vlm"):
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids: list[int] = sorted(
            {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
        )
        pad = getattr(gen_cfg, "pad_token_id", None)
        if pad is None:
            pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.eos_ids[0] if self.eos_ids else 0
        self.pad_id = int(pad)

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        ref: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        cache_dir: str | os.PathLike | None = None,
        revision: str | None = None,
        allow_download: bool = False,
    ) -> HFVLMBackend:
        """Load a local folder or a cached hub id. Never downloads unless `allow_download`."""
        from transformers import AutoModelForImageTextToText

        name = os.fspath(ref)
        folder = resolve_hf_ref(name, cache_dir=cache_dir, revision=revision, allow_download=allow_download)
        _check_vlm_folder(folder, name)
        processor = load_processor(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype)
        model.to(device)
        return cls(model, processor, name=name)

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
        for conv in conversations:
            messages, srcs = to_hf_messages(conv)
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            sources.append(srcs)
        return texts, sources

    def prepare_inputs(self, conversations: list[Conversation]):
        """Processor output (input_ids, attention_mask, pixel inputs...) for a left-padded batch; the same
        inputs `model.generate(**inputs)` would take."""
        texts, sources = self.prompt_texts(conversations)
        images = [_load_image(s) for srcs in sources for s in srcs]
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(self.model.dtype)
            out[k] = v
        return out

    # -- generation ------------------------------------------------------------------------------

    def generate(self, conversations: list[Conversation], params: SamplingParams) -> list[GenerationResult]:
        if not conversations:
            return []
        inputs = self.prepare_inputs(conversations)
        states = None
        for states in self._decode(inputs, params, track_text=bool(params.stop)):
            pass
        return [s.result() for s in states]

    def stream(self, conversation: Conversation, params: SamplingParams) -> Iterator[str]:
        """Text deltas of one conversation as they are decoded; `"".join` of them equals
        `generate([conversation], params)[0].text`. The generator's return value (`yield from`,
        or StopIteration.value) is the GenerationResult."""
        inputs = self.prepare_inputs([conversation])
        state = None
        for (state,) in self._decode(inputs, params, track_text=True):
            delta = state.take_delta()
            if delta:
                yield delta
        return state.result()

    @torch.inference_mode()
    def _decode(self, inputs: dict, params: SamplingParams, track_text: bool = True) -> Iterator[list[_SeqState]]:
        """The decode loop: prefill, then one token per step for every unfinished row. Yields the row
        states after each step. `track_text` decodes the text every step (for stop strings, streaming)."""
        model = self.model
        kwargs = dict(inputs)
        input_ids = kwargs.pop("input_ids")
        batch = input_ids.shape[0]
        attn = kwargs.get("attention_mask")
        prompt_lens = (attn.sum(-1) if attn is not None else torch.full((batch,), input_ids.shape[1])).tolist()
        states = [_SeqState(self.tokenizer, params, int(n), track_text) for n in prompt_lens]
        generator = make_generator(params, device=input_ids.device)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=input_ids.device)

        forward_params = set(inspect.signature(model.forward).parameters)
        cache_key = "cache" if "cache" in forward_params else "past_key_values"
        if attn is None:
            kwargs["attention_mask"] = torch.ones_like(input_ids)
        # Positions: the same preparation `generate` does (left padding shifts them; Qwen2-VL builds its
        # M-RoPE positions and rope_deltas here).
        if "position_ids" in forward_params and hasattr(model, "_prepare_position_ids_for_generation"):
            kwargs["position_ids"] = model._prepare_position_ids_for_generation(input_ids, kwargs)
        if bool((kwargs["attention_mask"] == 1).all()):
            kwargs["attention_mask"] = None  # as generate does: no padding, no mask
        prep_params = inspect.signature(model.prepare_inputs_for_generation).parameters
        uses_cache_position = "cache_position" in prep_params
        first_kw = {"is_first_iteration": True} if "is_first_iteration" in prep_params else {}
        step_kw = {"next_sequence_length": 1} if "next_sequence_length" in prep_params else {}
        if uses_cache_position:  # transformers 4.x: no position preparation above, positions from here
            kwargs["cache_position"] = torch.arange(input_ids.shape[1], device=input_ids.device)
        if "logits_to_keep" in forward_params:
            kwargs["logits_to_keep"] = 1
        kwargs["use_cache"] = True

        model_inputs = model.prepare_inputs_for_generation(input_ids, **first_kw, **kwargs)
        out = model(**model_inputs, return_dict=True)
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for step in range(params.max_new_tokens):
            kwargs = _advance(out, kwargs, cache_key)
            logits = out.logits[:, -1].float()
            nxt = choose_next_tokens(logits, params, generator)
            nxt = torch.where(finished, torch.full_like(nxt, self.pad_id), nxt)
            hit_eos = torch.isin(nxt, eos) & ~finished
            last = step == params.max_new_tokens - 1
            for i, st in enumerate(states):
                if st.done:
                    continue
                st.add(int(nxt[i]), is_eos=bool(hit_eos[i]), last=last)
                if st.done:
                    finished[i] = True
            yield states
            if bool(finished.all()) or last:
                return
            input_ids = torch.cat([input_ids, nxt[:, None]], dim=-1)
            if uses_cache_position:
                kwargs["cache_position"] = kwargs["cache_position"][-1:] + 1
            model_inputs = model.prepare_inputs_for_generation(input_ids, **step_kw, **kwargs)
            out = model(**model_inputs, return_dict=True)


def _advance(outputs, kwargs: dict, cache_key: str) -> dict:
    """Extend the per-step model kwargs by one token, the way transformers' generate does."""
    for key in ("cache", "past_key_values"):  # transformers 5.x, 4.x
        if key in outputs:
            kwargs[cache_key] = outputs[key]
            break
    if (tt := kwargs.get("token_type_ids")) is not None:
        kwargs["token_type_ids"] = torch.cat([tt, tt[:, -1:]], dim=-1)
    if (mm := kwargs.get("mm_token_type_ids")) is not None:
        kwargs["mm_token_type_ids"] = torch.cat([mm, mm.new_zeros((mm.shape[0], 1))], dim=-1)
    if (pos := kwargs.get("position_ids")) is not None:
        kwargs["position_ids"] = torch.cat([pos, pos[..., -1:] + 1], dim=-1)
    if (mask := kwargs.get("attention_mask")) is not None:
        kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
    return kwargs


class _SeqState:
    """One row of a batch: its tokens, decoded text, stop checks and streamed position."""

    def __init__(self, tokenizer, params: SamplingParams, prompt_tokens: int, track_text: bool = True):
        self.tokenizer = tokenizer
        self.stops = [s for s in params.stop if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.prompt_tokens = prompt_tokens
        self.ids: list[int] = []
        self.text = ""
        self.done = False
        self.finish_reason = "length"
        self.sent = 0  # characters of text already streamed
        self.track_text = track_text
        self.eos_hit = False

    def add(self, token: int, *, is_eos: bool, last: bool) -> None:
        self.ids.append(token)
        if is_eos:
            self.done, self.finish_reason, self.eos_hit = True, "stop", True
            return
        if not self.track_text:
            self.done = last
            return
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stops:
            # The whole text: decoding can change earlier characters (a multi-byte character completes),
            # and the earliest match is the one to cut at. Cheap next to a forward pass.
            at = find_stop(self.text, self.stops)
            if at != -1:
                self.text = self.text[:at]
                self.done, self.finish_reason = True, "stop"
                return
        if last:
            self.done = True

    def take_delta(self) -> str:
        """New text that is safe to show: not the start of a stop string, not a half UTF-8 character."""
        end = len(self.text)
        if not self.done:
            end -= self.hold
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.sent:
            return ""
        delta = self.text[self.sent : end]
        self.sent = end
        return delta

    def result(self) -> GenerationResult:
        if not self.track_text:
            shown = self.ids[:-1] if self.eos_hit else self.ids
            self.text = self.tokenizer.decode(shown, skip_special_tokens=True)
        return GenerationResult(
            text=self.text,
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.ids),
            token_ids=list(self.ids),
        )
