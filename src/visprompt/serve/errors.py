"""Errors as clients of the OpenAI API expect them: a status code and one JSON shape.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages", "code": "..."}}

`APIError` carries all of it; the app turns it (and a `VispromptError` from the layers below, and
anything unexpected) into that response. A client never sees a stack trace: an unexpected exception
is a 500 whose message says only that the server failed, with the request id to find it in the log.
"""

from __future__ import annotations

from ..errors import ImageError, VispromptError

# OpenAI's error types by status code.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered to the client.

    Args:
        status: the HTTP status code.
        message: one line for the client (never a traceback, never request content).
        param: the request field at fault, when one is.
        code: a short machine-readable reason ("too_many_images", "body_too_large", ...).
        headers: extra response headers (Retry-After, WWW-Authenticate).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        """The OpenAI error JSON."""
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 for a request the server cannot take as it is."""
    return APIError(400, message, param=param, code=code)


def from_visprompt(exc: VispromptError, param: str | None = None) -> APIError:
    """A user error raised below the server (a bad image, a prompt over the context) as a 400."""
    code = "invalid_image" if isinstance(exc, ImageError) else "invalid_request"
    return APIError(400, str(exc), param=param, code=code)
