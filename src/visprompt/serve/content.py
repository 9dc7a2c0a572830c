"""A checked request's messages as the conversation a backend takes, every image read and decoded.

Images are read by the `MediaFetcher` (data:, allowed http(s) and local URLs) and decoded by
`visprompt.images.load_image` with the server's limits: the byte cap before decoding, the pixel
count from the header before any pixel is decoded, strict decoding (a truncated or corrupt image is
an error, not a grey band). They stay in memory: nothing is written to disk. The same URL twice in
one request (an image in an earlier turn sent again) is read and decoded once.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from ..engine.backend import Conversation
from ..errors import ImageError
from ..images import load_image
from .errors import bad_request
from .media import MediaError, MediaFetcher
from .protocol import ChatRequest


@dataclass
class ImageStats:
    """What the log may say about a request's images: how many and how large, never what they are."""

    count: int = 0
    encoded_bytes: int = 0
    pixels: int = 0


def build_conversation(request: ChatRequest, fetcher: MediaFetcher, max_pixels: int) -> tuple[Conversation, ImageStats]:
    """The backend conversation for `request`, images decoded. Blocking (it may fetch): run it in a
    worker thread.

    Args:
        request: a checked request.
        fetcher: reads image URLs.
        max_pixels: the most pixels one image may have.

    Returns:
        (conversation with `{"type": "image", "image": PIL image}` parts, image sizes for the log).
        Raises `APIError` 400 naming the message part of a refused or unusable image.
    """
    decoded: dict[str, Image.Image] = {}
    stats = ImageStats()
    conversation: Conversation = []
    for i, message in enumerate(request.messages):
        parts = []
        for j, part in enumerate(message.parts):
            if part.url is None:
                parts.append({"type": "text", "text": part.text or ""})
                continue
            if part.url not in decoded:
                decoded[part.url] = read_image(part.url, fetcher, max_pixels, f"messages[{i}].content[{j}]", stats)
            parts.append({"type": "image", "image": decoded[part.url]})
        conversation.append({"role": message.role, "content": parts if parts else ""})
    return conversation, stats


def read_image(url: str, fetcher: MediaFetcher, max_pixels: int, where: str, stats: ImageStats) -> Image.Image:
    """The image `url` names, read and decoded with the server's limits (blocking: a worker thread).

    Args:
        url: a data:, allowed http(s) or file: URL.
        fetcher: reads it.
        max_pixels: the most pixels it may have.
        where: the request field it came from (the error's `param`).
        stats: its sizes are added here.

    Returns:
        The RGB image. Raises `APIError` 400 naming `where` for a refused or unusable image.
    """
    try:
        data = fetcher.read(url)
        image = load_image(data, max_pixels=max_pixels, max_bytes=fetcher.max_bytes)
    except MediaError as exc:
        raise bad_request(f"{where}: {exc}", param=where, code=exc.code) from None
    except ImageError as exc:
        raise bad_request(f"{where}: {exc}", param=where, code="invalid_image") from None
    stats.count += 1
    stats.encoded_bytes += len(data)
    stats.pixels += image.width * image.height
    return image
