"""The `n` choices of one request while the scheduler generates them, seen from the event loop.

The scheduler publishes each choice's events from its own thread; `Completion` hands them to the
event loop (`call_soon_threadsafe`), so a waiting request holds no thread. `events()` yields them
until every choice has finished or the deadline passes; `close()` cancels whatever still runs (the
scheduler drops it at its next step, freeing its batch slot) and settles the queue-depth gauges.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from functools import partial

from ..engine.backend import GenerationResult, RequestHandle, SamplingParams, StreamEvent
from ..errors import VispromptError
from .errors import APIError, from_visprompt
from .metrics import Metrics
from .served_model import Prepared, ServedModel


class Completion:
    """Choices of one request, submitted together.

    Args:
        model: the served backend.
        metrics: queue depth, time to first token and cached tokens are counted here.
        deadline: `time.monotonic()` by which every choice must have finished.
    """

    def __init__(self, model: ServedModel, metrics: Metrics, deadline: float):
        self.model = model
        self.metrics = metrics
        self.deadline = deadline
        self.handles: list[RequestHandle] = []
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, StreamEvent]] = asyncio.Queue()
        self._started: list[bool] = []
        self._finished: list[bool] = []
        self._closed = False

    def submit(self, prepared: Prepared, params: list[SamplingParams]) -> None:
        """Queue one choice per `params` (blocking only for a submit-only backend: call it in a worker
        thread). A choice that cannot be queued cancels the ones before it."""
        self.metrics.submitted(len(params))
        self._started += [False] * len(params)
        self._finished += [False] * len(params)
        try:
            for i, p in enumerate(params):
                self.handles.append(self.model.submit(prepared, p, partial(self._on_event, i)))
        except BaseException:
            for _ in range(len(params) - len(self.handles)):
                self.metrics.sequence_done(started=False)
            self._finished[len(self.handles) :] = [True] * (len(params) - len(self.handles))
            self.close()
            raise

    def _on_event(self, index: int, event: StreamEvent) -> None:
        """Called in the scheduler's thread: hand the event to the loop, never raise there."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))
        except RuntimeError:  # the loop has closed (the server is going down): nobody is listening
            pass

    async def events(self) -> AsyncIterator[tuple[int, StreamEvent]]:
        """(choice index, event) as they come, until every choice has finished.

        Raises `APIError` 504 at the deadline, 400 when a choice failed on the request's own input
        and 500 when it failed otherwise.
        """
        while not all(self._finished):
            left = self.deadline - time.monotonic()
            try:
                index, event = await asyncio.wait_for(self._queue.get(), timeout=max(left, 0.0))
            except asyncio.TimeoutError:
                self.close()
                raise APIError(504, "the request did not finish within --request-timeout", code="timeout") from None
            self._account(index, event)
            if event.finished and event.finish_reason == "error":
                self.close()
                raise self._failure(self.handles[index])
            yield index, event

    def _account(self, index: int, event: StreamEvent) -> None:
        if not self._started[index]:
            self._started[index] = True
            handle = self.handles[index]
            self.metrics.first_token(handle.time_to_first_token, handle.cached_prompt_tokens)
        if event.finished and not self._finished[index]:
            self._finished[index] = True
            self.metrics.sequence_done(started=True)

    @staticmethod
    def _failure(handle: RequestHandle) -> APIError:
        try:
            handle.result(timeout=0)
        except VispromptError as exc:
            return from_visprompt(exc)
        except Exception:
            pass
        return APIError(500, "generation failed inside the server", code="generation_failed")

    async def wait(self) -> list[GenerationResult]:
        """Every choice's result, once all have finished."""
        async for _ in self.events():
            pass
        return [h.result(timeout=0) for h in self.handles]

    def close(self) -> None:
        """Cancel the choices still running and settle the gauges (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for i, handle in enumerate(self.handles):
            if not self._finished[i]:
                handle.cancel()
                self._finished[i] = True
                self.metrics.sequence_done(started=self._started[i])
