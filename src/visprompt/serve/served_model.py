"""The backend as the server drives it: prompts built once per request, choices submitted to the
backend's scheduler, and a bound on how many sequences may be in the server at once.

Every backend built on `ScheduledBackend` (own models, HF VLMs, the starter, the quantized path) is
driven through its prompts and its scheduler: the prompt is built once for all `n` choices, its
length is checked against the model's context before anything is queued, and the choices join the
scheduler's continuous batch beside every other request. A backend that only offers `submit` is
driven through it, one conversation per choice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..engine.backend import Backend, Conversation, RequestHandle, SamplingParams, ScheduledBackend, StreamEvent
from ..runtime.decoder import Prompt
from .errors import APIError


@dataclass
class Prepared:
    """A conversation ready to submit: the runtime's prompt, or for a submit-only backend the
    conversation itself (a prompt does not keep the decoded images alive)."""

    conversation: Conversation | None
    prompt: Prompt | None

    @property
    def prompt_tokens(self) -> int | None:
        return None if self.prompt is None else len(self.prompt.ids)


class Capacity:
    """Sequences admitted to the server (waiting or generating), at most `limit` at once.

    Args:
        limit: the most sequences at once; one more is refused with a 429.
        retry_after: seconds the 429 asks the client to wait.
    """

    def __init__(self, limit: int, retry_after: int):
        self.limit = limit
        self.retry_after = retry_after
        self.used = 0
        self._lock = threading.Lock()

    def take(self, count: int = 1) -> None:
        """Admit `count` more sequences, or raise the 429."""
        with self._lock:
            if self.used + count > self.limit:
                raise APIError(
                    429,
                    f"the server is at its limit of {self.limit} queued and running sequences; retry shortly",
                    code="too_many_requests",
                    headers={"Retry-After": str(self.retry_after)},
                )
            self.used += count

    def give(self, count: int = 1) -> None:
        """Release `count` sequences."""
        with self._lock:
            self.used = max(0, self.used - count)


class ServedModel:
    """One backend behind the server.

    Args:
        backend: the model (its background scheduler thread is started by `start`).
        name: the model id clients see.
        max_queued: sequences that may wait beyond the scheduler's batch.
        retry_after: seconds a 429 asks a client to wait.
    """

    def __init__(self, backend: Backend, name: str, max_queued: int, retry_after: int):
        self.backend = backend
        self.name = name
        self.scheduled = isinstance(backend, ScheduledBackend)
        self.capacity = Capacity(self.max_batch + max_queued, retry_after)

    @property
    def max_batch(self) -> int:
        """Sequences the scheduler decodes together."""
        if self.scheduled:
            return int(self.backend.scheduler.max_batch)
        return int(getattr(self.backend, "max_batch", 1))

    @property
    def context_length(self) -> int | None:
        """Tokens of prompt and reply together that the model holds (None when unknown)."""
        return int(self.backend.scheduler.decoder.max_len) if self.scheduled else None

    def start(self) -> None:
        """Build the scheduler before the first request (which should not pay for it) and start its thread."""
        self.backend.start()

    def close(self) -> None:
        self.backend.close()

    def prepare(self, conversation: Conversation) -> Prepared:
        """Build the conversation's prompt (tokenizing, running the vision encoder). Blocking: run it
        in a worker thread."""
        if not self.scheduled:
            return Prepared(conversation, None)
        (prompt,) = self.backend.prompts([conversation])
        return Prepared(None, prompt)

    def prepare_all(self, conversations: list[Conversation]) -> list[Prepared]:
        """`prepare` for several conversations at once (one batch through the vision encoder)."""
        if not self.scheduled:
            return [Prepared(c, None) for c in conversations]
        return [Prepared(None, p) for p in self.backend.prompts(conversations)]

    def submit(
        self, prepared: Prepared, params: SamplingParams, on_event: Callable[[StreamEvent], None]
    ) -> RequestHandle:
        """Queue one choice; `on_event` is called from the scheduler's thread for each event."""
        if prepared.prompt is None:
            return self.backend.submit(prepared.conversation, params, on_event=on_event)
        return self.backend.scheduler.submit(prepared.prompt, params, on_event=on_event)

    def cache_stats(self) -> dict[str, dict[str, int]]:
        """Hits and misses of the backend's image-feature and prefix caches, where it has them."""
        out = {}
        for kind in ("image", "prefix"):
            cache = getattr(self.backend, f"{kind}_cache", None)
            if cache is not None and hasattr(cache, "stats"):
                out[kind] = cache.stats()
        return out
