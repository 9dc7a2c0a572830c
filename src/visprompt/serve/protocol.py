"""The body of `POST /v1/chat/completions`, checked field by field into a `ChatRequest`.

What is taken (OpenAI's names): `model`, `messages` (roles system, developer, user, assistant;
content a string or parts `text` and `image_url` with `{"url": ...}`), `max_completion_tokens` or
`max_tokens`, `temperature`, `top_p`, `top_k` (an extension, as vLLM has it), `seed`, `stop`, `n`,
`stream`, `stream_options.include_usage`, and `response_format`: `{"type": "json_schema",
"json_schema": {"schema": ...}}` or `{"type": "json_object"}` constrain the reply to JSON (valid
against the schema, or any object) token by token, as `SamplingParams.json_schema`. Fields that ask
for something this server does not do (tools, logprobs, penalties) are refused with a 400 rather
than ignored; other unknown fields are ignored, as vLLM ignores them.

Each refusal names the field (`param`) and says what would be accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import ServeConfig
from .errors import bad_request

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4

# field -> the value that asks for nothing this server lacks
_UNSUPPORTED = {
    "tools": (None, []),
    "functions": (None, []),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "audio": (None,),
    "prediction": (None,),
}


@dataclass
class Part:
    """One content part: text, or an image by URL."""

    text: str | None = None
    url: str | None = None


@dataclass
class ChatMessage:
    role: str
    parts: list[Part]


@dataclass
class ChatRequest:
    """A checked chat completion request.

    Fields:
        messages: the conversation, in order.
        model: the model id the client named (None: whatever is served).
        max_tokens: completion tokens per choice (None: the model's room, up to the server's limit).
        temperature, top_p, top_k, seed, stop: sampling, as `SamplingParams` takes them.
        n: choices to generate.
        stream: answer as server-sent events.
        include_usage: with `stream`, a last chunk that carries `usage`.
        json_schema: the JSON Schema every choice's reply must follow (None: free text).
    """

    messages: list[ChatMessage]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    json_schema: dict[str, Any] | None = None

    @property
    def image_count(self) -> int:
        return sum(p.url is not None for m in self.messages for p in m.parts)


def parse_chat_request(body: Any, config: ServeConfig) -> ChatRequest:
    """Check a parsed JSON body and turn it into a `ChatRequest`.

    Args:
        body: the JSON value the client sent.
        config: the server's limits (images, tokens, choices).

    Returns:
        The request. Raises `APIError` 400 naming the field at fault.
    """
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    for name, fine in _UNSUPPORTED.items():
        if name in body and body[name] not in fine:
            raise bad_request(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    choice = body.get("tool_choice")
    if choice not in (None, "none", "auto"):
        raise bad_request("'tool_choice' is not supported by this server", param="tool_choice")
    schema = response_schema(body.get("response_format"))

    req = ChatRequest(messages=_messages(body.get("messages")), json_schema=schema)
    if req.image_count > config.max_images:
        raise bad_request(
            f"the request has {req.image_count} images, over the limit of {config.max_images} (--max-images)",
            param="messages",
            code="too_many_images",
        )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", param="model")
    req.model = model
    req.max_tokens = _max_tokens(body, config)
    req.temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    req.top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if req.top_p == 0:
        raise bad_request("'top_p' must be greater than 0", param="top_p")
    req.top_k = _integer(body, "top_k", 0, -1, None)
    req.top_k = max(req.top_k, 0)  # -1 (vLLM's "off") is 0 here
    req.seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
    req.stop = _stop(body.get("stop"))
    req.n = _integer(body, "n", 1, 1, config.max_n)
    req.stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object", param="stream_options")
        req.include_usage = _boolean(options, "include_usage", False, "stream_options.include_usage")
    return req


# --------------------------------------------------------------------------------------------- fields


def response_schema(fmt: Any) -> dict[str, Any] | None:
    """The JSON Schema a `response_format` asks for: None for text (or no format), `{"type": "object"}`
    for `json_object`, the given schema for `json_schema` (checked that it can drive generation)."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request(
                "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                param="response_format",
            )
    else:
        raise bad_request(
            "response_format must be {'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', ...}",
            param="response_format",
        )
    from ..errors import VispromptError
    from ..runtime.constraint import check_json_schema

    try:
        return check_json_schema(schema)
    except VispromptError as exc:
        raise bad_request(str(exc), param="response_format", code="invalid_json_schema") from None


def _messages(value: Any) -> list[ChatMessage]:
    if not isinstance(value, list) or not value:
        raise bad_request("'messages' must be a non-empty list of messages", param="messages")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(value)]


def _message(value: Any, where: str) -> ChatMessage:
    if not isinstance(value, dict):
        raise bad_request(f"{where} must be an object with 'role' and 'content'", param=where)
    role = value.get("role")
    if role not in ROLES:
        raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}, got {str(role)[:40]!r}", param=where)
    content = value.get("content")
    if content is None and role == "assistant":
        return ChatMessage("assistant", [])
    if isinstance(content, str):
        return ChatMessage(ROLES[role], [Part(text=content)])
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    parts = [_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
    if role != "user" and any(p.url is not None for p in parts):
        raise bad_request(f"{where}: only user messages may hold images", param=where)
    return ChatMessage(ROLES[role], parts)


def _part(value: Any, where: str) -> Part:
    if not isinstance(value, dict):
        raise bad_request(f"{where} must be an object with a 'type'", param=where)
    kind = value.get("type")
    if kind == "text":
        text = value.get("text")
        if not isinstance(text, str):
            raise bad_request(f"{where}.text must be a string", param=where)
        return Part(text=text)
    if kind == "image_url":
        image = value.get("image_url")
        if not isinstance(image, dict):
            raise bad_request(
                f"{where}.image_url must be an object {{'url': ...}}, not a bare {type(image).__name__}",
                param=where,
                code="invalid_image_url",
            )
        url = image.get("url")
        if not isinstance(url, str) or not url:
            raise bad_request(f"{where}.image_url.url must be a non-empty string", param=where)
        return Part(url=url)
    raise bad_request(f"{where}.type must be 'text' or 'image_url', got {str(kind)[:40]!r}", param=where)


def _max_tokens(body: dict, config: ServeConfig) -> int | None:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = _integer(body, name, None, 1, None)
    if value is not None and value > config.max_tokens_limit:
        raise bad_request(
            f"'{name}' is {value}, over this server's limit of {config.max_tokens_limit} (--max-tokens-limit)",
            param=name,
            code="max_tokens_too_large",
        )
    return value


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise bad_request(f"'stop' holds at most {MAX_STOPS} strings", param="stop")
    return [s for s in stops if s]


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad_request(f"'{name}' must be a number from {low:g} to {high:g}", param=name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int | None, high: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f">= {low}"
        raise bad_request(f"'{name}' must be {span}, got {value}", param=name)
    return value


def _boolean(body: dict, name: str, default: bool, shown: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{shown or name}' must be true or false", param=shown or name)
    return value
