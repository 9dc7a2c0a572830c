"""What every backend (own models, HF VLMs, the starter, a remote server) offers the layers above.

The contract (`Backend`): conversations in (lists of OpenAI/transformers-style messages, see
`visprompt.models.chat`), replies out, with the same `SamplingParams` and the same rules everywhere:

- `generate(conversations, params)`: one `GenerationResult` per conversation, batched;
- `stream(conversation, params)`: the reply's text in pieces; joined, they equal `generate`'s text;
- `submit(conversation, params, on_event=None)`: a `RequestHandle` to iterate (text pieces),
  `cancel()` (stops within one decode step) or `result()`;
- `start()` / `close()`: a background thread that steps the scheduler, so any number of threads can
  submit at once and wait; without it, waiting callers step the scheduler themselves.

`ScheduledBackend` implements all of it once over the runtime's scheduler (runtime/scheduler.py): a
backend only says how a conversation becomes a `Prompt` and which decoder runs it. Stop tokens, stop
strings, finish reasons, token counts, whitespace and streaming are the decode core's
(runtime/sequence.py), the same for every backend.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..models.chat import (
    Conversation,
    Message,
    image_sources,
    iter_parts,
    message_text,
    normalize_conversations,
)
from ..runtime.prompt import Prompt
from ..runtime.sampling import SamplingParams
from ..runtime.sequence import DecodeSequence, GenerationResult, StreamEvent

if TYPE_CHECKING:
    from ..runtime.scheduler import RequestHandle, Scheduler

__all__ = [
    "Backend",
    "Conversation",
    "GenerationResult",
    "Message",
    "RequestHandle",
    "ScheduledBackend",
    "StreamEvent",
    "SamplingParams",
    "image_sources",
    "iter_parts",
    "message_text",
    "normalize_conversations",
]


def __getattr__(name: str) -> Any:
    # The scheduler (and torch with it) is imported when first asked for: a backend that answers
    # from what it already knows (the starter's facts) runs in a process that never imports torch.
    if name == "RequestHandle":
        from ..runtime import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def known_answer(prompt: Prompt, params: SamplingParams) -> GenerationResult:
    """The reply to a prompt whose whole answer the backend already knows (`Prompt.answer_complete`),
    through the decode core's rules, as the scheduler ends it: as if the first sampled token were
    the stop token."""
    seq = DecodeSequence(None, params, (), len(prompt.ids), None, prompt.answer_prefix)
    seq.hit_stop_token = True
    seq.finish("stop")
    return seq.result()


@runtime_checkable
class Backend(Protocol):
    """A model that turns conversations with images into text (the contract above)."""

    name: str

    def generate(self, conversations: list[Conversation], params: SamplingParams) -> list[GenerationResult]:
        """One result per conversation, in order. Conversations may differ in length and image count."""
        ...

    def stream(self, conversation: Conversation, params: SamplingParams) -> Iterator[str]:
        """The reply's text in pieces as it is generated."""
        ...

    def submit(
        self, conversation: Conversation, params: SamplingParams, on_event: Callable[[StreamEvent], None] | None = None
    ) -> RequestHandle:
        """Queue one conversation; the handle streams, cancels and returns the result."""
        ...

    def start(self) -> None:
        """Step generation in a background thread (for many submitting threads)."""
        ...

    def close(self) -> None:
        """Stop the background thread, if any."""
        ...


class ScheduledBackend:
    """The `Backend` contract over one `Scheduler`. Subclasses implement `prompts` and `_build_scheduler`
    (and `_scheduler_stale` when the scheduler must be rebuilt, e.g. after the weights changed)."""

    name = "backend"

    def __init__(self) -> None:
        self._scheduler: Scheduler | None = None
        self._scheduler_lock = threading.RLock()
        # One conversation batch becomes prompts at a time: the first call's lazy work (the starter
        # loading its models, a library importing its parts) runs once, in one thread.
        self._prompts_lock = threading.Lock()
        self._background = False

    # -- what a backend provides ----------------------------------------------------------------
    def prompts(self, conversations: list[Conversation]) -> list[Prompt]:
        """Each conversation as the runtime's `Prompt` (token ids, image features, their keys)."""
        raise NotImplementedError

    def _build_scheduler(self) -> Scheduler:
        raise NotImplementedError

    def _scheduler_stale(self) -> bool:
        return False

    def _prompts(self, conversations: list[Conversation]) -> list[Prompt]:
        with self._prompts_lock:
            return self.prompts(conversations)

    # -- the contract ---------------------------------------------------------------------------
    @property
    def scheduler(self) -> Scheduler:
        """The scheduler (built on first use, from any thread; rebuilt when stale)."""
        with self._scheduler_lock:
            if self._scheduler is None or self._scheduler_stale():
                old = self._scheduler
                if old is not None:
                    if old.has_work:
                        raise RuntimeError("the model's weights changed while requests were running")
                    old.stop()
                self._scheduler = self._build_scheduler()
                if self._background:
                    self._scheduler.start()
            return self._scheduler

    def submit(
        self, conversation: Conversation, params: SamplingParams, on_event: Callable[[StreamEvent], None] | None = None
    ) -> RequestHandle:
        """Queue one conversation; returns a RequestHandle (iterate it for text as it is generated,
        `.cancel()` it, `.result()` for the whole reply)."""
        (prompt,) = self._prompts([conversation])
        return self.scheduler.submit(prompt, params, on_event=on_event)

    def stream(self, conversation: Conversation, params: SamplingParams) -> Iterator[str]:
        """Text pieces of the reply as they are generated; joined, they equal `generate`'s text."""
        return iter(self.submit(conversation, params))

    def generate(self, conversations: list[Conversation], params: SamplingParams) -> list[GenerationResult]:
        """One reply per conversation, decoded together (continuous batching)."""
        if not conversations:
            return []
        prompts = self._prompts(conversations)
        if all(p.answer_complete for p in prompts):  # nothing to generate: no model runs (or loads)
            return [known_answer(p, params) for p in prompts]
        sched = self.scheduler
        handles = [sched.submit(p, params) for p in prompts]
        try:
            return [h.result() for h in handles]
        except BaseException:
            for h in handles:  # one failed (or we were interrupted): the others stop too
                h.cancel()
            raise

    def start(self) -> None:
        with self._scheduler_lock:
            self._background = True
            self.scheduler.start()

    def close(self) -> None:
        with self._scheduler_lock:
            self._background = False
            if self._scheduler is not None:
                self._scheduler.stop()
