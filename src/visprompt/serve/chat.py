"""`POST /v1/chat/completions`: one request from its body to its answer.

Admitted (or a 429) before its body is read -> body read to its cap -> fields checked -> images read
and decoded and the prompt built, in a worker thread -> choices submitted to the backend's scheduler
-> answered whole, or streamed as server-sent events. A client that goes away cancels its choices;
errors are OpenAI's JSON shape (inside a stream that has begun: its last event); an unexpected
exception is a 500 that names only the request id.
"""

from __future__ import annotations

import logging
import time

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..engine.backend import GenerationResult, SamplingParams
from ..errors import VispromptError
from .body import read_json
from .completion import Completion
from .config import ServeConfig
from .content import ImageStats, build_conversation
from .errors import APIError, bad_request, from_visprompt
from .media import MediaFetcher
from .metrics import Metrics
from .protocol import ChatRequest, parse_chat_request
from .responses import DONE, Envelope, new_request_id, sse, usage
from .served_model import Prepared, ServedModel
from .streaming import EventStream, until_disconnect
from .trace import RequestTrace

log = logging.getLogger("visprompt.serve")
PREPARE_THREADS = 4  # requests reading images and building prompts at once (decoded images in memory)


class ChatCompletions:
    """The chat completion endpoint over one served model.

    Args:
        model: the backend and its capacity.
        metrics: the server's counters.
        config: limits.
        fetcher: reads image URLs.
    """

    def __init__(self, model: ServedModel, metrics: Metrics, config: ServeConfig, fetcher: MediaFetcher):
        self.model = model
        self.metrics = metrics
        self.config = config
        self.fetcher = fetcher
        self.limiter = anyio.CapacityLimiter(PREPARE_THREADS)

    async def __call__(self, request: Request) -> Response:
        """Answer one request (never raises: every failure is an OpenAI error response)."""
        trace = RequestTrace(new_request_id(), self.model.capacity, self.metrics)
        try:
            trace.hold(1)  # before the body is read: memory is bounded by the requests admitted
            try:
                response = await self._answer(request, trace)
            except VispromptError as exc:  # a user error found below the server (a prompt, an image)
                raise from_visprompt(exc, param="messages") from None
        except APIError as exc:
            trace.end(exc.status, exc.code)
            return _error(exc, trace.rid)
        except Exception:
            trace.end(500, "internal_error")
            log.exception("request %s failed inside the server", trace.rid)
            return _error(
                APIError(500, f"internal server error (request {trace.rid})", code="internal_error"), trace.rid
            )
        response.headers["x-request-id"] = trace.rid
        return response

    async def _answer(self, request: Request, trace: RequestTrace) -> Response:
        config, model = self.config, self.model
        deadline = trace.started + config.request_timeout
        body, trace.body_bytes = await read_json(request, config.max_body_bytes)
        self.metrics.read_body(trace.body_bytes)
        chat = parse_chat_request(body, config)
        del body
        if chat.model is not None and chat.model != model.name:
            message = f"model {chat.model!r} is not served here; GET /v1/models lists it"
            raise APIError(404, message, param="model", code="model_not_found")
        if chat.n > 1:
            trace.hold(chat.n - 1)
        try:
            with anyio.fail_after(max(deadline - time.monotonic(), 0.001)):
                prepared, trace.images = await anyio.to_thread.run_sync(
                    self._prepare, chat, limiter=self.limiter, abandon_on_cancel=True
                )
        except TimeoutError:
            raise APIError(504, "the request did not finish within --request-timeout", code="timeout") from None
        params = sampling(chat, prepared, model.context_length, config.max_tokens_limit)
        completion = Completion(model, self.metrics, deadline)
        if model.scheduled:
            completion.submit(prepared, params)  # queues only: the prompt is built
        else:  # a submit-only backend builds its prompt in submit
            await anyio.to_thread.run_sync(completion.submit, prepared, params, limiter=self.limiter)
        envelope = Envelope(trace.rid, model.name)
        if chat.stream:

            def close() -> None:  # once, whichever way the stream ends (or if it never starts)
                completion.close()
                if trace.status is None:  # it ended before its last event: the client went away
                    trace.status, trace.reason = 499, "client_closed"
                trace.end(trace.status, trace.reason)

            return EventStream(_events(completion, chat, envelope, trace), on_close=close)
        try:
            results = await _whole(request, completion)
        finally:
            completion.close()
        if results is None:
            raise APIError(499, "the client closed the connection", code="client_closed")
        answer = envelope.completion(results)
        trace.tokens(answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"], _ttft(completion))
        trace.end(200)
        return JSONResponse(answer)

    def _prepare(self, chat: ChatRequest) -> tuple[Prepared, ImageStats]:
        """Images read and decoded, the prompt built (tokens, image features); the decoded images are
        dropped once the prompt exists. Runs in a worker thread."""
        conversation, stats = build_conversation(chat, self.fetcher, self.config.max_image_pixels)
        try:
            return self.model.prepare(conversation), stats
        except VispromptError as exc:
            raise from_visprompt(exc, param="messages") from None


def sampling(chat: ChatRequest, prepared: Prepared, context: int | None, limit: int) -> list[SamplingParams]:
    """One `SamplingParams` per choice, the token budget checked against the model's context.

    Args:
        chat: the checked request.
        prepared: its prompt (its length, when the backend says it before generating).
        context: the model's context in tokens (None: unknown).
        limit: the server's most completion tokens per choice.

    Returns:
        The choices' parameters: `max_tokens` as asked, or the room left in the context up to `limit`;
        with a seed, choice i samples with seed + i. Raises `APIError` 400 when the prompt, or the
        prompt and `max_tokens` together, do not fit the context.
    """
    prompt = prepared.prompt_tokens
    max_tokens = chat.max_tokens
    if prompt is not None and context is not None:
        if prompt >= context:
            raise bad_request(
                f"the prompt has {prompt} tokens, which does not fit the model's context of {context} tokens "
                "with room for a reply",
                param="messages",
                code="context_length_exceeded",
            )
        if max_tokens is not None and prompt + max_tokens > context:
            raise bad_request(
                f"the prompt has {prompt} tokens and max_tokens asks for {max_tokens}: {prompt + max_tokens} is over "
                f"the model's context of {context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        max_tokens = max_tokens or min(limit, context - prompt)
    max_tokens = max_tokens or limit
    seeds = [None if chat.seed is None else (chat.seed + i) % 2**63 for i in range(chat.n)]
    return [
        SamplingParams(
            max_new_tokens=max_tokens,
            temperature=chat.temperature,
            top_p=chat.top_p,
            top_k=chat.top_k,
            seed=seed,
            stop=list(chat.stop),
            json_schema=chat.json_schema,
        )
        for seed in seeds
    ]


async def _whole(request: Request, completion: Completion) -> list[GenerationResult] | None:
    """Wait for every choice while listening for the client going away; None when it went away."""
    outcome: dict = {}
    async with anyio.create_task_group() as group:

        async def generate() -> None:
            try:
                outcome["results"] = await completion.wait()
            except APIError as exc:
                outcome["error"] = exc
            group.cancel_scope.cancel()

        async def watch() -> None:
            await until_disconnect(request.receive)
            group.cancel_scope.cancel()

        group.start_soon(generate)
        group.start_soon(watch)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("results")


async def _events(completion: Completion, chat: ChatRequest, envelope: Envelope, trace: RequestTrace):
    """The SSE events of a streamed completion (responses.py says their order)."""
    extra = {"usage": None} if chat.include_usage else {}
    for i in range(chat.n):
        yield envelope.chunk(i, {"role": "assistant", "content": ""}, **extra)
    try:
        async for index, event in completion.events():
            if event.text:
                yield envelope.chunk(index, {"content": event.text}, **extra)
            if event.finished:
                yield envelope.chunk(index, {}, event.finish_reason, **extra)
    except APIError as exc:  # the stream has begun: the error is its last event
        trace.status, trace.reason = exc.status, exc.code
        yield sse(exc.body())
        yield DONE
        return
    results = [h.result(timeout=0) for h in completion.handles]
    counts = usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results))
    trace.tokens(counts["prompt_tokens"], counts["completion_tokens"], _ttft(completion))
    if chat.include_usage:
        yield envelope.chunk(None, usage=counts)
    trace.status = 200
    yield DONE


def _ttft(completion: Completion) -> float | None:
    firsts = [h.time_to_first_token for h in completion.handles if h.time_to_first_token is not None]
    return min(firsts) if firsts else None


def _error(exc: APIError, rid: str) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers={**exc.headers, "x-request-id": rid})
