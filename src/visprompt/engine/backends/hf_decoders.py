"""Running a pretrained transformers VLM under the runtime's scheduler.

Two decoders, one protocol (`runtime.decoder.Decoder`):

- The fast path: the VLM's own vision tower and connector make the prompt's input embeddings
  (`capture_input_embeds`: the model's forward runs up to the point where it hands `inputs_embeds`
  to its language model, and stops there), and the lean decoder (`FastLM`) runs the language model
  (`language_model_view`). For LLaVA, LLaVA-NeXT and Idefics3/SmolVLM over Llama, Mistral or Qwen2.
- `HFGenerationDecoder`: transformers' own forward, one sequence at a time, with inputs and positions
  prepared by the model's generation hooks (`prepare_inputs_for_generation`, and the position-id
  preparation `generate` uses, where Qwen2-VL builds its M-RoPE positions). Greedy output equals
  `model.generate(do_sample=False)` token for token. The path for every other model.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...runtime.decoder import PerSequenceDecoder, Prompt


class LanguageModelView(nn.Module):
    """A VLM's language model seen as a causal LM (`.model`, `.lm_head`, `.config`): what FastLM reads."""

    def __init__(self, vlm: nn.Module):
        super().__init__()
        self.model = vlm.get_decoder()
        self.lm_head = vlm.get_output_embeddings()
        self.config = vlm.config.get_text_config()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()


class _Captured(Exception):
    def __init__(self, embeds: torch.Tensor):
        self.embeds = embeds


@torch.inference_mode()
def capture_input_embeds(vlm: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The input embeddings the VLM's forward gives its language model for `inputs` (a processor's
    output for one prompt): text embeddings with the image features merged in. [1, T, D].

    The vision tower and connector run; the language model does not (the forward stops when it is
    called)."""

    def stop(_module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None and args:
            embeds = args[0]
        raise _Captured(embeds)

    handle = vlm.get_decoder().register_forward_pre_hook(stop, with_kwargs=True)
    try:
        vlm(**inputs, use_cache=False)
    except _Captured as got:
        return got.embeds
    finally:
        handle.remove()
    raise RuntimeError(f"{type(vlm).__name__}'s forward never called its language model")


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


@dataclass
class _GenState:
    input_ids: torch.Tensor  # [1, T] prompt + fed tokens
    kwargs: dict[str, Any]
    out: Any = None  # the last forward's output (its cache is read by the next step)


class HFGenerationDecoder(PerSequenceDecoder):
    """A transformers VLM through its own forward and generation hooks, one sequence at a time."""

    def __init__(self, model: nn.Module, max_batch: int = 16):
        self.model = model
        self._init_slots(max_batch)
        text_cfg = model.config.get_text_config()
        self.max_len = int(getattr(text_cfg, "max_position_embeddings", 0) or 2048)
        forward_params = set(inspect.signature(model.forward).parameters)
        self._cache_key = "cache" if "cache" in forward_params else "past_key_values"
        self._position_ids = "position_ids" in forward_params and hasattr(model, "_prepare_position_ids_for_generation")
        self._keep_logits = "logits_to_keep" in forward_params
        prep = inspect.signature(model.prepare_inputs_for_generation).parameters
        self._cache_position = "cache_position" in prep  # transformers 4.x
        self._first_kw = {"is_first_iteration": True} if "is_first_iteration" in prep else {}
        self._step_kw = {"next_sequence_length": 1} if "next_sequence_length" in prep else {}

    def _new_state(self) -> _GenState:
        return _GenState(torch.empty(1, 0, dtype=torch.long), {})

    def length(self, seq: int) -> int:
        return self._states[seq].input_ids.shape[1]

    @torch.inference_mode()
    def prefill(self, seq: int, prompt: Prompt, start: int = 0) -> torch.Tensor:
        if start:
            raise ValueError("this decoder takes whole prompts (it has no prefix cache)")
        model = self.model
        kwargs = dict(prompt.inputs or {})
        input_ids = kwargs.pop("input_ids")  # [1, T]
        kwargs["attention_mask"] = None  # one unpadded prompt: no mask, as generate does
        if self._position_ids:  # Qwen2-VL builds its M-RoPE positions here
            kwargs["position_ids"] = model._prepare_position_ids_for_generation(
                input_ids, {**kwargs, "attention_mask": torch.ones_like(input_ids)}
            )
        if self._cache_position:
            kwargs["cache_position"] = torch.arange(input_ids.shape[1], device=input_ids.device)
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1
        kwargs["use_cache"] = True
        out = model(**model.prepare_inputs_for_generation(input_ids, **self._first_kw, **kwargs), return_dict=True)
        self._states[seq] = _GenState(input_ids, kwargs, out)
        return out.logits[0, -1]

    @torch.inference_mode()
    def decode(self, seqs: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        out = []
        for seq, tok in zip(seqs, tokens):
            st = self._states[seq]
            kwargs = _advance(st.out, st.kwargs, self._cache_key)
            nxt = torch.tensor([[int(tok)]], device=st.input_ids.device)
            st.input_ids = torch.cat([st.input_ids, nxt], dim=-1)
            if self._cache_position:
                kwargs["cache_position"] = kwargs["cache_position"][-1:] + 1
            inputs = self.model.prepare_inputs_for_generation(st.input_ids, **self._step_kw, **kwargs)
            st.out = self.model(**inputs, return_dict=True)
            out.append(st.out.logits[0, -1])
        return torch.stack(out)
