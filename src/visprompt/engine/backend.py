"""What every backend (own models, HF VLMs, the starter, a remote server) offers the layers above.

Conversations are lists of OpenAI/transformers-style messages (see `visprompt.models.chat`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..models.chat import (
    Conversation,
    Message,
    image_sources,
    iter_parts,
    message_text,
    normalize_conversations,
)
from ..runtime.sampling import SamplingParams
from ..runtime.sequence import GenerationResult

__all__ = [
    "Backend",
    "Conversation",
    "GenerationResult",
    "Message",
    "SamplingParams",
    "image_sources",
    "iter_parts",
    "message_text",
    "normalize_conversations",
]


@runtime_checkable
class Backend(Protocol):
    """A model that turns conversations with images into text."""

    name: str

    def generate(self, conversations: list[Conversation], params: SamplingParams) -> list[GenerationResult]:
        """One result per conversation, in order. Conversations may differ in length and image count."""
        ...
