"""The server's settings: where it listens, who may call it, where media may come from, and its limits.

Every limit here has one home: the CLI's flags default to these values, and the error a client gets
names the limit it went over.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import VispromptError

API_KEY_ENV = "VISPROMPT_API_KEY"


@dataclass
class ServeConfig:
    """Settings of one `visprompt serve` process.

    Fields:
        host, port: where uvicorn listens (loopback by default: exposing the server is a choice).
        model_name: the id `/v1/models` lists and requests may name (default: the backend's name).
        api_key: when set, `/v1/*` needs `Authorization: Bearer <key>`.
        allowed_media_domains: host names whose http(s) image URLs are fetched (exact match); empty:
            only `data:` URLs.
        allowed_local_media_path: a folder whose files `file://` image URLs may name; None: none.
        max_body_bytes: a request body larger than this is refused while it is read (413).
        max_images: images in one request, all turns together.
        max_image_bytes: encoded bytes of one image (a data: URL's payload, a fetched or local file).
        max_image_pixels: width x height of one image, read from its header before decoding (a
            video's frames too).
        max_video_bytes: the largest video `POST /v1/tasks/video` takes; an upload is refused (413)
            the moment it passes this, while it streams in.
        max_tokens_limit: the most completion tokens one choice may ask for (and the default cap).
        max_n: the most choices (`n`) one request may ask for.
        max_queued: sequences that may wait for a batch slot beyond the running batch; more is a 429.
        request_timeout: seconds one request may take, fetching and generating (504 beyond).
        fetch_timeout: seconds one image URL may take, all redirects included.
        max_redirects: redirects followed per image URL, each one checked like the first URL.
        retry_after: seconds a 429 tells the client to wait.

    Memory stays bounded: at most (scheduler batch + max_queued) sequences are admitted, each request's
    body read to max_body_bytes before anything else, and at most `chat.PREPARE_THREADS` requests hold
    decoded images at once (max_images x max_image_pixels x 3 bytes each); the backends' feature
    caches are bounded by bytes. Task requests (`/v1/tasks/*`) hold capacity like chat requests, and at
    most `tasks.VIDEO_UPLOADS` videos (each up to max_video_bytes) are held in memory at once.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None
    api_key: str | None = None
    allowed_media_domains: tuple[str, ...] = ()
    allowed_local_media_path: Path | None = None
    max_body_bytes: int = 20 << 20  # 20 MiB
    max_images: int = 8
    max_image_bytes: int = 10 << 20  # 10 MiB
    max_image_pixels: int = 16_000_000
    max_video_bytes: int = 64 << 20  # 64 MiB
    max_tokens_limit: int = 1024
    max_n: int = 8
    max_queued: int = 64
    request_timeout: float = 300.0
    fetch_timeout: float = 5.0
    max_redirects: int = 3
    retry_after: int = 1

    def __post_init__(self) -> None:
        self.allowed_media_domains = tuple(
            d.strip().lower().strip("[]") for d in self.allowed_media_domains if d.strip()
        )
        if self.allowed_local_media_path is not None:
            folder = Path(self.allowed_local_media_path).expanduser().resolve()
            if not folder.is_dir():
                raise VispromptError(f"--allowed-local-media-path {str(folder)!r} is not a folder")
            self.allowed_local_media_path = folder
        for name in (
            "max_body_bytes",
            "max_images",
            "max_image_bytes",
            "max_image_pixels",
            "max_video_bytes",
            "max_tokens_limit",
            "max_n",
        ):
            if getattr(self, name) < 1:
                raise VispromptError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queued < 0 or self.max_redirects < 0:
            raise VispromptError("max_queued and max_redirects must be >= 0")
        if self.request_timeout <= 0 or self.fetch_timeout <= 0:
            raise VispromptError("timeouts must be > 0 seconds")
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
