"""Safe image ingestion: every image that enters visprompt goes through `load_image`.

Images come from users (CLI arguments, API requests, dataset files), so they are untrusted: the loader
checks sizes before decoding, decodes strictly, refuses anything odd with a one-line `ImageError`, and
returns a plain RGB image with no metadata (EXIF, GPS, ICC) left to leak downstream.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import stat
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ..errors import ImageError, one_line

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 50 * 1024 * 1024

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | BinaryIO

# The only formats Image.open may pick. Keeping the rest of Pillow's decoders out of reach shrinks the
# attack surface (EPS runs Ghostscript) and stops random bytes being "recognised" as a format with no
# magic number (TGA).
_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "PPM")

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Load an image from a path, bytes, a `data:image/...;base64,` URL, a PIL image or a binary file.

    Returns a fully loaded RGB image, EXIF orientation applied, with no metadata at all. Animated images
    give their first frame (a PIL image given as source gives its current frame). Raises `ImageError`
    with a one-line message for anything that is not a usable image: unknown, empty, truncated or corrupt
    data, a missing file, bad base64, an http(s) URL, more than `max_bytes` of input or more than
    `max_pixels` pixels (checked from the header, before any pixel data is decoded). Pillow's own
    decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) still applies on top of `max_pixels`.
    """
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels)
        with _decoding(max_pixels):
            source.load()  # a lazily opened file: decode it strictly too
            oriented = ImageOps.exif_transpose(source)
    else:
        data = _read_source(source, max_bytes)
        with _decoding(max_pixels), Image.open(io.BytesIO(data), formats=_open_formats()) as img:
            _check_pixels(img.size, max_pixels)
            img.load()
            oriented = ImageOps.exif_transpose(img)
    rgb = to_rgb(oriented)
    # A fresh image holds pixels only: `.info` (ICC profile, comments, dpi) and EXIF (GPS) stay behind.
    clean = Image.new("RGB", rgb.size)
    clean.paste(rgb)
    return clean


def read_image_bytes(source: ImageSource, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The raw, still encoded bytes of a path, bytes, `data:` URL or binary file source (not a PIL
    image), with `load_image`'s checks on the source (size limit, no remote URLs, missing files).
    `load_image(read_image_bytes(s))` equals `load_image(s)`; a hash of these bytes identifies the
    decoded image without decoding it."""
    if isinstance(source, Image.Image):
        raise ImageError("a PIL image has no encoded bytes: use it directly")
    return _read_source(source, max_bytes)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB, keeping what the pixels look like.

    Transparency is composited over white; 16-bit grey (modes "I;16*" and "I", taken as 0..65535) is
    rescaled to 0..255 rather than clipped; float grey ("F") is taken as 0..255, as Pillow does.
    """
    if img.mode.startswith("I"):
        grey = np.asarray(img, dtype=np.float64) / 257  # 65535 / 257 == 255
        return _grey_to_rgb(grey)
    if img.mode == "F":
        return _grey_to_rgb(np.nan_to_num(np.asarray(img, dtype=np.float64)))
    try:
        if img.has_transparency_data:  # alpha band, or a transparent palette index / colour key
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
        return img if img.mode == "RGB" else img.convert("RGB")
    except ValueError:
        raise ImageError(f"cannot convert image mode {img.mode!r} to RGB") from None


def image_fingerprint(img: Image.Image) -> str:
    """sha256 hex digest of the image's mode, size and raw pixel bytes (RGB for `load_image` output).

    Equal pixels give equal keys whatever file or encoding they came from, so this is the cache key for
    image features.
    """
    digest = hashlib.sha256(f"{img.mode}:{img.width}x{img.height}:".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)).convert("RGB")


def _open_formats() -> list[str]:
    Image.init()  # registers every plugin once; a no-op afterwards
    return [fmt for fmt in _FORMATS if fmt in Image.OPEN]


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {_pixels(width * height)}, over the {_pixels(max_pixels)} limit (max_pixels)"
        )


def _pixels(count: int) -> str:
    return f"{count / 1e6:.1f} MP" if count >= 100_000 else f"{count} px"


# ---------------------------------------------------------------------------------------------- sources


def _read_source(source: object, max_bytes: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        _check_bytes(view.nbytes, max_bytes, "image data")
        data = view.tobytes()
    elif isinstance(source, str) and source[:5].lower() == "data:":
        data = _decode_data_url(source, max_bytes)
    elif isinstance(source, (str, os.PathLike)):
        data = _read_file(source, max_bytes)
    elif hasattr(source, "read"):
        data = _read_stream(source, max_bytes)
    else:
        raise ImageError(
            f"unsupported image source of type {type(source).__name__}: "
            "pass a file path, bytes, a data:image/... URL, a PIL image or a binary file object"
        )
    if not data:
        raise ImageError("image data is empty (0 bytes)")
    return data


def _read_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    if isinstance(path, str):
        match = _URL_SCHEME.match(path)
        if match and match.group(1).lower() in ("http", "https"):
            raise ImageError(
                "remote URLs are not fetched by the image loader (fetching belongs to a higher layer "
                "with SSRF checks): download the image and pass its bytes or path"
            )
        if match:
            raise ImageError(f"unsupported URL scheme {match.group(1)!r}: pass a local file path")
    shown = repr(str(path))  # repr keeps odd file names (newlines) on one line
    try:
        _check_regular(os.stat(path), shown, max_bytes)
        # O_NONBLOCK: should the path turn into a FIFO after the check, opening it does not wait
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb") as file:
            _check_regular(os.fstat(file.fileno()), shown, max_bytes)  # what was opened is what was checked
            return _read_stream(file, max_bytes)
    except FileNotFoundError:
        raise ImageError(f"image file not found: {shown}") from None
    except OSError as exc:
        raise ImageError(f"cannot read image file {shown}: {exc.strerror or one_line(exc)}") from None


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _check_regular(info: os.stat_result, shown: str, max_bytes: int) -> None:
    """Only a regular file is read as an image: a pipe, socket or device could block or never end."""
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for is_kind, name in _FILE_KINDS if is_kind(info.st_mode)), "not a regular file")
        raise ImageError(f"image path is {kind}, not a file: {shown}")
    _check_bytes(info.st_size, max_bytes, f"image file {shown}")


def _read_stream(stream: BinaryIO, max_bytes: int) -> bytes:
    """Read to EOF but never more than max_bytes + 1 bytes (enough to know the limit is exceeded)."""
    chunks: list[bytes] = []
    total = 0
    while total <= max_bytes:
        chunk = stream.read(max_bytes + 1 - total)
        if not chunk:
            break
        if not isinstance(chunk, (bytes, bytearray)):
            raise ImageError("file object returned text, not bytes: open it in binary mode ('rb')")
        chunks.append(bytes(chunk))
        total += len(chunk)
    _check_bytes(total, max_bytes, "image data")
    return b"".join(chunks)


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url.partition(",")
    media_type, *params = header[len("data:") :].split(";")
    if not comma or "base64" not in (p.strip().lower() for p in params):
        raise ImageError("data URL is not of the form data:image/...;base64,...")
    if not media_type.strip().lower().startswith("image/"):
        raise ImageError(f"data URL media type is {media_type.strip()!r}, not image/...")
    payload = "".join(payload.split())  # base64 in data URLs is often line-wrapped
    # The decoded size, checked before decoding (exact for valid base64; invalid base64 fails below).
    decoded_size = len(payload) * 3 // 4 - payload.endswith("=") - payload.endswith("==")
    _check_bytes(decoded_size, max_bytes, "data URL payload")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII characters
        raise ImageError(f"data URL has invalid base64: {one_line(exc)}") from None


def _check_bytes(size: int, max_bytes: int, what: str) -> None:
    if size > max_bytes:
        limit = f"{max_bytes / 2**20:.1f} MiB" if max_bytes >= 2**20 else f"{max_bytes} bytes"
        raise ImageError(f"{what} is over the {limit} limit (max_bytes)")


# --------------------------------------------------------------------------------------------- decoding


@contextmanager
def _decoding(max_pixels: int) -> Iterator[None]:
    """Decode strictly and turn whatever Pillow raises on bad data into a one-line `ImageError`."""
    try:
        with _strict_pillow():
            yield
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(f"data is not a supported image ({', '.join(_open_formats())})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(_bomb_message(exc, max_pixels)) from None
    except Exception as exc:  # Pillow's decoders raise many types on bad data (OSError, SyntaxError, ...)
        raise ImageError(f"image data is truncated or corrupt: {one_line(exc)}") from exc


def _bomb_message(exc: Exception, max_pixels: int) -> str:
    # Pillow compares the header size with its own process-wide limit inside Image.open, before we see
    # the size. It only complains above MAX_IMAGE_PIXELS, so when max_pixels is lower, that is the limit
    # the image is over.
    if max_pixels <= (Image.MAX_IMAGE_PIXELS or 0):
        limit = f"the {_pixels(max_pixels)} limit (max_pixels)"
    else:
        limit = f"Pillow's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS})"
    return f"image is over {limit}; Pillow refused it before decoding: {one_line(exc)}"


_strict_lock = threading.Lock()
_strict_users = 0
_saved_settings: tuple[bool, warnings.catch_warnings] | None = None


@contextmanager
def _strict_pillow() -> Iterator[None]:
    """Make Pillow strict while this block runs, whatever the process-wide settings are.

    Pillow reads two process globals while decoding. `ImageFile.LOAD_TRUNCATED_IMAGES`, if any other
    library set it, makes truncated or corrupt files load silently (grey bands); it is forced off. The
    warnings filters: between MAX_IMAGE_PIXELS and twice that, Pillow's bomb check only warns; that
    warning is made an exception. The first loader in saves the settings and the last one out restores
    them, so concurrent loads neither wait for each other nor restore each other's state (other threads
    decoding meanwhile are strict too, which fails safe).
    """
    global _strict_users, _saved_settings
    with _strict_lock:
        if _strict_users == 0:
            filters = warnings.catch_warnings()
            filters.__enter__()
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            _saved_settings = (ImageFile.LOAD_TRUNCATED_IMAGES, filters)
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_users += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_users -= 1
            if _strict_users == 0:
                assert _saved_settings is not None
                ImageFile.LOAD_TRUNCATED_IMAGES, filters = _saved_settings
                filters.__exit__(None, None, None)
                _saved_settings = None
