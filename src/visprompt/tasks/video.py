"""A video summary: its scenes found while the video streams past, each described, then summarised.

`summarize_video(backend, path)`:

1. `images.keyframes.find_keyframes` decodes the video once, frame by frame, and returns at most
   `max_frames` scenes with a keyframe each (cuts by PySceneDetect's content detector, uniform
   splits where there are none, near-duplicates joined);
2. every keyframe is described in one batched `backend.generate` call (continuous batching: the
   descriptions decode together);
3. one more generation turns the timed descriptions into a short summary (cut back to its last
   full sentence if it hit the length limit).

The result holds the summary, the duration and the scenes (start and end in seconds, description);
`render()` gives the summary and one `mm:ss` line per scene.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..engine.backend import Backend, SamplingParams
from ..images.keyframes import find_keyframes
from ..images.video import VideoSource
from .assistant import DESCRIBE_PROMPTS, user_turn

SUMMARY_PROMPT = (
    "These are the scenes of a video, in order, each with its start time:\n{scenes}\n"
    "Write a summary of the whole video in one or two sentences."
)


def timestamp(seconds: float) -> str:
    """Seconds as mm:ss (minutes keep counting past an hour: 75:02)."""
    s = int(max(0.0, seconds))
    return f"{s // 60:02d}:{s % 60:02d}"


@dataclass
class SceneSummary:
    """One scene: start and end in seconds, and what its keyframe shows."""

    start: float
    end: float
    description: str


@dataclass
class VideoSummary:
    """summary: a sentence or two about the whole video; duration: seconds; scenes: in order."""

    summary: str
    duration: float
    scenes: list[SceneSummary] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """{"summary", "duration", "scenes": [{"start", "end", "description"}]}, times rounded to ms."""
        out = asdict(self)
        out["duration"] = round(self.duration, 3)
        for s in out["scenes"]:
            s["start"], s["end"] = round(s["start"], 3), round(s["end"], 3)
        return out

    def render(self) -> str:
        """The summary, then one line per scene: "mm:ss  description"."""
        return "\n".join([self.summary, *(f"{timestamp(s.start)}  {s.description}" for s in self.scenes)])


def summarize_video(
    backend: Backend,
    path: VideoSource,
    max_frames: int = 8,
    params: SamplingParams | None = None,
    image_after_text: bool = False,
) -> VideoSummary:
    """Describe each scene of the video at `path` and summarise them (see the module's steps).

    Args:
        backend: any `Backend` (the descriptions go to it as one batch).
        path: the video file (or a seekable binary file object holding one: decoded from memory).
        max_frames: at most this many scenes, so at most this many images reach the model.
        params: sampling for the descriptions and the summary.
        image_after_text: put the image after the request (models trained that way).
    """
    params = params or SamplingParams()
    found = find_keyframes(path, max_frames=max_frames)
    conversations = [[user_turn([s.image], DESCRIBE_PROMPTS["brief"], image_after_text)] for s in found.scenes]
    descriptions = [r.text for r in backend.generate(conversations, params)]
    scenes = [SceneSummary(s.start, s.end, d) for s, d in zip(found.scenes, descriptions)]
    listing = "\n".join(f"{timestamp(s.start)} {s.description}" for s in scenes)
    request = [{"role": "user", "content": SUMMARY_PROMPT.format(scenes=listing)}]
    (summary,) = backend.generate([request], params)
    return VideoSummary(whole_sentences(summary.text, summary.finish_reason), found.duration, scenes)


def whole_sentences(text: str, finish_reason: str) -> str:
    """A reply cut by the length limit, back to its last full sentence (if it has one)."""
    if finish_reason != "length":
        return text
    end = max(text.rfind(p) for p in ".!?")
    return text[: end + 1] if end > 0 else text
