"""Next-token choice and stop conditions, shared by every decoder in the runtime."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..errors import VispromptError

if TYPE_CHECKING:
    import torch


@dataclass
class SamplingParams:
    """Generation options shared by every backend. temperature 0 means greedy.

    json_schema: when set, the reply is JSON valid against this JSON Schema. Local backends enforce
    it token by token (runtime/constraint.py, through the scheduler); a backend that calls a remote
    API passes it on as `response_format` (`openai_response_format`).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    json_schema: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise VispromptError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise VispromptError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise VispromptError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise VispromptError(f"top_k must be >= 0, got {self.top_k}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise VispromptError(
                f"json_schema must be a JSON Schema object (dict), got {type(self.json_schema).__name__}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def updated(self, **overrides: Any) -> SamplingParams:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def openai_response_format(schema: dict[str, Any], name: str = "reply") -> dict[str, Any]:
    """A JSON Schema as OpenAI's `response_format` (structured outputs), for backends that call an
    OpenAI-compatible server with `SamplingParams.json_schema`."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A seeded generator when the caller asked for reproducible sampling."""
    import torch

    if params.greedy or params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(params.seed))
    return gen


def choose_next_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one token per row. logits: [B, V] -> [B] (int64).

    Greedy when temperature is 0; otherwise temperature, then top-k, then top-p (nucleus) filtering,
    in the order transformers applies them.
    """
    import torch

    if params.greedy:
        return logits.argmax(dim=-1)
    scores = logits.float() / params.temperature  # [B, V]
    if params.top_k > 0:
        k = min(params.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[:, -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, descending=True, dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the top token always stays.
        drop_sorted = (cum - sorted_scores.softmax(dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
