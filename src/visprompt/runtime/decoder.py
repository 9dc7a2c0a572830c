"""What the scheduler drives: a `Decoder` holds the KV state of many sequences and runs their steps.

- `EmbeddingDecoder` puts a prompt's input embeddings (image tokens already fused) into a lean
  decoder over token slots: `FastLM` (fp32, C++ kernel) or `LlamaCppLM` (quantized). Used for every
  model whose language model is Llama/Mistral/Qwen2-shaped.
- `ReferenceDecoder` runs any transformers-style model's own forward with its own KV cache, one
  sequence at a time: the path for whatever the lean decoders cannot reproduce (cross-attention and
  mixture fusion, other LM architectures, adapters or hooks), and the reference the fast path is
  tested against.

Backends with their own way of running a model (a pretrained HF VLM's generation hooks) implement
the same protocol.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from .prompt import Prompt

__all__ = ["Decoder", "EmbeddingDecoder", "PerSequenceDecoder", "Prompt", "ReferenceDecoder"]


@runtime_checkable
class Decoder(Protocol):
    """Sequences in slots; prefill appends a prompt, decode appends one token to every live sequence."""

    max_batch: int  # how many sequences can be live at once
    max_len: int  # context length of one sequence (prompt + reply)
    supports_kv_export: bool  # export_kv / import_kv work (the prefix cache needs them)

    @property
    def sequences(self) -> list[int]: ...

    def new_sequence(self) -> int: ...

    def free(self, seq: int) -> None: ...

    def length(self, seq: int) -> int: ...

    def prepare(self, prompt: Prompt) -> None:
        """Work a prompt needs before it can prefill (its input embeddings); an error here fails that
        request alone, before it joins a batched prefill."""
        ...

    def prefill(self, seq: int, prompt: Prompt, start: int = 0) -> torch.Tensor:
        """Append prompt tokens start.. to `seq` (0..start-1 are already there); next-token logits [V]."""
        ...

    def prefill_many(self, seqs: Sequence[int], prompts: Sequence[Prompt], starts: Sequence[int]) -> torch.Tensor:
        """`prefill` of several sequences; next-token logits [n, V]."""
        ...

    def decode(self, seqs: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """Append one token to each of `seqs` (every live sequence); next-token logits [B, V]."""
        ...

    def export_kv(self, seq: int, n: int) -> torch.Tensor: ...

    def import_kv(self, seq: int, kv: torch.Tensor) -> None: ...


EmbedFn = Callable[[Prompt], torch.Tensor]  # a prompt -> its input embeddings [T, D]


class EmbeddingDecoder:
    """A lean decoder over input embeddings (`FastLM`, `LlamaCppLM`) behind the `Decoder` protocol."""

    def __init__(self, inner: Any, embed: EmbedFn):
        self.inner = inner
        self.embed = embed
        self.max_batch = int(inner.max_batch)
        self.max_len = int(inner.max_len)
        self.supports_kv_export = bool(getattr(inner, "supports_kv_export", True))

    def embeddings(self, prompt: Prompt) -> torch.Tensor:
        """[T, D] input embeddings of the whole prompt (computed once per prompt)."""
        if prompt._embeds is None:
            prompt._embeds = self.embed(prompt)
        return prompt._embeds

    def prepare(self, prompt: Prompt) -> None:
        self.embeddings(prompt)

    @property
    def sequences(self) -> list[int]:
        return self.inner.sequences

    def new_sequence(self) -> int:
        return self.inner.new_sequence()

    def free(self, seq: int) -> None:
        self.inner.free(seq)

    def length(self, seq: int) -> int:
        return self.inner.length(seq)

    def prefill(self, seq: int, prompt: Prompt, start: int = 0) -> torch.Tensor:
        return self.inner.prefill(seq, self.embeddings(prompt)[start:])

    def prefill_many(self, seqs: Sequence[int], prompts: Sequence[Prompt], starts: Sequence[int]) -> torch.Tensor:
        embeds = [self.embeddings(p)[s:] for p, s in zip(prompts, starts)]
        if hasattr(self.inner, "prefill_many"):
            return self.inner.prefill_many(list(seqs), embeds)
        return torch.stack([self.inner.prefill(s, e) for s, e in zip(seqs, embeds)])

    def decode(self, seqs: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        return self.inner.decode(list(seqs), list(tokens))

    def export_kv(self, seq: int, n: int) -> torch.Tensor:
        return self.inner.export_kv(seq, n)

    def import_kv(self, seq: int, kv: torch.Tensor) -> None:
        self.inner.import_kv(seq, kv)


class PerSequenceDecoder:
    """Slot bookkeeping for decoders that run each sequence through its own forward and cache.
    Subclasses set `max_batch`, `max_len`, `_states`/`_ids` (via `_init_slots`), and implement
    `_new_state`, `length`, `prefill` and `decode`."""

    supports_kv_export = False

    def _init_slots(self, max_batch: int) -> None:
        self.max_batch = int(max_batch)
        self._states: dict[int, Any] = {}
        self._ids = itertools.count()

    def _new_state(self) -> Any:
        raise NotImplementedError

    @property
    def sequences(self) -> list[int]:
        return list(self._states)

    def new_sequence(self) -> int:
        if len(self._states) >= self.max_batch:
            raise RuntimeError(f"all {self.max_batch} sequence slots are in use")
        seq = next(self._ids)
        self._states[seq] = self._new_state()
        return seq

    def free(self, seq: int) -> None:
        del self._states[seq]

    def prepare(self, prompt: Prompt) -> None:
        pass

    def prefill_many(self, seqs: Sequence[int], prompts: Sequence[Prompt], starts: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.prefill(s, p, st) for s, p, st in zip(seqs, prompts, starts)])

    def export_kv(self, seq: int, n: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not export its KV cache")

    def import_kv(self, seq: int, kv: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not import a KV cache")


@dataclass
class _RefState:
    ids: list[int]  # prompt + fed tokens (what an uncached forward re-reads)
    image_embeds: torch.Tensor | None
    cache: Any = None


class ReferenceDecoder(PerSequenceDecoder):
    """Any transformers-style model through its own forward and KV cache, one sequence at a time.

    `model(input_ids [1, T], attention_mask, position_ids, past_key_values, use_cache,
    logits_to_keep[, image_embeds])` must return `.logits` and the cache (`past_key_values`, or
    `cache` in newer transformers). A `VisionLanguageModel` of any fusion and any
    `AutoModelForCausalLM` qualify. With `use_cache=False` every step re-reads the whole sequence
    (the check that the cache changes nothing).
    """

    def __init__(self, model: torch.nn.Module, max_batch: int = 16, use_cache: bool = True, max_len: int | None = None):
        self.model = model
        self._init_slots(max_batch)
        self.use_cache = use_cache
        cfg = getattr(model, "config", None) or getattr(getattr(model, "lm", None), "config", None)
        text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
        self.max_len = int(max_len or getattr(text_cfg, "max_position_embeddings", 0) or 2048)
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"
        self._takes_images = "image_embeds" in params

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _new_state(self) -> _RefState:
        return _RefState([], None)

    def length(self, seq: int) -> int:
        return len(self._states[seq].ids)

    def _forward(self, ids: list[int], state: _RefState, cached: int) -> torch.Tensor:
        """Next-token logits [V] after `ids`, the first `cached` of which are in state.cache."""
        device = self.device
        new = torch.tensor([ids[cached:]], dtype=torch.long, device=device)  # [1, T]
        kwargs: dict[str, Any] = {
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
            "position_ids": torch.arange(cached, len(ids), device=device).unsqueeze(0),
            "use_cache": self.use_cache,
            "logits_to_keep": 1,
        }
        if cached:
            kwargs[self._cache_arg] = state.cache
        elif self._takes_images:
            kwargs["image_embeds"] = state.image_embeds
        out = self.model(new, **kwargs)
        if self.use_cache:
            state.cache = out.get(self._cache_arg) if hasattr(out, "get") else out.past_key_values
        return out.logits[0, -1]

    @torch.inference_mode()
    def prefill(self, seq: int, prompt: Prompt, start: int = 0) -> torch.Tensor:
        if start:
            raise ValueError("the reference decoder takes whole prompts (it has no prefix cache)")
        state = self._states[seq]
        state.ids, state.image_embeds = list(prompt.ids), prompt.image_embeds
        return self._forward(state.ids, state, 0)

    @torch.inference_mode()
    def decode(self, seqs: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        out = []
        for seq, tok in zip(seqs, tokens):
            state = self._states[seq]
            cached = len(state.ids) if self.use_cache else 0
            state.ids.append(int(tok))
            out.append(self._forward(state.ids, state, cached))
        return torch.stack(out)
