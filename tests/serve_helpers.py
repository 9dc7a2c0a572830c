"""Helpers for the server's tests: images as data URLs, a PNG that claims to be huge, a loopback
HTTP server that counts its requests, a guard that fails any connection leaving loopback, and a
submit-only backend whose replies wait for a gate."""

from __future__ import annotations

import base64
import io
import socket
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from visprompt.engine.backend import GenerationResult, SamplingParams, StreamEvent

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def png_bytes(color="red", size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def header_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 100-byte PNG whose header claims width x height pixels (10 gigapixels by default): a
    decompression bomb as a decoder first sees it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class CountingHTTPServer:
    """A loopback HTTP server: `/img.png` is an image, `/to?url=U` redirects to U, `/loop` redirects
    to itself. `hits` lists the paths asked for."""

    def __init__(self):
        hits: list[str] = []
        image = png_bytes("green")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                hits.append(self.path)
                if self.path.startswith("/to?url="):
                    self.send_response(302)
                    self.send_header("Location", self.path[len("/to?url=") :])
                    self.end_headers()
                elif self.path == "/loop":
                    self.send_response(302)
                    self.send_header("Location", "/loop")
                    self.end_headers()
                else:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(image)))
                    self.end_headers()
                    self.wfile.write(image)

            def log_message(self, *args):
                pass

        self.hits = hits
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class LoopbackOnly:
    """Patches `socket.socket.connect`: loopback passes, `routes` maps a stand-in public address to a
    loopback one, anything else is recorded in `refused` and fails (so a test fails if the server even
    tries)."""

    def __init__(self, monkeypatch, routes: dict | None = None):
        self.routes = routes or {}
        self.refused: list = []
        real = socket.socket.connect
        guard = self

        def connect(sock, address):
            if isinstance(address, tuple):
                target = guard.routes.get((address[0], address[1]))
                if target is not None:
                    return real(sock, target)
                if address[0] not in LOOPBACK:
                    guard.refused.append(address)
                    raise OSError(f"test guard: connection to {address} refused (only loopback)")
            return real(sock, address)

        monkeypatch.setattr(socket.socket, "connect", connect)


class _GatedHandle:
    def __init__(self, backend: GatedBackend, on_event):
        self.backend, self.on_event = backend, on_event
        self.cancelled = threading.Event()
        self.time_to_first_token = None
        self.cached_prompt_tokens = 0
        self._result = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not (self.backend.gate.wait(0.01) or self.cancelled.is_set()):
            pass
        reason = "cancelled" if self.cancelled.is_set() else "stop"
        self._result = GenerationResult("" if reason == "cancelled" else "hello", reason, 3, 2)
        self.time_to_first_token = 0.0
        if reason == "stop":
            self.on_event(StreamEvent(0, 7, "hello"))
        self.on_event(StreamEvent(0, None, "", finished=True, finish_reason=reason))

    def cancel(self) -> None:
        self.backend.cancels += 1
        self.cancelled.set()

    def result(self, timeout=None) -> GenerationResult:
        return self._result


class GatedBackend:
    """A submit-only backend (no scheduler): each reply is "hello" once `gate` is set, or nothing
    when cancelled first. `cancels` counts cancellations."""

    name = "gated"
    max_batch = 1

    def __init__(self):
        self.gate = threading.Event()
        self.cancels = 0

    def submit(self, conversation, params: SamplingParams, on_event=None):
        return _GatedHandle(self, on_event)

    def generate(self, conversations, params):
        raise NotImplementedError

    def stream(self, conversation, params):
        raise NotImplementedError

    def start(self) -> None:
        pass

    def close(self) -> None:
        self.gate.set()
