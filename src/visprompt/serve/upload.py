"""A `multipart/form-data` upload read to a cap and kept in memory.

python-multipart's streaming parser is fed the body chunk by chunk as it arrives (Starlette's own
form parsing would spool a file over 1 MB to a temporary file on disk, and caps no file's size). The
one file part goes into an `io.BytesIO`: it never touches the disk. A declared length over the cap
is refused (413) before a byte is read, and a body without one is refused the moment it passes the
cap, so the server never holds more of one upload than the cap plus one network chunk. Text fields
are short (`FIELD_BYTES`) and few (`MAX_FIELDS`); anything malformed is a one-line 400.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from .errors import APIError, bad_request

FIELD_BYTES = 4096  # the longest text field
MAX_FIELDS = 16  # text fields beside the file
FORM_BYTES = 64 << 10  # what the body may hold beside the file: boundaries, part headers, text fields


@dataclass
class Upload:
    """A parsed form: the file (rewound; None when the form had none), the text fields, and the size
    of the whole body."""

    file: io.BytesIO | None = None
    filename: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    body_bytes: int = 0


def file_too_large(what: str, max_bytes: int, flag: str) -> APIError:
    """The 413 for an upload over `max_bytes`."""
    return APIError(413, f"the {what} is over the {_size(max_bytes)} limit ({flag})", code="file_too_large")


class _Form:
    """python-multipart's callbacks, collecting one file field into memory and short text fields."""

    def __init__(self, file_field: str, max_file_bytes: int, what: str, flag: str):
        self.file_field = file_field
        self.max_file_bytes = max_file_bytes
        self.what, self.flag = what, flag
        self.upload = Upload()
        self.ended = False
        self._header: list[bytes] = []
        self._value: list[bytes] = []
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._text = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header.append(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.append(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._disposition, self._name, self._is_file = b"", "", False
        self._text = bytearray()

    def _header_end(self) -> None:
        if b"".join(self._header).strip().lower() == b"content-disposition":
            self._disposition = b"".join(self._value)
        self._header, self._value = [], []

    def _headers_finished(self) -> None:
        kind, params = parse_options_header(self._disposition)
        if kind != b"form-data" or b"name" not in params:
            raise bad_request("a form part has no Content-Disposition: form-data; name=...", code="invalid_form")
        self._name = params[b"name"].decode("utf-8", "replace")
        self._is_file = b"filename" in params
        if self._is_file:
            if self._name != self.file_field:
                raise bad_request(
                    f"unexpected file field {self._name[:40]!r}: send the {self.what} as {self.file_field!r}",
                    param=self._name[:40],
                    code="invalid_form",
                )
            if self.upload.file is not None:
                raise bad_request(f"send one {self.what}, not several", param=self.file_field, code="invalid_form")
            self.upload.file = io.BytesIO()
            self.upload.filename = params[b"filename"].decode("utf-8", "replace")
        elif len(self.upload.fields) >= MAX_FIELDS:
            raise bad_request(f"the form has more than {MAX_FIELDS} fields", code="invalid_form")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            file = self.upload.file
            if file.tell() + (end - start) > self.max_file_bytes:
                raise file_too_large(self.what, self.max_file_bytes, self.flag)
            file.write(data[start:end])
            return
        if len(self._text) + (end - start) > FIELD_BYTES:
            raise bad_request(f"form field {self._name[:40]!r} is over {FIELD_BYTES} bytes", param=self._name[:40])
        self._text += data[start:end]

    def _part_end(self) -> None:
        if self._is_file:
            return
        try:
            self.upload.fields[self._name] = self._text.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request(f"form field {self._name[:40]!r} is not UTF-8 text", param=self._name[:40]) from None

    def _end(self) -> None:
        self.ended = True


async def read_upload(request: Request, file_field: str, max_file_bytes: int, what: str, flag: str) -> Upload:
    """The form of a `multipart/form-data` request, its file in memory.

    Args:
        request: the incoming request.
        file_field: the name of the form's one file field.
        max_file_bytes: the largest file accepted.
        what: what the file is, for messages ("video").
        flag: the setting that sets the cap, for messages ("--max-video-bytes").

    Returns:
        The upload (its file rewound, or None when the form had no file). Raises `APIError`: 415 for a
        body that is not multipart/form-data, 413 once the file or the body passes its cap (checked
        on the declared length first, then as the body arrives), 400 for a malformed form or a
        client that left before sending all of it.
    """
    kind, params = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data":
        raise APIError(
            415,
            f"send the {what} as multipart/form-data, in a file field {file_field!r}",
            code="unsupported_media_type",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise bad_request("the multipart/form-data Content-Type has no boundary", code="invalid_form")
    max_body = max_file_bytes + FORM_BYTES
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("Content-Length is not a number", code="bad_content_length")
        if int(declared) > max_body:
            raise file_too_large(what, max_file_bytes, flag)
    form = _Form(file_field, max_file_bytes, what, flag)
    total = 0
    try:
        parser = MultipartParser(boundary, callbacks=form.callbacks())
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_body:
                raise file_too_large(what, max_file_bytes, flag)
            parser.write(chunk)
    except ClientDisconnect:
        raise bad_request("the client closed the connection before sending the whole body") from None
    except FormParserError as exc:
        raise bad_request(
            f"the form data is malformed: {' '.join(str(exc).split())[:200]}", code="invalid_form"
        ) from None
    if not form.ended:
        raise bad_request("the form data ended before its closing boundary", code="invalid_form")
    form.upload.body_bytes = total
    if form.upload.file is not None:
        form.upload.file.seek(0)
    return form.upload


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"
