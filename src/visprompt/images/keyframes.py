"""A video's scenes and one keyframe each, found while its frames stream past (memory flat in length).

`find_keyframes(path, max_frames)`:

1. **cuts**: PySceneDetect's `ContentDetector` scores each frame's change in hue, saturation and
   brightness against the frame before (on the small analysis copy); a score over `threshold` starts
   a new scene, at most one per `min_scene_s`;
2. **uniform fallback**: a stretch longer than `duration / max_frames` with no cut is split there,
   so a single-shot video (a lecture, a pan) still gets keyframes spread over its length;
3. **keyframe**: each scene's frame `settle_s` after its start (past a fade or motion blur at the
   cut), or its last frame when the scene is shorter;
4. **near-duplicates**: a scene whose keyframe looks like the one before (16 x 16 grey thumbnails
   differing by less than `duplicate` on average) joins it, which folds back uniform splits of a
   static shot and cuts between two takes of the same view;
5. **budget**: while more than `max_frames` scenes are held, the two neighbours that look most
   alike are joined, so at most `max_frames + 1` keyframes are ever in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import VideoError
from .video import VideoFrame, VideoInfo, VideoSource, probe_video, read_frames

THUMB = 16  # side of the grey thumbnail that near-duplicate checks compare
FALLBACK_INTERVAL = 30.0  # seconds between uniform splits when the header gives no duration


@dataclass
class Scene:
    """A stretch of the video. start, end: seconds; image: its keyframe (RGB); thumb: [16, 16]
    float32 grey in [0, 1] of the keyframe."""

    start: float
    end: float
    image: Image.Image
    thumb: np.ndarray


@dataclass
class Keyframes:
    """The scenes in order (starts increasing, inside [0, duration)), the video's length in seconds,
    its header, how many frames were decoded and how many cuts the detector found."""

    scenes: list[Scene]
    duration: float
    info: VideoInfo
    frames: int
    cuts: int


def thumbnail(bgr: np.ndarray) -> np.ndarray:
    """[h, w, 3] uint8 BGR -> [16, 16] float32 grey in [0, 1]."""
    import cv2

    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    return cv2.resize(grey, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def thumb_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two thumbnails, 0 (same) to 1."""
    return float(np.abs(a - b).mean())


def _content_detector(threshold: float, min_scene_s: float):
    try:
        from scenedetect import ContentDetector
        from scenedetect.detector import FlashFilter
    except ImportError as exc:
        raise VideoError(f"scene detection needs PySceneDetect (pip install 'visprompt[video]'): {exc}") from None
    # SUPPRESS: a cut is reported at the frame that makes it (MERGE reports some cuts frames later).
    return ContentDetector(threshold=threshold, min_scene_len=float(min_scene_s), filter_mode=FlashFilter.Mode.SUPPRESS)


class _SceneList:
    """The scenes closed so far, with near-duplicate joining and the frame budget."""

    def __init__(self, max_frames: int, duplicate: float):
        self.scenes: list[Scene] = []
        self.max_frames = max_frames
        self.duplicate = duplicate

    def add(self, scene: Scene) -> None:
        if self.scenes and thumb_distance(self.scenes[-1].thumb, scene.thumb) < self.duplicate:
            self.scenes[-1].end = scene.end
            return
        self.scenes.append(scene)
        while len(self.scenes) > self.max_frames:
            gaps = [thumb_distance(a.thumb, b.thumb) for a, b in zip(self.scenes, self.scenes[1:])]
            i = int(np.argmin(gaps))
            self.scenes[i].end = self.scenes[i + 1].end
            del self.scenes[i + 1]


def find_keyframes(
    path: VideoSource,
    max_frames: int = 8,
    threshold: float = 27.0,
    min_scene_s: float = 0.5,
    settle_s: float = 0.5,
    duplicate: float = 0.04,
    max_side: int = 512,
) -> Keyframes:
    """Scenes and keyframes of a video, decoded once, frame by frame (see the module's steps).

    Args:
        path: a video file FFmpeg reads (mp4, mkv, webm, avi, mov, ...), or a seekable binary file
            object holding one (decoded from memory).
        max_frames: at most this many scenes (keyframes) come back.
        threshold: ContentDetector's cut threshold (higher: fewer cuts).
        min_scene_s: no two cuts closer than this.
        settle_s: a scene's keyframe is its frame this long after the scene starts.
        duplicate: neighbouring scenes whose keyframe thumbnails differ less than this are joined.
        max_side: keyframe images are scaled down to this longer side.

    Returns:
        `Keyframes`; every scene has a keyframe and scenes tile [0, duration).
    """
    if max_frames < 1:
        raise VideoError(f"max_frames must be >= 1, got {max_frames}")
    info = probe_video(path)
    detector = _content_detector(threshold, min_scene_s)
    from scenedetect import FrameTimecode

    fps = info.fps or 25.0
    interval = (info.duration / max_frames) if info.duration else FALLBACK_INTERVAL
    closed = _SceneList(max_frames, duplicate)
    start: float | None = None
    key: tuple[Image.Image, np.ndarray] | None = None
    last: VideoFrame | None = None
    cuts = frames = 0

    def close(end: float) -> None:
        image, thumb = key if key is not None else (last.image(max_side), thumbnail(last.small))
        closed.add(Scene(start, end, image, thumb))

    for frame in read_frames(path):
        frames += 1
        cut = bool(detector.process_frame(FrameTimecode(frame.time, fps), frame.small))
        if start is None:
            start = frame.time
        elif cut or frame.time - start >= interval:
            cuts += int(cut)
            close(frame.time)
            start, key = frame.time, None
        if key is None and frame.time - start >= min(settle_s, interval / 2):
            key = (frame.image(max_side), thumbnail(frame.small))
        last = frame
    step = 1.0 / fps
    duration = max(info.duration or 0.0, last.time + step)
    close(duration)
    scenes = closed.scenes
    scenes[0].start = 0.0  # the first scene starts with the video (its first frame may be stamped later)
    return Keyframes(scenes, duration, info, frames, cuts)
