"""`visprompt video`: frames streamed with PyAV, scenes found by content, keyframes described in one
batch, a summary; clips made here from real photos with cuts at known times."""

import json
import tracemalloc

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av")
pytest.importorskip("scenedetect")
skimage_data = pytest.importorskip("skimage.data")

from visprompt.cli.main import main  # noqa: E402
from visprompt.engine.backend import SamplingParams  # noqa: E402
from visprompt.engine.backends.own import OwnVLMBackend  # noqa: E402
from visprompt.errors import VideoError  # noqa: E402
from visprompt.images.keyframes import find_keyframes  # noqa: E402
from visprompt.images.video import probe_video, read_frames  # noqa: E402
from visprompt.tasks.video import summarize_video, timestamp, whole_sentences  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")
SIZE = (64, 48)


def photo_frames(size=SIZE) -> list[np.ndarray]:
    """Real photos (scikit-image) as [h, w, 3] uint8 RGB frames of `size`."""
    out = []
    for name in PHOTOS:
        img = Image.fromarray(getattr(skimage_data, name)()).convert("RGB").resize(size)
        out.append(np.asarray(img))
    return out


def write_clip(path, cuts, duration, fps=10, size=SIZE):
    """A clip that shows photo k from cuts[k] on (cuts[0] is 0), `fps` frames a second."""
    frames = photo_frames(size)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(int(round(duration * fps))):
            k = sum(1 for c in cuts if c <= i / fps) - 1
            frame = av.VideoFrame.from_ndarray(frames[k % len(frames)], format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    cuts = [0.0, 1.5, 3.2, 4.6]
    return write_clip(tmp_path_factory.mktemp("video") / "cuts.mp4", cuts, duration=6.0), cuts


def test_frames_stream_in_order_with_their_times(clip):
    path, _ = clip
    info = probe_video(path)
    assert info.width == 64 and info.height == 48 and info.fps == pytest.approx(10)
    times = [f.time for f in read_frames(path)]
    assert len(times) == 60 and times == sorted(times) and times[0] == 0.0
    assert times[-1] == pytest.approx(5.9, abs=0.01)


def test_scenes_are_found_within_half_a_second_of_each_cut(clip):
    path, cuts = clip
    found = find_keyframes(path, max_frames=8)
    starts = [s.start for s in found.scenes]
    assert len(starts) == len(cuts)
    assert all(abs(s - c) <= 0.5 for s, c in zip(starts, cuts)), starts
    assert found.duration == pytest.approx(6.0, abs=0.11)
    assert all(a.end == b.start for a, b in zip(found.scenes, found.scenes[1:]))  # scenes tile the video
    assert all(s.image.size == SIZE for s in found.scenes)


def test_the_frame_budget_keeps_the_most_different_scenes(clip):
    path, _ = clip
    found = find_keyframes(path, max_frames=2)
    starts = [s.start for s in found.scenes]
    assert len(starts) == 2 and starts[0] == 0.0 and 0 < starts[1] < found.duration


def test_a_static_shot_is_one_scene_and_uniform_splits_fold_back(tmp_path):
    path = write_clip(tmp_path / "still.mp4", [0.0], duration=4.0)
    found = find_keyframes(path, max_frames=8)  # splits every 0.5 s, then near-duplicates join
    assert [(s.start, s.end) for s in found.scenes] == [(0.0, pytest.approx(4.0, abs=0.11))]


def _traced_peak(path) -> tuple[int, int]:
    tracemalloc.start()
    try:
        found = find_keyframes(path, max_frames=4)
        return tracemalloc.get_traced_memory()[1], found.frames
    finally:
        tracemalloc.stop()


def test_memory_is_flat_in_the_video_length(tmp_path):
    """A 10-minute clip (a cut every 5 s: 120 scenes for a budget of 4) peaks within 1.5x of a
    1-minute one: frames are streamed and only the budget's keyframes are held."""
    cuts = [5.0 * k for k in range(120)]
    short = write_clip(tmp_path / "1min.mp4", cuts[:12], duration=60, fps=1)
    long = write_clip(tmp_path / "10min.mp4", cuts, duration=600, fps=1)
    _traced_peak(short)  # imports and first-use caches out of the way
    peak_short, frames_short = _traced_peak(short)
    peak_long, frames_long = _traced_peak(long)
    assert (frames_short, frames_long) == (60, 600)
    assert peak_long <= 1.5 * peak_short, (peak_short, peak_long)


def test_corrupt_empty_and_missing_videos_are_one_line_errors(tmp_path, clip, capsys):
    path, _ = clip
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    cut = tmp_path / "truncated.mp4"
    cut.write_bytes(path.read_bytes()[:1500])
    text = tmp_path / "notes.txt"
    text.write_text("not a video at all\n")
    for bad in (empty, noise, cut, text, tmp_path / "missing.mp4"):
        with pytest.raises(VideoError):
            find_keyframes(bad)
        assert main(["video", str(bad), "--model", str(tmp_path / "no-model")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_timestamps_are_minutes_and_seconds():
    assert [timestamp(t) for t in (0, 5.9, 65, 3600 + 2)] == ["00:00", "00:05", "01:05", "60:02"]


def test_a_summary_cut_by_the_length_limit_ends_at_its_last_sentence():
    assert whole_sentences("A cat sits. Then a dog runs and", "length") == "A cat sits."
    assert whole_sentences("A cat sits. Then a dog runs and", "stop") == "A cat sits. Then a dog runs and"
    assert whole_sentences("no sentence end", "length") == "no sentence end"


def test_summary_describes_every_scene_in_one_batch(clip, tiny_model):
    path, cuts = clip
    backend = OwnVLMBackend(tiny_model)
    calls = []
    generate = backend.generate

    def counting(conversations, params):
        calls.append(len(conversations))
        return generate(conversations, params)

    backend.generate = counting
    result = summarize_video(backend, path, max_frames=8, params=SamplingParams(max_new_tokens=4))
    assert calls == [len(cuts), 1]  # every keyframe in one batch, then the summary
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data) == {"summary", "duration", "scenes"} and isinstance(data["summary"], str)
    starts = [s["start"] for s in data["scenes"]]
    assert starts == sorted(set(starts)) and all(0 <= s < data["duration"] for s in starts)
    assert all(isinstance(s["description"], str) for s in data["scenes"])
    lines = result.render().splitlines()
    assert lines[1].startswith("00:00  ") and lines[2].startswith("00:01  ")
