"""Continuous batching: requests join and leave a running batch between decode steps.

A `Scheduler` owns one decoder (`FastLM`, or `LlamaCppLM` from `engine/quantized.py`: anything with
`new_sequence / free / prefill / decode / length`) whose KV cache is split into sequence slots.
Each `step()`:

1. drops cancelled requests (their slots are freed at once);
2. admits waiting requests while slots are free: the longest cached prefix of the prompt is copied
   in from the `PrefixKVCache` (if any), the rest of the prompt is prefilled, and the first token is
   sampled (that is the request's time to first token); a step that admitted ends here, unless the
   step before it admitted too (so first tokens are not held back by a decode step, and arrivals
   never starve the running requests);
3. runs one batched decode step for every running request: each row has its own positions, its own
   `SamplingParams` (greedy rows share one argmax, sampled rows use their own seeded generator) and
   its own stop conditions (stop token ids, stop strings, max_new_tokens, the model's context);
4. finishes requests, frees their slots (a freed slot is reused by the next admission) and stores
   their KV (prompt + reply) in the prefix cache for a follow-up turn.

Results match `generation.generate_ids` request by request (same text, token ids, finish reasons and
counts); greedy output does not depend on what else is in the batch.

Streaming: `submit` returns a `RequestHandle`. Iterating it yields text as it becomes safe to show
(complete UTF-8, and never a part of a stop string that may still complete); `on_event` gets a
`StreamEvent` per token and at the end. `handle.cancel()` stops a request between steps (finish
reason "cancelled"). Either drive the scheduler yourself (`step()`, `run()`, or just iterate / call
`handle.result()`, which steps it) or `start()` a background thread that steps while there is work.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import VispromptError
from .caches import PrefixKVCache, token_keys
from .sampling import SamplingParams, choose_next_tokens, make_generator
from .sequence import GenerationResult, find_stop

EmbedFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]  # ([1, T] ids, image embeds) -> [1, T, D]


@dataclass
class StreamEvent:
    request_id: int
    token_id: int | None  # the token this event adds; None when it adds none (an end token, a cancellation)
    text: str  # newly safe text ("" when nothing new can be shown yet)
    finished: bool = False
    finish_reason: str | None = None


@dataclass
class _Request:
    id: int
    prompt: list[int]
    image_embeds: torch.Tensor | None
    image_keys: tuple[str, ...]
    params: SamplingParams
    on_event: Callable[[StreamEvent], None] | None
    generator: torch.Generator | None = None
    seq: int | None = None
    tokens: list[int] = field(default_factory=list)
    pending: int | None = None  # sampled, not yet fed to the model
    hit_eos: bool = False
    finish_reason: str | None = None
    emitted: str = ""
    cancelled: bool = False
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    result: GenerationResult | None = None
    error: BaseException | None = None


class RequestHandle:
    """One submitted request: iterate for streamed text, `result()` for the whole answer."""

    def __init__(self, scheduler: Scheduler, req: _Request):
        self._scheduler = scheduler
        self._req = req
        self._queue: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        self._done = threading.Event()

    @property
    def id(self) -> int:
        return self._req.id

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def token_ids(self) -> list[int]:
        return list(self._req.tokens)

    @property
    def cached_prompt_tokens(self) -> int:
        return self._req.cached_tokens

    @property
    def time_to_first_token(self) -> float | None:
        r = self._req
        return None if r.first_token_at is None else r.first_token_at - r.submitted_at

    def cancel(self) -> None:
        """Stop this request at the next step boundary; its result gets finish_reason "cancelled"."""
        self._scheduler._cancel(self._req)

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until finished (stepping the scheduler unless its thread runs) and return the result."""
        if not self._scheduler.running:
            while not self.done:
                if not self._scheduler.step() and not self.done:
                    raise RuntimeError("scheduler is idle but the request never finished")
        elif not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._req.error is not None:
            raise self._req.error
        assert self._req.result is not None
        return self._req.result

    def events(self) -> Iterator[StreamEvent]:
        """Every StreamEvent of this request, as they happen."""
        while True:
            try:
                ev = self._queue.get_nowait()
            except queue.Empty:
                if self._scheduler.running:
                    ev = self._queue.get()
                else:
                    if not self._scheduler.step():
                        if self._queue.empty():
                            return
                    continue
            if ev.finished and self._req.error is not None:
                raise self._req.error
            yield ev
            if ev.finished:
                return

    def __iter__(self) -> Iterator[str]:
        for ev in self.events():
            if ev.text:
                yield ev.text

    def _publish(self, ev: StreamEvent) -> None:
        self._queue.put(ev)
        if ev.finished:
            self._done.set()


class Scheduler:
    def __init__(
        self,
        decoder: Any,
        embed: EmbedFn,
        tokenizer,
        stop_ids: Sequence[int],
        image_token_id: int = -1,
        prefix_cache: PrefixKVCache | None = None,
        max_batch: int | None = None,
    ):
        self.decoder = decoder
        self.embed = embed
        self.tokenizer = tokenizer
        self.stop_ids = set(int(t) for t in stop_ids)
        self.image_token_id = image_token_id
        self.prefix_cache = prefix_cache if getattr(decoder, "supports_kv_export", True) else None
        self.max_batch = min(max_batch or decoder.max_batch, decoder.max_batch)
        self._ids = itertools.count()
        self._waiting: list[tuple[_Request, RequestHandle]] = []
        self._running: list[tuple[_Request, RequestHandle]] = []
        self._lock = threading.RLock()  # guards the queues
        self._step_lock = threading.Lock()  # one step at a time
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self._last_step_admitted = False
        # Prompts whose KV goes into the prefix cache once their first token is out (see _admit).
        self._pending_stores: list[tuple[_Request, tuple]] = []

    # -- submission -----------------------------------------------------------------------------
    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        image_embeds: torch.Tensor | None = None,
        image_keys: Sequence[str] = (),
        on_event: Callable[[StreamEvent], None] | None = None,
    ) -> RequestHandle:
        """Queue one prompt (token ids with image placeholders expanded; image_embeds
        [n_images, tokens_per_image, D] for its placeholders, in order; image_keys their fingerprints,
        which the prefix cache needs to tell images apart — without them, prompts with images are
        not cached)."""
        if not prompt:
            raise VispromptError("empty prompt")
        if len(prompt) >= self.decoder.max_len:
            raise VispromptError(
                f"prompt of {len(prompt)} tokens does not fit the model's context of {self.decoder.max_len}"
            )
        req = _Request(
            id=next(self._ids),
            prompt=list(prompt),
            image_embeds=image_embeds,
            image_keys=tuple(image_keys),
            params=params,
            on_event=on_event,
            generator=make_generator(params),
            submitted_at=time.perf_counter(),
        )
        handle = RequestHandle(self, req)
        with self._lock:
            self._waiting.append((req, handle))
            self._wake.notify_all()
        return handle

    def _cancel(self, req: _Request) -> None:
        with self._lock:
            req.cancelled = True
            self._wake.notify_all()

    # -- state ----------------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def batch_size(self) -> int:
        return len(self._running)

    # -- the loop -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        """One round: cancellations, admissions, one decode step. True while work remains."""
        with self._step_lock:
            self._store_pending_prompts()
            with self._lock:
                for req, handle in [x for x in self._waiting if x[0].cancelled]:
                    self._waiting.remove((req, handle))
                    self._finish(req, handle, "cancelled")
                for req, handle in [x for x in self._running if x[0].cancelled]:
                    self._finish(req, handle, "cancelled")
                admit = []
                while self._waiting and len(self._running) + len(admit) < self.max_batch:
                    admit.append(self._waiting.pop(0))
            if admit:
                self._admit_all(admit)
            decoding = [(r, h) for r, h in self._running if r.pending is not None and r.finish_reason is None]
            # A step that admitted requests ends there, so their first tokens reach the caller before
            # a decode step runs; the next step always decodes (admissions never starve decoding).
            prefill_only = bool(admit) and not self._last_step_admitted
            self._last_step_admitted = bool(admit)
            if decoding and not prefill_only:
                try:
                    self._decode(decoding)
                except Exception as exc:
                    for req, handle in decoding:
                        self._fail(req, handle, exc)
            self.steps += 1
            return self.has_work

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while self.step():
            pass

    def start(self) -> None:
        """Step in a background thread while there is work (idle otherwise)."""
        if self.running:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="visprompt-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self._running) and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except BaseException as exc:  # fail every request rather than hang their waiters
                with self._lock:
                    for req, handle in self._waiting + self._running:
                        self._fail(req, handle, exc)
                    self._waiting.clear()

    def _fail(self, req: _Request, handle: RequestHandle, exc: BaseException) -> None:
        """End a request with an error: its slot is freed and `result()` raises `exc`."""
        req.error = exc
        req.cancelled = True  # nothing of a failed request goes into the prefix cache
        try:
            self._finish(req, handle, "error")
        except Exception:  # the decoder may be the thing that broke: still release the waiters
            with self._lock:
                if (req, handle) in self._running:
                    self._running.remove((req, handle))
            handle._publish(StreamEvent(req.id, None, "", finished=True, finish_reason="error"))

    # -- admission ------------------------------------------------------------------------------
    def _admit_all(self, admit: list[tuple[_Request, RequestHandle]]) -> None:
        """Admit waiting requests. The first runs alone and its prompt goes into the prefix cache, so
        the others (often the same system prompt and image) find it there; they then prefill together
        in one step when the decoder can (`prefill_many`): a burst of n questions about one image
        reads the weights twice, not n times."""
        together = len(admit) > 1 and hasattr(self.decoder, "prefill_many")
        for req, handle in admit[:1] if together else admit:
            try:
                self._admit(req, handle)
            except Exception as exc:  # this request fails (result() raises); the others go on
                self._fail(req, handle, exc)
        if not together:
            return
        self._store_pending_prompts()
        ready = []
        for req, handle in admit[1:]:
            try:
                ready.append((req, handle, *self._start(req, handle)))
            except Exception as exc:
                self._fail(req, handle, exc)
        if not ready:
            return
        try:
            logits = self.decoder.prefill_many([r.seq for r, *_ in ready], [embeds for *_, embeds in ready])
            toks = self._sample(logits, [r for r, *_ in ready])
        except Exception as exc:
            for req, handle, *_ in ready:
                self._fail(req, handle, exc)
            return
        for (req, handle, keys, _), tok in zip(ready, toks):
            self._first_token(req, handle, keys, tok)

    def _start(self, req: _Request, handle: RequestHandle):
        """Give a request a sequence with its longest cached prefix; returns (its prefix-cache keys or
        None, the input embeddings still to prefill [T, D])."""
        dec = self.decoder
        seq = dec.new_sequence()
        req.seq = seq
        with self._lock:
            self._running.append((req, handle))
        ids = torch.tensor([req.prompt], dtype=torch.long)
        keys = None
        start = 0
        if self.prefix_cache is not None and (req.image_embeds is None or req.image_keys):
            keys = token_keys(req.prompt, self.image_token_id, req.image_keys)
            hit = self.prefix_cache.lookup(keys, limit=len(req.prompt) - 1)  # the last token must run
            if hit is not None:
                dec.import_kv(seq, hit.kv)
                start = hit.length
        req.cached_tokens = start
        embeds = self.embed(ids, req.image_embeds)[0]  # [T, D]
        return keys, embeds[start:]

    def _admit(self, req: _Request, handle: RequestHandle) -> None:
        self._store_pending_prompts()
        keys, embeds = self._start(req, handle)
        logits = self.decoder.prefill(req.seq, embeds)
        self._first_token(req, handle, keys, self._sample(logits.unsqueeze(0), [req])[0])

    def _first_token(self, req: _Request, handle: RequestHandle, keys, tok: int) -> None:
        req.first_token_at = time.perf_counter()
        self._accept(req, handle, tok)  # the first token goes out before any cache bookkeeping
        # Store the prompt soon (not only at the end), so requests admitted after this one share it:
        # before the next admission or at the next step -- after this step returned, so a caller
        # driving the loop itself sees the first token without waiting for the copy.
        if keys is not None and req.seq is not None:
            self._pending_stores.append((req, keys))

    def _store_pending_prompts(self) -> None:
        pending, self._pending_stores = self._pending_stores, []
        for req, keys in pending:
            # A request that finished meanwhile stored its KV (prompt and reply) on release.
            if req.seq is not None and not self.prefix_cache.covers(keys):
                self.prefix_cache.store(keys, self.decoder.export_kv(req.seq, len(req.prompt)))

    # -- decoding -------------------------------------------------------------------------------
    def _decode(self, batch: list[tuple[_Request, RequestHandle]]) -> None:
        dec = self.decoder
        by_seq = {r.seq: (r, h) for r, h in batch}
        seqs = dec.sequences  # every live sequence, in the decoder's own order
        if set(seqs) != set(by_seq):
            raise RuntimeError("decoder sequences and running requests are out of step")
        reqs = [by_seq[s][0] for s in seqs]
        logits = dec.decode(seqs, [r.pending for r in reqs])  # [B, V]
        toks = self._sample(logits, reqs)
        for s, tok in zip(seqs, toks):
            req, handle = by_seq[s]
            self._accept(req, handle, tok)

    def _sample(self, logits: torch.Tensor, reqs: list[_Request]) -> list[int]:
        out: list[int | None] = [None] * len(reqs)
        greedy = [i for i, r in enumerate(reqs) if r.params.greedy]
        if greedy:
            picks = logits[greedy].argmax(dim=-1) if len(greedy) < len(reqs) else logits.argmax(dim=-1)
            for i, t in zip(greedy, picks.tolist()):
                out[i] = t
        for i, r in enumerate(reqs):
            if out[i] is None:
                out[i] = int(choose_next_tokens(logits[i : i + 1], r.params, r.generator)[0])
        return out  # type: ignore[return-value]

    def _accept(self, req: _Request, handle: RequestHandle, tok: int) -> None:
        """Book-keep one sampled token: stop conditions, streaming, finishing."""
        params = req.params
        if tok in self.stop_ids:
            req.hit_eos = True
            self._finish(req, handle, "stop")
            return
        req.tokens.append(tok)
        # Decoded every token: stop strings need it, and a stream may be read at any time.
        text = self.tokenizer.decode(req.tokens, skip_special_tokens=True)
        if params.stop and find_stop(text, params.stop) >= 0:
            self._finish(req, handle, "stop", text, token_id=tok)
            return
        total = len(req.prompt) + len(req.tokens)
        if len(req.tokens) >= params.max_new_tokens or total >= self.decoder.max_len:
            self._finish(req, handle, "length", text, token_id=tok)
            return
        req.pending = tok
        delta = self._safe_delta(req, text)
        self._publish(req, handle, StreamEvent(req.id, tok, delta))

    def _safe_delta(self, req: _Request, text: str) -> str:
        """Text that can be shown now: no half UTF-8 character, no possible start of a stop string."""
        safe = len(text)
        while safe and text[safe - 1] == "\ufffd":
            safe -= 1
        for s in req.params.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[safe - k : safe] == s[:k]:
                    safe -= k
                    break
        if not text[:safe].startswith(req.emitted):
            return ""  # detokenization changed earlier text (rare); wait for the final flush
        delta = text[len(req.emitted) : safe]
        req.emitted += delta
        return delta

    def _finish(
        self, req: _Request, handle: RequestHandle, reason: str, text: str | None = None, token_id: int | None = None
    ) -> None:
        if req.finish_reason is not None and req.result is not None:
            return
        req.finish_reason = reason
        req.pending = None
        req.finished_at = time.perf_counter()
        if req.first_token_at is None:
            req.first_token_at = req.finished_at
        if text is None:
            text = self.tokenizer.decode(req.tokens, skip_special_tokens=True)
        cut = find_stop(text, req.params.stop) if req.params.stop else -1
        if cut >= 0:
            text = text[:cut]
        final = text
        if req.seq is not None:
            self._release(req)
        with self._lock:
            if (req, handle) in self._running:
                self._running.remove((req, handle))
        req.result = GenerationResult(
            text=final.strip(),
            finish_reason=reason,
            prompt_tokens=len(req.prompt),
            completion_tokens=len(req.tokens) + int(req.hit_eos),
            token_ids=list(req.tokens),
        )
        delta = final[len(req.emitted) :] if final.startswith(req.emitted) else ""
        req.emitted += delta
        self._publish(req, handle, StreamEvent(req.id, token_id, delta, finished=True, finish_reason=reason))

    def _release(self, req: _Request) -> None:
        dec = self.decoder
        seq, req.seq = req.seq, None
        try:
            if self.prefix_cache is not None and not req.cancelled and (req.image_embeds is None or req.image_keys):
                n = dec.length(seq)  # prompt + the reply tokens already fed
                keys = token_keys(req.prompt, self.image_token_id, req.image_keys) + tuple(
                    req.tokens[: n - len(req.prompt)]
                )
                if not self.prefix_cache.covers(keys[:n]):
                    self.prefix_cache.store(keys[:n], dec.export_kv(seq, n))
        finally:
            dec.free(seq)

    def _publish(self, req: _Request, handle: RequestHandle, ev: StreamEvent) -> None:
        handle._publish(ev)
        if req.on_event is not None:
            req.on_event(ev)
