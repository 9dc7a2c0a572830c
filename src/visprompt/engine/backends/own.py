"""Backend for visprompt's own VisionLanguageModel folders.

Generation always runs under the continuous-batching scheduler (`runtime/scheduler.py`). By default
its decoder is the lean fp32 one (`runtime/fast_decode.py`), with an image-feature cache and a prefix
KV cache (`runtime/caches.py`). It gives the same tokens as the reference decoder
(`runtime/decoder.ReferenceDecoder`: the model's own forward with its KV cache), which is used when
the fast path cannot reproduce the model (cross-attention or mixture fusion, an architecture other
than Llama/Mistral/Qwen2, adapters or hooks inside the LM) or when asked for (`fast=False`;
`generate(..., use_cache=False)` re-reads the whole sequence every step).

`quantize="q8_0" | "q4_1" | "q4_0"` runs the language model in llama.cpp instead (runtime/quantized.py;
needs llama-cpp-python), behind a quality gate: greedy agreement with the fp32 decoder on a fixed
prompt set must reach `quality_threshold`, else the backend warns and stays on fp32. It is opt-in,
because its output is close to fp32's, not equal.

Caches are keyed by content and checked against the weights' version counters, so training the
model in place (an optimizer step) or loading new weights empties them instead of serving stale
features.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ...images import ImagePreprocessor, image_fingerprint, load_image, read_image_bytes
from ...models.chat import encode_chat, to_chat
from ...models.image_inputs import prepare_images
from ...models.tokenizer import stop_token_ids
from ...models.versions import weights_version
from ...models.vision_language_model import VisionLanguageModel
from ...runtime.caches import ImageFeatureCache, MiB, PrefixKVCache
from ...runtime.decoder import EmbeddingDecoder, Prompt, ReferenceDecoder
from ...runtime.scheduler import Scheduler
from ..backend import Conversation, GenerationResult, SamplingParams, ScheduledBackend

GATE_QUESTIONS = (
    "What is the capital of France?",
    "Describe a sunny day at the beach.",
    "List three colors and one object of each color.",
    "Write two sentences about a cat.",
)


_MAX_ENCODED_KEYS = 4096  # remembered encoded-bytes digests (64 bytes each, a few hundred KB at most)


class OwnVLMBackend(ScheduledBackend):
    def __init__(
        self,
        model: VisionLanguageModel,
        name: str = "visprompt",
        fast: bool = True,
        max_batch: int = 16,
        image_cache_bytes: int = 64 * MiB,
        prefix_cache_bytes: int = 256 * MiB,
        quantize: str | None = None,
        quality_threshold: float = 0.95,
        gate_conversations: Sequence[Conversation] | None = None,
    ):
        super().__init__()
        self._encode_lock = threading.Lock()
        self.model = model.eval()
        self.name = name
        cfg = model.cfg
        self.preprocess = ImagePreprocessor(cfg.image_size, cfg.image_mean, cfg.image_std, cfg.image_resize_mode)
        self.stop_ids = stop_token_ids(model.tokenizer)
        self.fast = fast
        self.max_batch = max_batch
        self.image_cache = ImageFeatureCache(image_cache_bytes)
        self.prefix_cache = PrefixKVCache(prefix_cache_bytes)
        self.quantize = quantize
        self.quality_threshold = quality_threshold
        self.gate_conversations = list(gate_conversations) if gate_conversations is not None else None
        self.quality = None  # the quantized path's Agreement, once measured
        self.decoder_kind = None  # "fp32" or the quantization in use, once the scheduler exists
        self._lm_version: tuple | None = None
        self._vision_version: tuple | None = None
        # sha256 of an image's encoded bytes -> its pixel fingerprint: a file, bytes or data URL seen
        # before is not decoded again when its features are still cached (a follow-up question).
        self._encoded_to_pixels: OrderedDict[str, str] = OrderedDict()

    @property
    def tiled(self) -> bool:
        """Images are tiled (`VLMConfig.image_tiling` anyres): each takes its own number of tokens."""
        return getattr(self.model.cfg, "image_tiling", "none") == "anyres"

    @property
    def image_after_text(self) -> bool:
        """The prompt layout the model was trained on (`VLMConfig.image_after_text`)."""
        return bool(getattr(self.model.cfg, "image_after_text", False))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu", **kwargs) -> OwnVLMBackend:
        return cls(VisionLanguageModel.from_pretrained(folder, device=device), name=str(folder), **kwargs)

    # -- the fast path --------------------------------------------------------------------------
    def fast_path_reason(self) -> str | None:
        """None when the fast runtime reproduces this model; otherwise why it is not used."""
        from ...runtime.fast_decode import unsupported_reason

        if not self.fast:
            return "disabled (fast=False)"
        if getattr(self.model.cfg, "fusion", "prefix") != "prefix" or getattr(self.model, "fusion", None) is not None:
            return f"fusion {self.model.cfg.fusion!r}"
        return unsupported_reason(self.model.lm)

    def _scheduler_stale(self) -> bool:
        # the lean decoders keep packed copies of the LM's weights: new weights need a new decoder
        return self._lm_version is not None and weights_version(self.model.lm) != self._lm_version

    def _build_scheduler(self) -> Scheduler:
        """The scheduler over the fast decoder when it reproduces the model, else the reference one."""
        from ...runtime.fast_decode import FastLM

        self.prefix_cache.clear()
        if self.fast_path_reason() is not None:
            self.decoder_kind, self._lm_version = "reference", None
            return self._scheduler_over(ReferenceDecoder(self.model, max_batch=self.max_batch))
        self._lm_version = weights_version(self.model.lm)
        decoder = self._quantized_decoder() if self.quantize else None
        self.decoder_kind = self.quantize if decoder is not None else "fp32"
        if decoder is None:
            decoder = FastLM(self.model.lm, max_batch=self.max_batch)
        return self._scheduler_over(EmbeddingDecoder(decoder, self._embed_prompt), self.prefix_cache)

    def _scheduler_over(self, decoder, prefix_cache=None) -> Scheduler:
        return Scheduler(
            decoder,
            self.model.tokenizer,
            self.stop_ids,
            image_token_id=self.model.cfg.image_token_id,
            prefix_cache=prefix_cache,
            banned_ids=[self.model.cfg.image_token_id],  # never generate an image slot
        )

    def _embed_prompt(self, prompt: Prompt) -> torch.Tensor:
        """[T, D] input embeddings of a prompt, image tokens fused."""
        with torch.inference_mode():
            ids = torch.tensor([prompt.ids], device=self.model.device)
            return self.model.embed(ids, prompt.image_embeds, strict=True)[0]

    def _quantized_decoder(self):
        """A LlamaCppLM that passed the quality gate, or None (with a warning) to stay on fp32."""
        from ...runtime.fast_decode import FastLM
        from ...runtime.quantized import LlamaCppLM, QuantizedUnavailable, agreement, cached_gguf

        try:
            decoder = LlamaCppLM(cached_gguf(self.model.lm, self.quantize), max_batch=self.max_batch)
        except QuantizedUnavailable as exc:
            warnings.warn(f"quantize={self.quantize!r} unavailable, staying on fp32: {exc}", stacklevel=3)
            return None
        with torch.inference_mode():
            prompts = [self.model.embed(torch.tensor([p]), e)[0] for p, e, _ in self.encode_requests(self._gate_set())]
        self.quality = agreement(FastLM(self.model.lm, max_batch=1, packed=False), decoder, prompts, n_tokens=32)
        if not self.quality.passes(self.quality_threshold):
            warnings.warn(
                f"quantize={self.quantize!r} agrees with fp32 on {100 * self.quality.teacher_forced:.1f}% of greedy tokens, "
                f"under the {100 * self.quality_threshold:.0f}% gate: staying on fp32",
                stacklevel=3,
            )
            decoder.close()
            return None
        return decoder

    def _gate_set(self) -> list[Conversation]:
        if self.gate_conversations is not None:
            return self.gate_conversations
        return [[{"role": "user", "content": q}] for q in GATE_QUESTIONS]

    # -- prompts and images ---------------------------------------------------------------------
    def _check_vision_version(self) -> None:
        version = weights_version(torch.nn.ModuleList([self.model.vision, self.model.connector]))
        if version != self._vision_version:
            self.image_cache.clear()
            self._vision_version = version

    def encode_images(self, images: list) -> tuple[torch.Tensor | None, list[str]]:
        """Embeddings [n, tokens_per_image, D] of PIL images (cached by content) and their fingerprints;
        tiled images (image_tiling anyres): a list of [n_tokens_i, D]."""
        self._check_vision_version()
        return self._encode_images(images)

    def _encode_images(
        self, images: list, keys: list[str | None] | None = None, cached: dict | None = None
    ) -> tuple[torch.Tensor | list[torch.Tensor] | None, list[str]]:
        """encode_images after the weights check. keys: fingerprints already known (None: computed
        here). cached: fingerprint -> features already taken from the cache; their images may be None."""
        if not images:
            return None, []
        keys = [k if k is not None else image_fingerprint(im) for im, k in zip(images, keys or [None] * len(images))]
        cached = cached or {}
        feats: list[torch.Tensor | None] = [cached.get(k) if k in cached else self.image_cache.get(k) for k in keys]
        # one encoder pass per distinct image: concurrent questions about one photo share it
        todo: dict[str, list[int]] = {}
        for i, f in enumerate(feats):
            if f is None:
                todo.setdefault(keys[i], []).append(i)
        if todo:
            model = self.model
            with torch.inference_mode():
                todo_images = [images[where[0]] for where in todo.values()]
                if self.tiled:  # [n_views, 3, H, W] and each image's grid -> [n_tokens_i, D] each
                    pixels, layouts = prepare_images(todo_images, model.cfg, self.preprocess)
                    new = model.encode_images(pixels.to(model.device), layouts)
                else:
                    new = model.encode_images(self.preprocess(todo_images).to(model.device))  # [n, N, D]
            for j, (key, where) in enumerate(todo.items()):
                for i in where:
                    feats[i] = new[j]
                self.image_cache.put(key, new[j])
        if self.tiled:  # token counts differ per image
            return list(feats), keys  # type: ignore[arg-type]
        return torch.stack(feats), keys  # type: ignore[arg-type]

    def _load_unless_cached(self, src, cached: dict, decoded: dict | None = None) -> tuple[object | None, str | None]:
        """(decoded image, its fingerprint or None); or (None, fingerprint) when these exact encoded
        bytes were seen before and their features are still cached -- then put into `cached`. A
        follow-up question about the same file skips decoding and hashing its pixels. decoded:
        digest -> (image, fingerprint) of this batch, so a batch decodes each distinct file once."""
        if isinstance(src, Image.Image):
            return load_image(src), None
        data = read_image_bytes(src)
        digest = hashlib.sha256(data).hexdigest()
        if decoded is not None and digest in decoded:
            return decoded[digest]
        key = self._encoded_to_pixels.get(digest)
        feats = self.image_cache.get(key) if key is not None else None
        if feats is not None:
            self._encoded_to_pixels.move_to_end(digest)
            cached[key] = feats
            return None, key
        image = load_image(data)
        key = image_fingerprint(image)
        if decoded is not None:
            decoded[digest] = (image, key)
        self._encoded_to_pixels[digest] = key
        if len(self._encoded_to_pixels) > _MAX_ENCODED_KEYS:
            self._encoded_to_pixels.popitem(last=False)
        return image, key

    def encode_requests(
        self, conversations: list[Conversation]
    ) -> list[tuple[list[int], torch.Tensor | None, list[str]]]:
        """Per conversation: token ids (image placeholders expanded), its image embeddings, their fingerprints."""
        model, tok = self.model, self.model.tokenizer
        self._check_vision_version()  # changed weights clear the features before any lookup
        out, loaded, counts, cached, decoded = [], [], [], {}, {}
        for conv in conversations:
            chat, srcs = to_chat(conv, model.cfg.image_token, model.cfg.system_prompt)
            out.append(encode_chat(tok, chat, add_generation_prompt=True))
            loaded.extend(self._load_unless_cached(src, cached, decoded) for src in srcs)
            counts.append(len(srcs))
        embeds, keys = self._encode_images([im for im, _ in loaded], [k for _, k in loaded], cached)
        result, k = [], 0
        for ids, n in zip(out, counts):
            mine = embeds[k : k + n] if n else None
            # each image fills as many placeholders as it has tokens (tiled images: by their grid)
            prompt = model.expand_image_placeholders(ids, [len(e) for e in mine] if self.tiled and mine else None)
            result.append((prompt, mine, keys[k : k + n]))
            k += n
        return result

    def encode_prompts(
        self, conversations: list[Conversation]
    ) -> tuple[list[list[int]], torch.Tensor | list[torch.Tensor] | None]:
        """Token ids per conversation (image placeholders expanded) and all image embeddings in order
        (tiled images: a list of [n_tokens_i, D])."""
        reqs = self.encode_requests(conversations)
        embeds = [e for _, e, _ in reqs if e is not None]
        if self.tiled:
            return [p for p, _, _ in reqs], ([t for e in embeds for t in e] or None)
        return [p for p, _, _ in reqs], (torch.cat(embeds) if embeds else None)

    def prompts(self, conversations: list[Conversation]) -> list[Prompt]:
        with self._encode_lock:  # submitting threads share the caches and the digest map
            return [Prompt(ids, embeds, tuple(keys)) for ids, embeds, keys in self.encode_requests(conversations)]

    def generate(
        self, conversations: list[Conversation], params: SamplingParams, use_cache: bool = True
    ) -> list[GenerationResult]:
        """One reply per conversation; `use_cache=False` runs the reference decoder without a KV cache
        (every step re-reads the whole sequence: the check that caching changes nothing)."""
        if use_cache:
            return super().generate(conversations, params)
        sched = self._scheduler_over(ReferenceDecoder(self.model, max_batch=self.max_batch, use_cache=False))
        return [h.result() for h in [sched.submit(p, params) for p in self.prompts(conversations)]]
