"""A model behind an OpenAI-compatible server (`visprompt serve`, vLLM, llama.cpp's server, OpenAI).

`--model openai:MODEL --base-url URL` (the key from `--api-key` or `$OPENAI_API_KEY`): the `Backend`
contract over the official `openai` client. Images go as `data:image/png;base64,...` URLs of the
pixels `load_image` gives (EXIF orientation applied, metadata stripped, lossless), so the server sees
exactly the image a local backend would; http(s) image URLs go as they are, for the server to fetch.

The decode rules the runtime applies locally hold here too, on text: stop strings are sent to the
server and also cut here (a server may take fewer of them, or none); the reply has no leading or
trailing whitespace; streamed pieces join to the final text. `SamplingParams.json_schema` goes as
OpenAI's `response_format` (structured outputs: `visprompt serve`, vLLM and OpenAI constrain the
reply to it). `generate` sends its conversations concurrently; `submit` streams in a thread and
`cancel()` closes the stream.
"""

from __future__ import annotations

import base64
import io
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...errors import VispromptError, one_line
from ...runtime.sampling import openai_response_format
from ..backend import Conversation, GenerationResult, SamplingParams, StreamEvent, iter_parts

PREFIX = "openai:"
MAX_SERVER_STOPS = 4  # OpenAI's limit; the rest are cut here
MAX_CONCURRENT = 8  # requests `generate` keeps open at once
_FINISH = {"stop": "stop", "length": "length", "content_filter": "stop", "tool_calls": "stop"}


def image_data_url(source: Any) -> str:
    """An image source (path, bytes, data: URL, PIL image) as a PNG data URL of its loaded pixels."""
    from ...images import load_image

    buf = io.BytesIO()
    load_image(source).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image_url(source: Any) -> str:
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return source  # the server fetches it (if it is allowed to)
    return image_data_url(source)


def to_openai_messages(conversation: Conversation) -> list[dict[str, Any]]:
    """A conversation (see `models.chat`) as OpenAI chat messages, images as data URLs."""
    out = []
    for message in conversation:
        content = message.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": message.get("role"), "content": content or ""})
            continue
        parts = []
        for part in iter_parts(message):
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            elif kind == "image":
                parts.append({"type": "image_url", "image_url": {"url": _image_url(part.get("image"))}})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                parts.append({"type": "image_url", "image_url": {"url": _image_url(url)}})
        out.append({"role": message.get("role"), "content": parts})
    return out


class TextStops:
    """Stop strings and whitespace rules on streamed text (runtime/sequence.py's rules, for text that
    arrives in pieces): `feed` returns what is safe to show now, `finish` the rest."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything received
        self.cut: int | None = None
        self._emitted = ""

    @property
    def stopped(self) -> bool:
        return self.cut is not None

    def visible(self) -> str:
        return (self.text if self.cut is None else self.text[: self.cut]).strip()

    def feed(self, piece: str) -> str:
        from ...runtime.sequence import find_stop

        if self.cut is not None:
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=1) + 1)
        self.text += piece
        at = find_stop(self.text, self.stops, start)
        if at != -1:
            self.cut = at
            return self._take(self.visible())
        shown = self.text.lstrip()
        end = len(shown)
        for s in self.stops:  # a tail a stop string may still complete
            for k in range(min(len(s) - 1, end), 0, -1):
                if shown[end - k : end] == s[:k]:
                    end -= k
                    break
        return self._take(shown[:end].rstrip())

    def finish(self) -> str:
        return self._take(self.visible())

    def _take(self, text: str) -> str:
        if len(text) <= len(self._emitted) or not text.startswith(self._emitted):
            return ""
        delta = text[len(self._emitted) :]
        self._emitted = text
        return delta


class RemoteHandle:
    """One streamed request: iterate for text pieces, `cancel()` (closes the stream), `result()`."""

    def __init__(self, backend: RemoteBackend, conversation: Conversation, params: SamplingParams, on_event):
        self._backend = backend
        self._params = params
        self._on_event = on_event
        self._queue: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._stream = None
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._messages = to_openai_messages(conversation)  # image errors surface at submit
        self._thread = threading.Thread(target=self._run, name="visprompt-remote", daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop the reply: the stream is closed and the result's finish reason is "cancelled"."""
        self._cancelled.set()
        stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - closing a stream that already ended
                pass

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"the remote reply did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def events(self) -> Iterator[StreamEvent]:
        while True:
            try:
                ev = self._queue.get(timeout=0.1)  # a timeout: Ctrl-C reaches a waiting main thread
            except queue.Empty:
                continue
            if ev.finished and self._error is not None:
                raise self._error
            yield ev
            if ev.finished:
                return

    def __iter__(self) -> Iterator[str]:
        for ev in self.events():
            if ev.text:
                yield ev.text

    def _publish(self, text: str, finish_reason: str | None = None) -> None:
        ev = StreamEvent(0, None, text, finished=finish_reason is not None, finish_reason=finish_reason)
        if self._on_event is not None:
            self._on_event(ev)
        self._queue.put(ev)

    def _run(self) -> None:
        stops = TextStops(self._params.stop)
        reason, prompt_tokens, completion_tokens = "stop", 0, 0
        try:
            self._stream = self._backend._create(self._messages, self._params, stream=True)
            if self._cancelled.is_set():
                self._stream.close()
            for chunk in self._stream:
                if chunk.usage is not None:
                    prompt_tokens = chunk.usage.prompt_tokens or 0
                    completion_tokens = chunk.usage.completion_tokens or 0
                for choice in chunk.choices or []:
                    piece = stops.feed(choice.delta.content or "")
                    if piece:
                        self._publish(piece)
                    if choice.finish_reason:
                        reason = _FINISH.get(choice.finish_reason, "stop")
                if stops.stopped:
                    reason = "stop"
                    self._stream.close()
                    break
            if self._cancelled.is_set() and not stops.stopped:
                reason = "cancelled"
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through result()
            if self._cancelled.is_set():
                reason = "cancelled"
            else:
                self._error = self._backend._error(exc)
                reason = "error"
        last = stops.finish()
        self._result = GenerationResult(stops.visible(), reason, prompt_tokens, completion_tokens)
        self._done.set()
        self._publish(last, reason)


class RemoteBackend:
    """A model served over OpenAI's chat completion API (see the module docstring).

    Args:
        model: the model id the server knows.
        base_url: the server, e.g. http://127.0.0.1:8000 (a bare host gets /v1); default
            `$OPENAI_BASE_URL`, else OpenAI's.
        api_key: default `$OPENAI_API_KEY` (a server without keys takes any).
        timeout: seconds per request.
    """

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, timeout: float = 600.0):
        try:
            import openai
        except ImportError:
            raise VispromptError("remote models need the openai package: pip install 'visprompt[remote]'") from None
        if not model:
            raise VispromptError("name the model the server runs: --model openai:MODEL")
        self.model = model
        self.name = PREFIX + model
        self.base_url = _v1(base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1")
        key = api_key or os.environ.get("OPENAI_API_KEY") or "unused"
        self._openai = openai
        self.client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=timeout, max_retries=1)

    # -- the contract ---------------------------------------------------------------------------
    def generate(self, conversations: list[Conversation], params: SamplingParams) -> list[GenerationResult]:
        """One result per conversation; the requests run concurrently."""
        if not conversations:
            return []
        messages = [to_openai_messages(c) for c in conversations]
        if len(messages) == 1:
            return [self._complete(messages[0], params)]
        with ThreadPoolExecutor(min(MAX_CONCURRENT, len(messages)), thread_name_prefix="visprompt-remote") as pool:
            return list(pool.map(lambda m: self._complete(m, params), messages))

    def stream(self, conversation: Conversation, params: SamplingParams) -> Iterator[str]:
        return iter(self.submit(conversation, params))

    def submit(
        self, conversation: Conversation, params: SamplingParams, on_event: Callable[[StreamEvent], None] | None = None
    ) -> RemoteHandle:
        return RemoteHandle(self, conversation, params, on_event)

    def start(self) -> None:
        """Nothing to start: each request runs in its own thread."""

    def close(self) -> None:
        self.client.close()

    def check(self) -> None:
        """Reach the server now (its model list): a missing server is a one-line error before any work."""
        try:
            self.client.models.list()
        except self._openai.APIConnectionError as exc:
            raise self._error(exc) from None
        except self._openai.APIStatusError as exc:
            if exc.status_code in (401, 403):
                raise self._error(exc) from None
            # a server without a model list still answers chat completions

    # -- requests -------------------------------------------------------------------------------
    def _create(self, messages: list[dict[str, Any]], params: SamplingParams, stream: bool):
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if params.stop:
            kwargs["stop"] = params.stop[:MAX_SERVER_STOPS]
        if params.top_k:
            kwargs["extra_body"] = {"top_k": params.top_k}  # vLLM's and visprompt's extension
        if params.json_schema is not None:
            kwargs["response_format"] = openai_response_format(params.json_schema)
        if stream:
            kwargs["stream"] = True
            kwargs["stream_options"] = {"include_usage": True}
        return self.client.chat.completions.create(**kwargs)

    def _complete(self, messages: list[dict[str, Any]], params: SamplingParams) -> GenerationResult:
        try:
            reply = self._create(messages, params, stream=False)
        except Exception as exc:  # noqa: BLE001 - made one line below
            raise self._error(exc) from None
        choice = reply.choices[0]
        stops = TextStops(params.stop)
        stops.feed(choice.message.content or "")
        reason = "stop" if stops.stopped else _FINISH.get(choice.finish_reason or "stop", "stop")
        usage = reply.usage
        return GenerationResult(
            stops.visible(),
            reason,
            (usage.prompt_tokens or 0) if usage else 0,
            (usage.completion_tokens or 0) if usage else 0,
        )

    def _error(self, exc: BaseException) -> BaseException:
        """The client's exceptions as one-line VispromptErrors (others pass through)."""
        openai = self._openai
        if isinstance(exc, openai.APIConnectionError):
            return VispromptError(f"cannot reach {self.base_url}: {one_line(exc.__cause__ or exc)}")
        if isinstance(exc, openai.APIStatusError):
            return VispromptError(f"{self.base_url} answered {exc.status_code}: {one_line(_message(exc))}")
        return exc


def _message(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(exc)


def _v1(url: str) -> str:
    """A server address as the client's base URL: a bare host (no path) gets /v1."""
    from urllib.parse import urlsplit

    url = url.rstrip("/")
    if not urlsplit(url).scheme:
        raise VispromptError(f"--base-url must be an http(s) URL, got {url!r}")
    return url if urlsplit(url).path not in ("", "/") else url + "/v1"
