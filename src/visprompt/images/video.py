"""Video frames, decoded one at a time with PyAV (FFmpeg): nothing holds more than the current frame.

`read_frames(source)` yields a `VideoFrame` per decoded frame, in presentation order: its time in
seconds, a small BGR copy for analysis (scene detection, duplicate checks) and the decoded frame
itself, turned into an RGB image only when asked (`VideoFrame.image`). Memory stays flat in the
video's length. `probe_video(source)` reads the container's header: duration, frame rate and size.
A source is a file's path or a seekable binary file object (`io.BytesIO`: the server decodes an
upload from memory, never writing it to disk). Anything that is not a decodable video (a missing,
empty or corrupt file, no video stream, a codec FFmpeg lacks) is a one-line `VideoError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image

from ..errors import VideoError, one_line

ANALYSIS_WIDTH = 256  # scene detection compares frames at this width (PySceneDetect's own advice)
VideoSource = str | os.PathLike | BinaryIO  # a path, or a seekable binary file (decoded from memory)


@dataclass(frozen=True)
class VideoInfo:
    """What the container says. duration: seconds (None when the header does not say); fps: the
    average frame rate (None when unknown); width, height: pixels of the video stream."""

    duration: float | None
    fps: float | None
    width: int
    height: int


class VideoFrame:
    """One decoded frame.

    Attributes:
        time: presentation time in seconds from the start of the stream.
        index: frame number in decode order, from 0.
        small: [h, w, 3] uint8 BGR, at most `ANALYSIS_WIDTH` wide (what analysis looks at).
    """

    def __init__(self, frame, time: float, index: int, small: np.ndarray):
        self._frame = frame
        self.time = time
        self.index = index
        self.small = small

    def image(self, max_side: int = 512) -> Image.Image:
        """The frame as an RGB image, scaled down so its longer side is at most `max_side`."""
        w, h = self._frame.width, self._frame.height
        scale = min(1.0, max_side / max(w, h))
        return self._frame.to_image(width=max(2, round(w * scale)), height=max(2, round(h * scale)))


def _import_av():
    try:
        import av
    except ImportError as exc:
        raise VideoError(f"videos need PyAV (pip install 'visprompt[video]'): {exc}") from None
    return av


def _in_memory(source: VideoSource) -> bool:
    return hasattr(source, "read") and hasattr(source, "seek")


def _name(source: VideoSource) -> str:
    """How messages call the video: its path, or "the video" for a file object."""
    return "the video" if _in_memory(source) else os.fspath(source)


@contextmanager
def _open(source: VideoSource) -> Iterator[tuple[object, object]]:
    """(container, its first video stream), or a one-line VideoError. A file object is read from its
    start (each call rewinds it) and left open."""
    av = _import_av()
    name = _name(source)
    if _in_memory(source):
        size = source.seek(0, os.SEEK_END)
        source.seek(0)
        target = source
    else:
        if not os.path.isfile(name):
            raise VideoError(f"no such video file: {name}")
        size, target = os.path.getsize(name), name
    if size == 0:
        raise VideoError(f"{name} is empty (0 bytes), not a video")
    try:
        container = av.open(target, mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"{name} is not a video FFmpeg can read: {one_line(exc)}") from None
    try:
        if not container.streams.video:
            raise VideoError(f"{name} has no video stream")
        yield container, container.streams.video[0]
    finally:
        container.close()


def _info(container, stream) -> VideoInfo:
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000  # av.time_base: microseconds
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else None
    return VideoInfo(duration if duration and duration > 0 else None, fps, stream.width, stream.height)


def probe_video(source: VideoSource) -> VideoInfo:
    """The video's duration, frame rate and size from its header (no frame is decoded)."""
    with _open(source) as (container, stream):
        return _info(container, stream)


def read_frames(source: VideoSource, analysis_width: int = ANALYSIS_WIDTH) -> Iterator[VideoFrame]:
    """Decode the video's frames one by one, in order. A frame whose data is damaged ends the video
    with a VideoError unless at least one frame came before it (then the frames so far stand)."""
    av = _import_av()
    with _open(source) as (container, stream):
        stream.thread_type = "AUTO"  # FFmpeg decodes with its own threads
        info = _info(container, stream)
        w, h = stream.width or 0, stream.height or 0
        scale = min(1.0, analysis_width / w) if w else 1.0
        sw, sh = max(2, round(w * scale)), max(2, round(h * scale))
        step = 1.0 / info.fps if info.fps else 0.0
        index = 0
        try:
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else index * step
                small = frame.to_ndarray(format="bgr24", width=sw, height=sh)  # [sh, sw, 3]
                yield VideoFrame(frame, t, index, small)
                index += 1
        except (av.FFmpegError, ValueError) as exc:
            if index == 0:
                raise VideoError(f"{_name(source)} cannot be decoded: {one_line(exc)}") from None
        if index == 0:
            raise VideoError(f"{_name(source)} holds no video frames")
