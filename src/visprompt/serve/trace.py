"""One request's account: the capacity it holds, and the one log line and metrics it ends with.

The log line carries the request id, status, sizes (body bytes, images, their bytes and pixels),
token counts and timings -- never a prompt, an answer, an image or a URL.
"""

from __future__ import annotations

import logging
import time

from .content import ImageStats
from .metrics import Metrics
from .served_model import Capacity

log = logging.getLogger("visprompt.serve")


class RequestTrace:
    """What one request holds and what is said about it when it ends.

    Args:
        rid: the request id.
        capacity: the server's sequence capacity (the trace gives back what it took).
        metrics: the counters the request ends in.
    """

    def __init__(self, rid: str, capacity: Capacity, metrics: Metrics):
        self.rid = rid
        self.capacity = capacity
        self.metrics = metrics
        self.started = time.monotonic()
        self.held = 0
        self.body_bytes = 0
        self.images = ImageStats()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft: float | None = None
        self.status: int | None = None  # a stream's outcome, once known
        self.reason: str | None = None
        self._ended = False

    def hold(self, count: int) -> None:
        """Take `count` more sequences of capacity (a 429 when there is none)."""
        self.capacity.take(count)
        self.held += count

    def tokens(self, prompt_tokens: int, completion_tokens: int, ttft: float | None) -> None:
        self.prompt_tokens, self.completion_tokens, self.ttft = prompt_tokens, completion_tokens, ttft

    def end(self, status: int, reason: str | None = None) -> None:
        """Give back the capacity, count the request and log its line (once; later calls do nothing).

        Args:
            status: the HTTP status answered (499: the client went away first).
            reason: the error code, when there was one.
        """
        if self._ended:
            return
        self._ended = True
        seconds = time.monotonic() - self.started
        self.metrics.answered(status, seconds, self.prompt_tokens, self.completion_tokens, self.images.count)
        self.capacity.give(self.held)  # after the count: a freed slot means the request is counted
        self.held = 0
        log.info(
            "%s status=%d%s body_bytes=%d images=%d image_bytes=%d pixels=%d prompt_tokens=%d "
            "completion_tokens=%d ttft=%s total=%.3fs",
            self.rid,
            status,
            f" reason={reason}" if reason else "",
            self.body_bytes,
            self.images.count,
            self.images.encoded_bytes,
            self.images.pixels,
            self.prompt_tokens,
            self.completion_tokens,
            "-" if self.ttft is None else f"{self.ttft:.3f}s",
            seconds,
        )
