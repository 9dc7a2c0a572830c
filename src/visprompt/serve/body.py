"""Request bodies read to a cap: a declared length over the cap is refused before a byte is read, and
a body without one (chunked) is counted as it arrives and refused the moment it passes the cap. The
server never holds more than `max_bytes` (plus one network chunk) of one body."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import ClientDisconnect, Request

from .errors import APIError, bad_request


def too_large(max_bytes: int) -> APIError:
    """The 413 for a body over `max_bytes`."""
    return APIError(
        413,
        f"request body is over the {_size(max_bytes)} limit (--max-body-bytes); send smaller or fewer images",
        code="body_too_large",
    )


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, read chunk by chunk and never past `max_bytes`.

    Args:
        request: the incoming request.
        max_bytes: the largest body accepted.

    Returns:
        The body's bytes. Raises `APIError` 413 when it is (or declares itself) larger, 400 when the
        client went away before sending it all.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("Content-Length is not a number", code="bad_content_length")
        if int(declared) > max_bytes:
            raise too_large(max_bytes)
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        raise bad_request("the client closed the connection before sending the whole body") from None
    return b"".join(chunks)


async def read_json(request: Request, max_bytes: int) -> tuple[Any, int]:
    """The body parsed as JSON, and its size in bytes.

    Args:
        request: the incoming request.
        max_bytes: the largest body accepted.

    Returns:
        (parsed JSON value, body size). Raises `APIError` 400 for anything that is not one JSON value.
    """
    data = await read_body(request, max_bytes)
    if not data.strip():
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        return json.loads(data), len(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise bad_request(f"the request body is not valid JSON ({reason})", code="invalid_json") from None


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"
