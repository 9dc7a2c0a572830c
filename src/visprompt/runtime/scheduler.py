"""Continuous batching: the one decode loop every backend generates through.

A `Scheduler` owns one `Decoder` (runtime/decoder.py: the lean fp32 decoder, llama.cpp, or a model's
own forward) whose sequences sit in slots, and one `DecodeSequence` (runtime/sequence.py) per request,
which owns the stop rules and the streamed text. Each `step()`:

1. drops cancelled requests (their slots are freed at once);
2. admits waiting requests while slots are free: the longest cached prefix of the prompt is copied
   in from the `PrefixKVCache` (when the decoder can export its KV), the rest of the prompt is
   prefilled, and the first token is sampled (the request's time to first token); a step that
   admitted ends there, unless the step before it admitted too (so first tokens are not held back by
   a decode step, and arrivals never starve the running requests);
3. runs one batched decode step for every running request: each row has its own position, its own
   `SamplingParams` (greedy rows share one argmax, sampled rows use their own seeded generator), its
   own stop conditions and, with `json_schema`, its own token mask (runtime/constraint.py: a row
   ends as soon as its JSON is complete);
4. finishes requests, frees their slots, and stores their KV (prompt + reply) in the prefix cache
   for a follow-up turn.

Greedy output does not depend on what else is in the batch. `submit` returns a `RequestHandle`:
iterate it for streamed text, `cancel()` it (it stops at the next step: finish reason "cancelled"),
or `result()` for the whole reply. Drive the loop yourself (`step()`, `run()`, or just `result()`,
which steps it) or `start()` a background thread that steps while there is work; `submit` may be
called from any number of threads.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import VispromptError
from .caches import PrefixKVCache, token_keys
from .constraint import JsonSchemaConstraint, json_constraint
from .decoder import Decoder, Prompt
from .sampling import SamplingParams, choose_next_tokens, make_generator
from .sequence import DecodeSequence, GenerationResult, StreamEvent  # noqa: F401 - StreamEvent re-exported


@dataclass
class _Request:
    id: int
    prompt: Prompt
    seq: DecodeSequence
    params: SamplingParams
    on_event: Callable[[StreamEvent], None] | None
    generator: torch.Generator | None = None
    constraint: JsonSchemaConstraint | None = None  # the mask that keeps the reply valid JSON
    slot: int | None = None  # the decoder's sequence id while admitted
    pending: int | None = None  # sampled, not yet fed to the decoder
    cancelled: bool = False
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    result: GenerationResult | None = None
    error: BaseException | None = None
    keys: tuple | None = field(default=None, repr=False)  # prefix-cache keys of the prompt


class RequestHandle:
    """One submitted request: iterate for streamed text, `result()` for the whole reply."""

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
        return list(self._req.seq.token_ids)

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
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if self._scheduler.running:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._done.wait(left if left is None else min(left, 0.1)):
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
            elif not self._scheduler.step() and not self.done:
                raise RuntimeError("scheduler is idle but the request never finished")
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
                    try:
                        ev = self._queue.get(timeout=0.1)
                    except queue.Empty:
                        continue
                else:
                    if not self._scheduler.step() and self._queue.empty():
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
    """Continuous batching over one `Decoder`.

    Args:
        decoder: the sequences' KV state and forward steps.
        tokenizer: decodes replies (incrementally, see `DecodeSequence`).
        stop_ids: token ids that end a reply.
        image_token_id: the image placeholder id: the prefix cache compares image tokens by their
            image's fingerprint.
        prefix_cache: reused prompt KV (only with a decoder that exports it).
        max_batch: at most this many sequences decode together (and the decoder's own limit).
        banned_ids: ids never sampled (a model trained with image placeholders bans them: a generated
            token is text, and a placeholder would read as an image slot).
    """

    def __init__(
        self,
        decoder: Decoder,
        tokenizer,
        stop_ids: Sequence[int],
        image_token_id: int = -1,
        prefix_cache: PrefixKVCache | None = None,
        max_batch: int | None = None,
        banned_ids: Sequence[int] = (),
    ):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.image_token_id = image_token_id
        self.prefix_cache = prefix_cache if decoder.supports_kv_export else None
        self.max_batch = min(max_batch or decoder.max_batch, decoder.max_batch)
        self._banned = torch.tensor(sorted({int(t) for t in banned_ids}), dtype=torch.long) if banned_ids else None
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
        # Prompts whose KV goes into the prefix cache once their first token is out (see _first_token).
        self._pending_stores: list[_Request] = []

    # -- submission -----------------------------------------------------------------------------
    def submit(
        self,
        prompt: Prompt | Sequence[int],
        params: SamplingParams,
        image_embeds: torch.Tensor | None = None,
        image_keys: Sequence[str] = (),
        on_event: Callable[[StreamEvent], None] | None = None,
    ) -> RequestHandle:
        """Queue one prompt: a `Prompt`, or token ids (image placeholders expanded) with image_embeds
        [n_images, tokens_per_image, D] for its placeholders and image_keys their fingerprints."""
        if not isinstance(prompt, Prompt):
            prompt = Prompt(list(prompt), image_embeds, tuple(image_keys))
        if not prompt.ids:
            raise VispromptError("empty prompt")
        if len(prompt.ids) >= self.decoder.max_len:
            raise VispromptError(
                f"the prompt has {len(prompt.ids)} tokens, which does not fit the model's context of "
                f"{self.decoder.max_len} tokens with room for a reply"
            )
        seq = DecodeSequence(
            self.tokenizer, params, self.stop_ids, len(prompt.ids), self.decoder.max_len, prompt.answer_prefix
        )
        req = _Request(
            id=next(self._ids),
            prompt=prompt,
            seq=seq,
            params=params,
            on_event=on_event,
            generator=make_generator(params),
            constraint=json_constraint(params.json_schema, self.tokenizer, self.stop_ids),
            submitted_at=time.perf_counter(),
        )
        handle = RequestHandle(self, req)
        if prompt.answer_complete:
            # The whole answer is the begun answer: it ends as if the first sampled token were the
            # stop token (counted, as always), through the same stop-string and streaming rules.
            req.seq.hit_stop_token = True
            self._finish(req, handle, "stop")
            return handle
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
            decoding = [(r, h) for r, h in self._running if r.pending is not None and not r.seq.finished]
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
        with self._lock:
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
        """Admit waiting requests. With a prefix cache the first runs alone and its prompt is stored,
        so the others (often the same system prompt and image) find it; they then prefill together
        in one decoder call: a burst of n questions about one image reads the weights twice, not n
        times."""
        first = admit[:1] if self.prefix_cache is not None and len(admit) > 1 else []
        for req, handle in first:
            self._prefill([(req, handle)])
        self._store_pending_prompts()
        self._prefill(admit[len(first) :])

    def _prefill(self, group: list[tuple[_Request, RequestHandle]]) -> None:
        ready = []
        for req, handle in group:
            try:
                ready.append((req, handle, self._start(req, handle)))
            except Exception as exc:  # this request fails (result() raises); the others go on
                self._fail(req, handle, exc)
        if not ready:
            return
        try:
            if len(ready) == 1:
                req, _, start = ready[0]
                logits = self.decoder.prefill(req.slot, req.prompt, start).unsqueeze(0)
            else:
                logits = self.decoder.prefill_many(
                    [r.slot for r, _, _ in ready], [r.prompt for r, _, _ in ready], [s for _, _, s in ready]
                )
            toks = self._sample(logits, [r for r, _, _ in ready])
        except Exception as exc:
            for req, handle, _ in ready:
                self._fail(req, handle, exc)
            return
        for (req, handle, _), tok in zip(ready, toks):
            self._first_token(req, handle, tok)

    def _start(self, req: _Request, handle: RequestHandle) -> int:
        """Give a request a sequence holding its longest cached prefix; returns that prefix's length."""
        dec = self.decoder
        dec.prepare(req.prompt)
        req.slot = dec.new_sequence()
        with self._lock:
            self._running.append((req, handle))
        start = 0
        if self.prefix_cache is not None and req.prompt.cacheable:
            req.keys = token_keys(req.prompt.ids, self.image_token_id, req.prompt.image_keys, req.prompt.image_lengths)
            hit = self.prefix_cache.lookup(req.keys, limit=len(req.prompt.ids) - 1)  # the last token must run
            if hit is not None:
                dec.import_kv(req.slot, hit.kv)
                start = hit.length
        req.cached_tokens = start
        return start

    def _first_token(self, req: _Request, handle: RequestHandle, tok: int) -> None:
        req.first_token_at = time.perf_counter()
        self._accept(req, handle, tok)  # the first token goes out before any cache bookkeeping
        # Store the prompt soon (not only at the end), so requests admitted after this one share it:
        # before the next admission or at the next step -- after this step returned, so a caller
        # driving the loop itself sees the first token without waiting for the copy.
        if req.keys is not None and req.slot is not None:
            self._pending_stores.append(req)

    def _store_pending_prompts(self) -> None:
        pending, self._pending_stores = self._pending_stores, []
        for req in pending:
            # A request that finished meanwhile stored its KV (prompt and reply) on release.
            if req.slot is not None and not self.prefix_cache.covers(req.keys):
                self.prefix_cache.store(req.keys, self.decoder.export_kv(req.slot, len(req.prompt.ids)))

    # -- decoding -------------------------------------------------------------------------------
    def _decode(self, batch: list[tuple[_Request, RequestHandle]]) -> None:
        by_slot = {r.slot: (r, h) for r, h in batch}
        slots = self.decoder.sequences  # every live sequence, in the decoder's own order
        if set(slots) != set(by_slot):
            raise RuntimeError("decoder sequences and running requests are out of step")
        reqs = [by_slot[s][0] for s in slots]
        logits = self.decoder.decode(slots, [r.pending for r in reqs])  # [B, V]
        for s, tok in zip(slots, self._sample(logits, reqs)):
            req, handle = by_slot[s]
            self._accept(req, handle, tok)

    def _sample(self, logits: torch.Tensor, reqs: list[_Request]) -> list[int]:
        logits = logits.float()
        if self._banned is not None:
            logits = logits.index_fill(-1, self._banned.to(logits.device), float("-inf"))
        constrained = [i for i, r in enumerate(reqs) if r.constraint is not None]
        if constrained:
            logits = logits.clone() if self._banned is None else logits
            for i in constrained:
                logits[i] = reqs[i].constraint.mask(logits[i])
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
        """One sampled token: the sequence applies the stop rules and says what may be streamed."""
        delta = req.seq.accept(tok)
        if req.constraint is not None:
            req.constraint.advance(tok)
            if req.constraint.done and not req.seq.finished:  # the JSON is complete: nothing may follow
                self._finish(req, handle, "stop", delta, token_id=tok)
                return
        if req.seq.finished:
            fed = tok if tok not in self.stop_ids else None
            self._finish(req, handle, req.seq.finish_reason, delta, token_id=fed)
            return
        req.pending = tok
        self._publish(req, handle, StreamEvent(req.id, tok, delta))

    def _finish(
        self, req: _Request, handle: RequestHandle, reason: str, delta: str = "", token_id: int | None = None
    ) -> None:
        if req.result is not None:
            return
        delta += req.seq.finish(reason)  # "" when the sequence had already finished itself
        req.pending = None
        req.finished_at = time.perf_counter()
        if req.first_token_at is None:
            req.first_token_at = req.finished_at
        if req.slot is not None:
            self._release(req)
        with self._lock:
            if (req, handle) in self._running:
                self._running.remove((req, handle))
        req.result = req.seq.result()
        self._publish(req, handle, StreamEvent(req.id, token_id, delta, finished=True, finish_reason=reason))

    def _release(self, req: _Request) -> None:
        dec = self.decoder
        slot, req.slot = req.slot, None
        try:
            if self.prefix_cache is not None and not req.cancelled and req.keys is not None:
                n = dec.length(slot)  # prompt + the reply tokens already fed
                keys = req.keys + tuple(req.seq.token_ids[: n - len(req.prompt.ids)])
                if not self.prefix_cache.covers(keys[:n]):
                    self.prefix_cache.store(keys[:n], dec.export_kv(slot, n))
        finally:
            dec.free(slot)

    def _publish(self, req: _Request, handle: RequestHandle, ev: StreamEvent) -> None:
        handle._publish(ev)
        if req.on_event is not None:
            req.on_event(ev)
