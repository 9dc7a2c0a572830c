"""The server's counters, exposed at `/metrics` in Prometheus' text format (version 0.0.4).

    visprompt_requests_total{status="200"}        requests answered, by status code
    visprompt_prompt_tokens_total                 prompt tokens (once per request)
    visprompt_completion_tokens_total             generated tokens, all choices
    visprompt_images_total                        images decoded
    visprompt_request_body_bytes_total            request body bytes read
    visprompt_sequences_waiting                   queue depth: choices submitted, no first token yet
    visprompt_sequences_running                   choices generating
    visprompt_time_to_first_token_seconds         histogram, per choice
    visprompt_request_duration_seconds            histogram, per request
    visprompt_prefix_cached_tokens_total          prompt tokens taken from the prefix KV cache
    visprompt_cache_hits_total{cache="image"}     the backend's image-feature / prefix cache hits
    visprompt_cache_misses_total{cache="image"}   ... and misses

Updated from the event loop and the scheduler's thread alike, under one lock.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    """Cumulative buckets, a sum and a count.

    Args:
        buckets: upper bounds in seconds, ascending (+Inf is added).
    """

    def __init__(self, buckets: Sequence[float]):
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*map(_number, self.bounds), "+Inf"), self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out += [f"{name}_sum {_number(self.sum)}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Everything `/metrics` reports.

    Args:
        cache_stats: returns {"image": {"hits": .., "misses": ..}, "prefix": {...}} at scrape time.
    """

    def __init__(self, cache_stats: Callable[[], dict[str, dict[str, int]]] = dict):
        self._lock = threading.Lock()
        self._cache_stats = cache_stats
        self.requests: defaultdict[int, int] = defaultdict(int)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.images = 0
        self.body_bytes = 0
        self.cached_tokens = 0
        self.waiting = 0
        self.running = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)

    # -- updates --------------------------------------------------------------------------------
    def submitted(self, sequences: int) -> None:
        with self._lock:
            self.waiting += sequences

    def first_token(self, seconds: float | None, cached_tokens: int) -> None:
        with self._lock:
            self.waiting -= 1
            self.running += 1
            self.cached_tokens += cached_tokens
            if seconds is not None:
                self.ttft.observe(seconds)

    def sequence_done(self, started: bool) -> None:
        """A choice ended; `started` when it had produced its first token (else it never left the queue)."""
        with self._lock:
            if started:
                self.running -= 1
            else:
                self.waiting -= 1

    def answered(
        self, status: int, seconds: float, prompt_tokens: int = 0, completion_tokens: int = 0, images: int = 0
    ) -> None:
        with self._lock:
            self.requests[status] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.images += images
            self.duration.observe(seconds)

    def read_body(self, size: int) -> None:
        with self._lock:
            self.body_bytes += size

    # -- exposition -----------------------------------------------------------------------------
    def render(self) -> str:
        """The Prometheus text exposition."""
        caches = self._cache_stats()
        with self._lock:
            lines: list[str] = []
            _family(lines, "visprompt_requests_total", "counter", "Requests answered, by HTTP status.")
            for status in sorted(self.requests) or [200]:
                lines.append(f'visprompt_requests_total{{status="{status}"}} {self.requests.get(status, 0)}')
            for name, kind, text, value in (
                ("visprompt_prompt_tokens_total", "counter", "Prompt tokens of answered requests.", self.prompt_tokens),
                (
                    "visprompt_completion_tokens_total",
                    "counter",
                    "Generated tokens, all choices.",
                    self.completion_tokens,
                ),
                ("visprompt_images_total", "counter", "Images decoded.", self.images),
                ("visprompt_request_body_bytes_total", "counter", "Request body bytes read.", self.body_bytes),
                (
                    "visprompt_sequences_waiting",
                    "gauge",
                    "Queue depth: choices waiting for a first token.",
                    self.waiting,
                ),
                ("visprompt_sequences_running", "gauge", "Choices generating.", self.running),
                (
                    "visprompt_prefix_cached_tokens_total",
                    "counter",
                    "Prompt tokens from the prefix cache.",
                    self.cached_tokens,
                ),
            ):
                _family(lines, name, kind, text)
                lines.append(f"{name} {value}")
            _family(lines, "visprompt_time_to_first_token_seconds", "histogram", "Time to first token per choice.")
            lines += self.ttft.lines("visprompt_time_to_first_token_seconds")
            _family(lines, "visprompt_request_duration_seconds", "histogram", "Time to answer a request.")
            lines += self.duration.lines("visprompt_request_duration_seconds")
        for what in ("hits", "misses"):
            name = f"visprompt_cache_{what}_total"
            _family(lines, name, "counter", f"Cache {what} of the backend's image-feature and prefix caches.")
            lines += [f'{name}{{cache="{cache}"}} {stats.get(what, 0)}' for cache, stats in sorted(caches.items())]
        return "\n".join(lines) + "\n"


def _family(lines: list[str], name: str, kind: str, text: str) -> None:
    lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]


def _number(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else f"{float(x):.1f}"
