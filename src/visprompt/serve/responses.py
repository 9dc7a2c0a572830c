"""The JSON shapes of OpenAI's chat completion API: a whole completion, a streamed chunk, usage.

A stream is `data: <chunk>` lines: for each choice a first chunk with the role, chunks with pieces
of text, a last chunk with an empty delta and its `finish_reason`; with
`stream_options.include_usage` every chunk carries `"usage": null` and one more chunk with no
choices carries the usage; then `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ..engine.backend import GenerationResult

DONE = b"data: [DONE]\n\n"


def new_request_id(prefix: str = "chatcmpl") -> str:
    """An id for a completion (or a task: prefix "task"), its log lines and its `x-request-id` header."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class Envelope:
    """What every object of one completion shares: its id, creation time and model."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def completion(self, results: list[GenerationResult]) -> dict:
        """The non-streamed answer: one choice per result, exact usage over all of them."""
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": None,
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ]
        prompt = results[0].prompt_tokens if results else 0
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage(prompt, sum(r.completion_tokens for r in results)),
        }

    def chunk(self, index: int | None, delta: dict | None = None, finish_reason: str | None = None, **extra) -> bytes:
        """One SSE event: a chunk for choice `index` (None: a chunk without choices). `extra` adds
        top-level fields (`usage`)."""
        choices = (
            []
            if index is None
            else [{"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
        )
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return sse(body)


def sse(value: dict) -> bytes:
    """One server-sent event holding `value` as JSON."""
    return b"data: " + json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
