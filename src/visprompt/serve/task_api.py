"""`POST /v1/tasks/*`: the application tasks (`visprompt.tasks`) over the served model.

    describe  JSON {"image", "style"?, "tone"?}                 -> {"text", "style", "tone", "model"}
    story     JSON {"images"?, "state"?, "direction"?}          -> {"text", "paragraphs", "state", "ended", "model"}
    lesson    JSON {"image", "questions"?, "level"?}            -> the lesson (valid against lesson.schema.json)
    video     multipart/form-data: video (file), max_frames?    -> {"summary", "duration", "scenes"}, as
                                                                    `visprompt video --json` prints it
    explain   JSON {"image", "prompt", "token"?, "method"?}     -> {"answer", "tokens", "heatmap",
                                                                    "balance_plot" (PNG data: URLs), ...}

Every endpoint also takes `max_tokens`, `temperature`, `top_p`, `top_k` and `seed` (form fields for
the video). An image is a `data:` URL (or an allowed http(s)/file URL, as in chat) or bare base64,
read and decoded with the chat endpoint's limits. A story's `state` is the one the last answer gave:
sent back, the story goes on from it (the server keeps nothing between requests).

A task runs in a worker thread (at most `TASK_THREADS` at once) over `TaskBackend`: its generations
go through the backend's scheduler beside the chat requests', and stop (their sequences cancelled)
when the client goes away or the request passes --request-timeout. A task holds capacity like a chat
request (a video one slot per frame), and at most `VIDEO_UPLOADS` videos are in memory at once.

`explain` runs the explainer the server was started with (the CLI passes
`visprompt.eval.heatmap.explanation_json`; the server does not import `eval` itself) on the served
backend, one request at a time: it switches the model to eager attention while it reads the weights.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..engine.backend import Conversation, GenerationResult, SamplingParams, StreamEvent
from ..errors import VideoError, VispromptError
from .body import read_json
from .config import ServeConfig
from .content import read_image
from .errors import APIError, bad_request, from_visprompt
from .media import MediaFetcher
from .metrics import Metrics
from .protocol import _integer, _number
from .responses import new_request_id
from .served_model import ServedModel
from .streaming import until_disconnect
from .trace import RequestTrace

log = logging.getLogger("visprompt.serve")
TASK_THREADS = 4  # tasks running at once (each holds its decoded images while it generates)
VIDEO_UPLOADS = 2  # videos held in memory at once (each up to --max-video-bytes); more is a 429
DESCRIBE_TOKENS = 128  # default max_tokens per generation (describe, video)
STORY_TOKENS = 110  # a paragraph's default max_tokens (tasks.story.Story's)
MAX_DIRECTION = 500  # characters of a story's direction
EXPLAIN_TOKENS = 32  # default max_tokens of an explained answer
MAX_EXPLAIN_TOKENS = 64  # an explanation draws one panel per answer token


class _Gone(Exception):
    """The client closed the connection: the task stops."""


class TaskBackend:
    """The served model as a task's `Backend`: each `generate` call prepares its prompts, submits them
    to the scheduler (as chat choices are) and waits, checking between steps whether the request was
    cancelled or passed its deadline; either cancels its sequences.

    Args:
        model: the served model.
        metrics: queue-depth gauges are kept here as for chat choices.
        deadline: `time.monotonic()` by which the task must be done (504 after it).
        cancelled: set when the client has gone away.
    """

    def __init__(self, model: ServedModel, metrics: Metrics, deadline: float, cancelled: threading.Event):
        self.model = model
        self.metrics = metrics
        self.deadline = deadline
        self.cancelled = cancelled
        self.name = model.name
        self.image_after_text = bool(getattr(model.backend, "image_after_text", False))
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft: float | None = None

    def check(self) -> None:
        """Raise if the task must stop (the client left, or the deadline passed)."""
        if self.cancelled.is_set():
            raise _Gone
        if time.monotonic() > self.deadline:
            raise APIError(504, "the request did not finish within --request-timeout", code="timeout")

    def generate(self, conversations: list[Conversation], params: SamplingParams) -> list[GenerationResult]:
        """One result per conversation, generated together in the scheduler's batch."""
        if not conversations:
            return []
        self.check()
        prepared = self.model.prepare_all(conversations)
        self.check()
        n = len(prepared)
        lock = threading.Lock()
        started, finished = [False] * n, [False] * n
        done = [threading.Event() for _ in range(n)]
        handles: list = []

        def on_event(i: int, event: StreamEvent) -> None:  # the scheduler's thread: never raises
            with lock:
                if not started[i]:
                    started[i] = True
                    handle = handles[i] if i < len(handles) else None
                    self.metrics.first_token(getattr(handle, "time_to_first_token", None), 0)
                if event.finished and not finished[i]:
                    finished[i] = True
                    self.metrics.sequence_done(started=True)
                    done[i].set()

        self.metrics.submitted(n)
        try:
            for i, p in enumerate(prepared):
                handles.append(self.model.submit(p, params, partial(on_event, i)))
            for event in done:
                while not event.wait(0.05):
                    self.check()
            results = [h.result(timeout=10) for h in handles]
        finally:
            with lock:
                unfinished = [i for i in range(n) if not finished[i]]
                for i in unfinished:
                    finished[i] = True
                    self.metrics.sequence_done(started=started[i])
            for i in unfinished:  # outside the lock: the scheduler's thread may be in on_event
                if i < len(handles):
                    handles[i].cancel()
        for h, r in zip(handles, results):
            self.prompt_tokens += r.prompt_tokens
            self.completion_tokens += r.completion_tokens
            first = getattr(h, "time_to_first_token", None)
            if first is not None and self.ttft is None:
                self.ttft = first
        return results

    def stream(self, conversation: Conversation, params: SamplingParams):
        return iter([self.generate([conversation], params)[0].text])

    def submit(self, conversation, params, on_event=None):
        raise NotImplementedError("tasks generate whole replies")

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


class Tasks:
    """The task endpoints over one served model.

    Args:
        model: the backend and its capacity.
        metrics: the server's counters.
        config: limits.
        fetcher: reads image URLs.
    """

    def __init__(
        self,
        model: ServedModel,
        metrics: Metrics,
        config: ServeConfig,
        fetcher: MediaFetcher,
        explainer: Callable[..., dict] | None = None,
    ):
        self.model = model
        self.metrics = metrics
        self.config = config
        self.fetcher = fetcher
        self.explainer = explainer
        self._explain_lock = threading.Lock()
        self.limiter = anyio.CapacityLimiter(TASK_THREADS)
        self._videos = 0
        self._videos_lock = threading.Lock()

    # -- the endpoints ----------------------------------------------------------------------------
    async def describe(self, request: Request) -> Response:
        return await self._answer(request, self._describe)

    async def story(self, request: Request) -> Response:
        return await self._answer(request, self._story)

    async def lesson(self, request: Request) -> Response:
        return await self._answer(request, self._lesson)

    async def video(self, request: Request) -> Response:
        return await self._answer(request, self._video)

    async def explain(self, request: Request) -> Response:
        return await self._answer(request, self._explain)

    # -- one request, start to end ----------------------------------------------------------------
    async def _answer(self, request: Request, handler) -> Response:
        """Run `handler` with the request's trace; every failure is an OpenAI error response."""
        trace = RequestTrace(new_request_id("task"), self.model.capacity, self.metrics)
        try:
            trace.hold(1)  # before the body is read, as for chat
            try:
                answer = await handler(request, trace)
            except VideoError as exc:  # not a video, or one FFmpeg cannot decode
                raise APIError(400, str(exc), param="video", code="invalid_video") from None
            except VispromptError as exc:  # a user error found below the server (an image, a prompt)
                raise from_visprompt(exc) from None
        except APIError as exc:
            trace.end(exc.status, exc.code)
            return _error(exc, trace.rid)
        except Exception:
            trace.end(500, "internal_error")
            log.exception("request %s failed inside the server", trace.rid)
            return _error(
                APIError(500, f"internal server error (request {trace.rid})", code="internal_error"), trace.rid
            )
        trace.end(200)
        return JSONResponse(answer, headers={"x-request-id": trace.rid})

    async def _body(self, request: Request, trace: RequestTrace) -> dict[str, Any]:
        body, trace.body_bytes = await read_json(request, self.config.max_body_bytes)
        self.metrics.read_body(trace.body_bytes)
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", code="invalid_json")
        return body

    async def _run(self, request: Request, trace: RequestTrace, work: Callable[[TaskBackend], Any]) -> Any:
        """`work(backend)` in a worker thread, while listening for the client going away (which stops it)."""
        cancelled = threading.Event()
        backend = TaskBackend(self.model, self.metrics, trace.started + self.config.request_timeout, cancelled)
        outcome: dict[str, Any] = {}
        async with anyio.create_task_group() as group:

            async def run() -> None:
                try:
                    outcome["result"] = await anyio.to_thread.run_sync(work, backend, limiter=self.limiter)
                except Exception as exc:  # noqa: BLE001 - raised below, outside the task group
                    outcome["error"] = exc
                group.cancel_scope.cancel()

            async def watch() -> None:
                await until_disconnect(request.receive)
                cancelled.set()  # the worker stops at its next check; run() waits for it

            group.start_soon(run)
            group.start_soon(watch)
        trace.tokens(backend.prompt_tokens, backend.completion_tokens, backend.ttft)
        if isinstance(outcome.get("error"), _Gone) or cancelled.is_set():
            raise APIError(499, "the client closed the connection", code="client_closed")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def _image(self, value: Any, where: str, trace: RequestTrace):
        """An image field (a URL, or bare base64) decoded with the chat endpoint's limits (worker thread)."""
        if not isinstance(value, str) or not value:
            raise bad_request(f"'{where}' must be an image: a data: URL or base64", param=where)
        url = value if ":" in value[:12] else f"data:image/*;base64,{value}"
        return read_image(url, self.fetcher, self.config.max_image_pixels, where, trace.images)

    def _sampling(self, body: dict, default_tokens: int) -> SamplingParams:
        max_tokens = _integer(body, "max_tokens", None, 1, None)
        if max_tokens is not None and max_tokens > self.config.max_tokens_limit:
            raise bad_request(
                f"'max_tokens' is {max_tokens}, over this server's limit of {self.config.max_tokens_limit} "
                "(--max-tokens-limit)",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0:
            raise bad_request("'top_p' must be greater than 0", param="top_p")
        return SamplingParams(
            max_new_tokens=max_tokens or min(default_tokens, self.config.max_tokens_limit),
            temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
            top_p=top_p,
            top_k=max(_integer(body, "top_k", 0, -1, None), 0),
            seed=_integer(body, "seed", None, -(2**63), 2**63 - 1),
        )

    # -- describe ---------------------------------------------------------------------------------
    async def _describe(self, request: Request, trace: RequestTrace) -> dict[str, Any]:
        from ..tasks.assistant import DESCRIBE_PROMPTS, Assistant
        from ..tasks.tone import TONES

        body = await self._body(request, trace)
        style = _choice(body, "style", "brief", DESCRIBE_PROMPTS)
        tone = _choice(body, "tone", None, TONES)
        params = self._sampling(body, DESCRIBE_TOKENS)

        def work(backend: TaskBackend) -> dict[str, Any]:
            image = self._image(body.get("image"), "image", trace)
            text = Assistant(backend, params).describe(image, style=style, tone=tone)
            return {"text": text, "style": style, "tone": tone, "model": self.model.name}

        return await self._run(request, trace, work)

    # -- story ------------------------------------------------------------------------------------
    async def _story(self, request: Request, trace: RequestTrace) -> dict[str, Any]:
        from ..tasks.assistant import Assistant
        from ..tasks.story import Story, StoryState

        body = await self._body(request, trace)
        images = body.get("images", [])
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list):
            raise bad_request("'images' must be a list of images (data: URLs or base64)", param="images")
        if len(images) > self.config.max_images:
            raise bad_request(
                f"the request has {len(images)} images, over the limit of {self.config.max_images} (--max-images)",
                param="images",
                code="too_many_images",
            )
        state = body.get("state")
        if state is not None:
            if not isinstance(state, dict):
                raise bad_request("'state' must be the story state an earlier answer gave", param="state")
            try:
                state = StoryState.from_json(json.dumps(state))
            except VispromptError as exc:
                raise bad_request(str(exc), param="state") from None
        direction = body.get("direction")
        if direction is not None and (not isinstance(direction, str) or len(direction) > MAX_DIRECTION):
            raise bad_request(f"'direction' must be text of at most {MAX_DIRECTION} characters", param="direction")
        params = self._sampling(body, STORY_TOKENS)

        def work(backend: TaskBackend) -> dict[str, Any]:
            pictures = [self._image(v, f"images[{i}]", trace) for i, v in enumerate(images)]
            story = Story(Assistant(backend, params), state, max_new_tokens=params.max_new_tokens)
            if pictures:
                last = len(pictures) - 1
                paragraphs = [story.turn(p, direction if i == last else None) for i, p in enumerate(pictures)]
            else:
                paragraphs = [story.turn(None, direction or "go on")]
            return {
                "text": "\n\n".join(paragraphs),
                "paragraphs": paragraphs,
                "state": asdict(story.state),
                "ended": story.state.ended,
                "model": self.model.name,
            }

        return await self._run(request, trace, work)

    # -- lesson -----------------------------------------------------------------------------------
    async def _lesson(self, request: Request, trace: RequestTrace) -> dict[str, Any]:
        from ..models.chat import user_turn
        from ..tasks.lesson import DEFAULT_MAX_NEW_TOKENS, lesson_prompt, lesson_schema, make_lesson

        body = await self._body(request, trace)
        questions = _integer(body, "questions", 3, 1, None)
        level = body.get("level", "school")
        if not isinstance(level, str):
            raise bad_request("'level' must be child, school or university", param="level")
        asked = body.get("max_tokens") is not None
        params = self._sampling(body, DEFAULT_MAX_NEW_TOKENS)
        try:
            lesson_schema(questions, level, params.max_new_tokens)  # bad options before any work
        except VispromptError as exc:
            param = "level" if "level" in str(exc) else "max_tokens" if "max_new_tokens" in str(exc) else "questions"
            raise bad_request(str(exc), param=param) from None

        def work(backend: TaskBackend) -> dict[str, Any]:
            image = self._image(body.get("image"), "image", trace)
            budget = params.max_new_tokens
            context = self.model.context_length
            if context is not None:  # the schema must fit the room the prompt leaves
                conversation = [user_turn([image], lesson_prompt(questions, level), backend.image_after_text)]
                prompt = self.model.prepare(conversation).prompt_tokens or 0
                if asked and prompt + budget > context:
                    raise bad_request(
                        f"the prompt has {prompt} tokens and max_tokens asks for {budget}: {prompt + budget} is "
                        f"over the model's context of {context} tokens",
                        param="max_tokens",
                        code="context_length_exceeded",
                    )
                budget = min(budget, context - prompt)
            backend.check()
            sampling = params.updated(max_new_tokens=budget)
            return make_lesson(backend, image, questions, level, sampling, backend.image_after_text)

        return await self._run(request, trace, work)

    # -- explain ----------------------------------------------------------------------------------
    async def _explain(self, request: Request, trace: RequestTrace) -> dict[str, Any]:
        if self.explainer is None:
            raise APIError(404, "this server has no explainer (`visprompt serve` starts one)", code="not_found")
        body = await self._body(request, trace)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise bad_request("'prompt' must be the question to explain", param="prompt")
        token = body.get("token")
        if token is not None and (not isinstance(token, str) or not token.strip() or len(token) > 100):
            raise bad_request("'token' must be one word of the answer or the prompt", param="token")
        method = _choice(body, "method", "mean", ("mean", "rollout"))
        max_tokens = _integer(body, "max_tokens", EXPLAIN_TOKENS, 1, MAX_EXPLAIN_TOKENS)

        def work(backend: TaskBackend) -> dict[str, Any]:
            image = self._image(body.get("image"), "image", trace)
            backend.check()
            with self._explain_lock:
                backend.check()
                found = self.explainer(self.model.backend, image, prompt, token, method, max_tokens)
            return {**found, "model": self.model.name}

        return await self._run(request, trace, work)

    # -- video ------------------------------------------------------------------------------------
    async def _video(self, request: Request, trace: RequestTrace) -> dict[str, Any]:
        with self._videos_lock:
            if self._videos >= VIDEO_UPLOADS:
                raise APIError(
                    429,
                    f"the server is handling {VIDEO_UPLOADS} videos already; retry shortly",
                    code="too_many_requests",
                    headers={"Retry-After": str(self.config.retry_after)},
                )
            self._videos += 1
        upload = None
        try:
            try:
                from .upload import read_upload
            except ImportError as exc:
                raise APIError(
                    501, f"video uploads need python-multipart (pip install 'visprompt[serve]'): {exc}"
                ) from None
            config = self.config
            upload = await read_upload(request, "video", config.max_video_bytes, "video", "--max-video-bytes")
            trace.body_bytes = upload.body_bytes
            self.metrics.read_body(trace.body_bytes)
            if upload.file is None:
                raise bad_request("send the video in a file field 'video'", param="video", code="missing_video")
            fields = {name: _form_value(value) for name, value in upload.fields.items()}
            max_frames = _integer(fields, "max_frames", min(8, config.max_images), 1, config.max_images)
            params = self._sampling(fields, DESCRIBE_TOKENS)
            if max_frames > 1:
                trace.hold(max_frames - 1)  # the keyframes are described together
            video = upload.file

            def work(backend: TaskBackend) -> dict[str, Any]:
                from ..images.video import probe_video
                from ..tasks.video import summarize_video

                info = probe_video(video)  # not a video: a one-line VideoError, a 400
                if info.width * info.height > config.max_image_pixels:
                    raise bad_request(
                        f"the video's frames are {info.width}x{info.height}, over the limit of "
                        f"{config.max_image_pixels} pixels (--max-image-pixels)",
                        param="video",
                        code="invalid_video",
                    )
                backend.check()
                summary = summarize_video(backend, video, max_frames, params, backend.image_after_text)
                return summary.to_dict()

            return await self._run(request, trace, work)
        finally:
            if upload is not None and upload.file is not None:
                upload.file.close()
            with self._videos_lock:
                self._videos -= 1


def _choice(body: dict, name: str, default: str | None, options) -> str | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or value not in options:
        raise bad_request(f"'{name}' must be one of {', '.join(options)}, got {str(value)[:40]!r}", param=name)
    return value


def _form_value(text: str) -> Any:
    """A form field's text as the number it spells (form fields are text), or the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _error(exc: APIError, rid: str) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers={**exc.headers, "x-request-id": rid})
