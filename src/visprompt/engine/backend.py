"""What every backend (own models, HF VLMs, the starter, a remote server) offers the layers above.

A *conversation* is a list of OpenAI/transformers-style messages:

    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                  {"type": "text", "text": "What is this?"}]}]

`content` is a string or a list of parts. An image part is `{"type": "image", "image": SRC}` where
SRC is anything `visprompt.images.load_image` takes (path, bytes, data: URL, PIL image), or the
OpenAI form `{"type": "image_url", "image_url": {"url": SRC}}`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from ..errors import VispromptError

Message = dict[str, Any]
Conversation = list[Message]


@dataclass
class SamplingParams:
    """Generation options shared by every backend. temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def updated(self, **overrides: Any) -> SamplingParams:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)


@runtime_checkable
class Backend(Protocol):
    """A model that turns conversations with images into text."""

    name: str

    def generate(self, conversations: list[Conversation], params: SamplingParams) -> list[GenerationResult]:
        """One result per conversation, in order. Conversations may differ in length and image count."""
        ...


def image_sources(message: Message) -> list[Any]:
    """The image sources of one message, in order."""
    content = message.get("content")
    if isinstance(content, str) or content is None:
        return []
    out = []
    for part in content:
        kind = part.get("type")
        if kind == "image":
            out.append(part.get("image", part.get("url", part.get("path"))))
        elif kind == "image_url":
            url = part.get("image_url")
            out.append(url.get("url") if isinstance(url, dict) else url)
    return out


def message_text(message: Message) -> str:
    """The text of one message (parts joined), without images."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def normalize_conversations(conversations: Any) -> tuple[list[Conversation], bool]:
    """Accept one conversation or a list of them; return (list of conversations, was_single)."""
    if isinstance(conversations, dict):
        return [[conversations]], True
    conversations = list(conversations)
    if conversations and isinstance(conversations[0], dict):
        return [conversations], True
    return [list(c) for c in conversations], False


def iter_parts(message: Message) -> Iterable[dict[str, Any]]:
    """Content parts of a message in order; a plain string becomes one text part."""
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content
