"""`POST /v1/tasks/*` on `visprompt serve` with a random tiny model: each task answers what the task
itself gives on the same model (the video as `visprompt video --json` prints it), a lesson validates
against the packaged schema, a story's state goes back and forth; a video upload stays in memory, is
refused (413) the moment it passes its cap and never becomes a file; hostile input is a one-line 4xx;
an explanation is the eval explainer's, drawn as PNGs. And `response_format` (json_schema, json_object) constrains chat completions to JSON."""

from __future__ import annotations

import base64
import io
import json
import socket
import tempfile
import threading
import time
from dataclasses import asdict

import httpx
import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image
from serve_helpers import GatedBackend, data_url, header_bomb, png_bytes
from test_backend_contract import own_backend

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")

from visprompt.engine.backend import SamplingParams  # noqa: E402
from visprompt.serve import ServeConfig, serve_in_thread  # noqa: E402
from visprompt.tasks.assistant import Assistant  # noqa: E402
from visprompt.tasks.story import Story  # noqa: E402

N = 12  # tokens per generation
VIDEO_CAP = 1 << 20  # --max-video-bytes in these tests
BUDGET = 1000  # a lesson's tokens


@pytest.fixture(scope="module")
def live():
    """The own tiny model (a context that holds a lesson) behind a server on loopback."""
    backend = own_backend(tiny_config(lm_max_position=2048))
    config = ServeConfig(
        model_name="own-tiny",
        max_video_bytes=VIDEO_CAP,
        max_body_bytes=1 << 20,
        max_image_pixels=10_000,  # the 64 x 48 clip fits, a 128 x 96 one does not
        max_tokens_limit=BUDGET,
        max_images=4,
    )
    server = serve_in_thread(backend, config)
    yield backend, server.url
    server.stop()


def post(url: str, task: str, timeout: float = 120, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/tasks/{task}", timeout=timeout, **kw)


def one_line_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and "\n" not in error["message"] and "Traceback" not in response.text
    assert set(error) == {"message", "type", "param", "code"}
    return error


def still_serving(url: str) -> None:
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"


def picture(color: str) -> Image.Image:
    return Image.new("RGB", (40, 30), color)


# ------------------------------------------------------------------------------------------- describe


def test_describe_answers_as_the_task_does_on_the_model(live):
    backend, url = live
    local = Assistant(backend, SamplingParams(max_new_tokens=N))
    plain = post(url, "describe", json={"image": data_url(png_bytes("red")), "max_tokens": N})
    assert plain.status_code == 200, plain.text
    assert plain.json() == {"text": local.describe(picture("red")), "style": "brief", "tone": None, "model": "own-tiny"}
    bare = base64.b64encode(png_bytes("blue")).decode()  # bare base64 is taken too
    toned = post(url, "describe", json={"image": bare, "tone": "calm", "style": "detailed", "max_tokens": N})
    assert toned.status_code == 200, toned.text
    assert toned.json()["text"] == local.describe(picture("blue"), style="detailed", tone="calm")
    assert toned.headers["x-request-id"].startswith("task-")


def test_hostile_task_input_is_a_one_line_4xx(live):
    _, url = live
    png = png_bytes("red")
    cases = {
        "corrupt image": ("describe", {"image": data_url(png[:16] + bytes(range(256)) * 4)}, "invalid_image"),
        "decompression bomb": ("describe", {"image": data_url(header_bomb())}, "invalid_image"),
        "not an image media type": ("describe", {"image": "data:text/plain;base64,aGVsbG8="}, "invalid_image"),
        "a bare path": ("describe", {"image": "/etc/hostname"}, "invalid_image"),
        "a file: URL": ("describe", {"image": "file:///etc/passwd"}, "file_not_allowed"),
        "no image": ("describe", {}, None),
        "unknown tone": ("describe", {"image": data_url(png), "tone": "angry"}, None),
        "max_tokens over the limit": (
            "describe",
            {"image": data_url(png), "max_tokens": 10_000},
            "max_tokens_too_large",
        ),
        "too many story images": ("story", {"images": [data_url(png)] * 5}, "too_many_images"),
        "a story without a picture": ("story", {}, "invalid_request"),
        "a state that is not one": ("story", {"state": {"characters": [1]}}, None),
        "unknown level": ("lesson", {"image": data_url(png), "level": "professor"}, None),
        "no questions": ("lesson", {"image": data_url(png), "questions": 0}, None),
        "a budget too small": ("lesson", {"image": data_url(png), "questions": 7, "max_tokens": 200}, None),
    }
    for name, (task, body, code) in cases.items():
        error = one_line_error(post(url, task, json=body), 400)
        assert code is None or error["code"] == code, (name, error)
    error = one_line_error(post(url, "lesson", json={"image": data_url(png), "level": "professor"}), 400)
    assert error["param"] == "level"
    one_line_error(post(url, "describe", content=b'{"image": '), 400)
    one_line_error(post(url, "describe", content=b"x" * (2 << 20)), 413)  # over --max-body-bytes
    still_serving(url)


# ---------------------------------------------------------------------------------------------- story


def test_a_story_goes_on_from_the_state_the_client_sends_back(live):
    backend, url = live
    first = post(url, "story", json={"images": [data_url(png_bytes("red"))], "max_tokens": N})
    assert first.status_code == 200, first.text
    answer = first.json()
    assert set(answer) == {"text", "paragraphs", "state", "ended", "model"} and len(answer["paragraphs"]) == 1
    body = {"images": [data_url(png_bytes("blue"))], "direction": "make it funnier", "state": answer["state"]}
    second = post(url, "story", json={**body, "max_tokens": N}).json()

    story = Story(Assistant(backend), max_new_tokens=N)  # the same turns, told on the model itself
    assert [story.turn(picture("red"))] == answer["paragraphs"] and answer["text"] == answer["paragraphs"][0]
    assert [story.turn(picture("blue"), "make it funnier")] == second["paragraphs"]
    assert second["state"] == asdict(story.state) and not second["ended"]

    ending = post(url, "story", json={"state": second["state"], "direction": "end it", "max_tokens": N}).json()
    assert ending["ended"] and len(ending["state"]["plot"]) == 3
    error = one_line_error(post(url, "story", json={"state": ending["state"], "max_tokens": N}), 400)
    assert "the story has ended" in error["message"]


# --------------------------------------------------------------------------------------------- lesson


@pytest.mark.parametrize("questions, max_tokens", [(1, BUDGET), (3, None)])
def test_lessons_validate_against_the_packaged_schema(live, questions, max_tokens):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    from visprompt.tasks.lesson import lesson_base_schema, lesson_schema

    _, url = live
    body = {"image": data_url(png_bytes("orange")), "questions": questions, "level": "child"}
    if max_tokens:
        body["max_tokens"] = max_tokens
    response = post(url, "lesson", json=body, timeout=300)
    assert response.status_code == 200, response.text
    lesson = response.json()
    jsonschema.validate(lesson, lesson_base_schema())  # the schema as shipped
    if max_tokens:
        jsonschema.validate(lesson, lesson_schema(questions, "child", max_tokens))
    assert lesson["level"] == "child" and len(lesson["questions"]) == questions
    assert all(len(q["choices"]) == 4 and q["answer"] in "ABCD" for q in lesson["questions"])


# ---------------------------------------------------------------------------------------------- video


def write_clip(path, colors=("red", "blue", "yellow"), seconds_each=1.5, fps=10, size=(64, 48)):
    """A clip of plain colours, each shown for `seconds_each` (a cut at each change)."""
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for color in colors:
            frame = np.asarray(Image.new("RGB", size, color))
            for _ in range(int(seconds_each * fps)):
                out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    pytest.importorskip("scenedetect")
    return write_clip(tmp_path_factory.mktemp("video") / "colors.mp4")


@pytest.fixture(scope="module")
def large_frames(tmp_path_factory):
    """A clip whose frames (128 x 96) are over the server's --max-image-pixels in these tests."""
    return write_clip(tmp_path_factory.mktemp("video") / "large.mp4", size=(128, 96))


class DiskWatch:
    """Fails any temporary file or folder made while it is on, and points tempfile at an empty folder."""

    def __init__(self, monkeypatch, folder):
        import starlette.formparsers

        self.folder = folder
        self.made: list[str] = []
        monkeypatch.setattr(tempfile, "tempdir", str(folder))
        for module, names in (
            (tempfile, ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp")),
            (starlette.formparsers, ("SpooledTemporaryFile",)),
        ):
            for name in names:
                monkeypatch.setattr(module, name, self._refuse(name))

    def _refuse(self, name):
        def made(*args, **kwargs):
            self.made.append(name)
            raise OSError(f"test: {name} called (nothing may be written to disk)")

        return made

    def assert_untouched(self):
        assert self.made == [] and list(self.folder.iterdir()) == []


def upload(url: str, data: bytes, timeout: float = 120, **fields) -> httpx.Response:
    files = {"video": ("clip.mp4", data, "video/mp4")}
    return post(url, "video", files=files, data={k: str(v) for k, v in fields.items()}, timeout=timeout)


def test_a_video_upload_is_summarised_from_memory_as_the_cli_does(live, clip, monkeypatch, tmp_path):
    from visprompt.tasks.video import summarize_video

    backend, url = live
    watch = DiskWatch(monkeypatch, tmp_path)
    response = upload(url, clip.read_bytes(), max_frames=3, max_tokens=N)
    assert response.status_code == 200, response.text
    watch.assert_untouched()
    want = summarize_video(backend, clip, 3, SamplingParams(max_new_tokens=N)).to_dict()  # `visprompt video --json`
    assert response.json() == json.loads(json.dumps(want))
    assert len(want["scenes"]) == 3


def test_a_video_over_the_cap_is_413_while_it_streams_and_never_touches_disk(live, monkeypatch, tmp_path):
    _, url = live
    watch = DiskWatch(monkeypatch, tmp_path)
    from visprompt.serve.upload import FORM_BYTES

    declared = upload(url, b"\0" * (VIDEO_CAP + FORM_BYTES))  # its Content-Length says so: refused unread
    assert one_line_error(declared, 413)["code"] == "file_too_large"
    just_over = upload(url, b"\0" * (VIDEO_CAP + 1))  # the file part passes the cap while it is parsed
    assert one_line_error(just_over, 413)["code"] == "file_too_large"

    # Without a Content-Length (chunked), twice the cap is sent and the body never finished: the 413
    # comes back all the same, so the server refused at the cap rather than after reading to the end.
    host, port = url.removeprefix("http://").split(":")
    boundary = "visprompt-test-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="video"; filename="big.mp4"\r\n\r\n'.encode()

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(
            b"POST /v1/tasks/video HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
            + chunk(head)
        )
        for _ in range(2 * VIDEO_CAP // (64 << 10)):
            conn.sendall(chunk(b"\0" * (64 << 10)))
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += conn.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    watch.assert_untouched()
    still_serving(url)


def test_corrupt_large_or_missing_videos_are_one_line_400s(live, clip, large_frames, monkeypatch, tmp_path):
    _, url = live
    watch = DiskWatch(monkeypatch, tmp_path)
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for name, data in {
        "noise": noise,
        "truncated": clip.read_bytes()[: clip.stat().st_size // 2],
        "empty": b"",
        "text": b"no video\n",
    }.items():
        error = one_line_error(upload(url, data), 400)
        assert error["code"] == "invalid_video", (name, error)
    error = one_line_error(upload(url, large_frames.read_bytes()), 400)
    assert error["code"] == "invalid_video" and "--max-image-pixels" in error["message"]
    assert one_line_error(upload(url, clip.read_bytes(), max_frames=0), 400)["param"] == "max_frames"
    assert one_line_error(upload(url, clip.read_bytes(), max_frames="many"), 400)["param"] == "max_frames"
    no_file = post(url, "video", files={"other": ("a.mp4", b"x", "video/mp4")})
    assert one_line_error(no_file, 400)["code"] == "invalid_form"
    only_fields = b'--B\r\nContent-Disposition: form-data; name="max_frames"\r\n\r\n2\r\n--B--\r\n'
    no_video = post(url, "video", content=only_fields, headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert one_line_error(no_video, 400)["code"] == "missing_video"
    assert one_line_error(post(url, "video", json={"video": "x"}), 415)["code"] == "unsupported_media_type"
    broken = post(url, "video", content=b"--b\r\nnonsense", headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert one_line_error(broken, 400)["code"] == "invalid_form"
    watch.assert_untouched()
    still_serving(url)


# ------------------------------------------------------------------------------------ access and cancel


def test_tasks_need_the_api_key_leave_the_server_responsive_and_stop_when_their_client_leaves():
    backend = GatedBackend()
    server = serve_in_thread(backend, ServeConfig(model_name="gated", api_key="s3cret"))
    body = {"image": data_url(png_bytes("red")), "max_tokens": 2}
    try:
        for task in ("describe", "story", "lesson"):
            assert post(server.url, task, json=body).status_code == 401
        assert post(server.url, "video", files={"video": ("a.mp4", b"x", "video/mp4")}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        with pytest.raises(httpx.ReadTimeout):
            post(server.url, "describe", json=body, headers=auth, timeout=0.5)
        deadline = time.monotonic() + 10
        while backend.cancels < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert backend.cancels == 1
        while httpx.get(server.url + "/health").json()["sequences"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(server.url + "/health").json()["sequences"] == 0
        held = {}
        waiting = threading.Thread(
            target=lambda: held.update(answer=post(server.url, "describe", json=body, headers=auth))
        )
        waiting.start()  # a task in flight: the event loop still answers
        while httpx.get(server.url + "/health").json()["sequences"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        backend.gate.set()
        waiting.join(30)
        assert held["answer"].status_code == 200 and held["answer"].json()["text"] == "hello"
    finally:
        backend.gate.set()
        server.stop()


# ------------------------------------------------------------------------------ structured chat output


def test_response_format_constrains_chat_completions_to_json(live):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    _, url = live
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                                             {"type": "text", "text": "What color? Reply in JSON."}]}]  # fmt: skip
    schema = {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["color", "count"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    free = client.chat.completions.create(model="own-tiny", messages=messages, max_tokens=40)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.choices[0].message.content)  # the random model writes no JSON by itself
    bound = client.chat.completions.create(model="own-tiny", messages=messages, max_tokens=40, response_format=fmt)
    jsonschema.validate(json.loads(bound.choices[0].message.content), schema)
    assert bound.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model="own-tiny", messages=messages, max_tokens=40, response_format=fmt, stream=True
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    assert text == bound.choices[0].message.content
    obj = client.chat.completions.create(
        model="own-tiny", messages=messages, max_tokens=60, response_format={"type": "json_object"}
    )
    content = obj.choices[0].message.content  # any object: it may still be open at the token limit
    assert content.startswith("{")
    assert obj.choices[0].finish_reason == "length" or isinstance(json.loads(content), dict)
    for bad in (
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="own-tiny", messages=messages, max_tokens=4, response_format=bad)
        assert err.value.body["param"] == "response_format"


# -------------------------------------------------------------------------------------------- explain


def test_explain_draws_the_answers_attention_as_the_eval_explainer_does(live):
    pytest.importorskip("matplotlib")
    from visprompt.eval.attention import explain
    from visprompt.eval.heatmap import explanation_json

    backend, url = live
    one_line_error(post(url, "explain", json={"image": data_url(png_bytes("red")), "prompt": "What?"}), 404)
    server = serve_in_thread(backend, ServeConfig(model_name="own-tiny"), explainer=explanation_json)
    try:
        image = data_url(png_bytes("green"))
        response = post(server.url, "explain", json={"image": image, "prompt": "What color is it?", "max_tokens": 4})
        assert response.status_code == 200, response.text
        found = response.json()
        direct = explain(backend, picture("green"), "What color is it?", max_new_tokens=4)
        assert found["answer"] == direct.answer and found["tokens"] == list(direct.tokens)
        assert len(found["image_mass"]) == len(direct.maps) and len(found["balance"]) == len(direct.balance)
        for key in ("heatmap", "balance_plot"):
            head, _, data = found[key].partition(",")
            assert head == "data:image/png;base64"
            with Image.open(io.BytesIO(base64.b64decode(data))) as png:
                assert png.format == "PNG" and png.width > 100 and png.height > 100
        one_line_error(post(server.url, "explain", json={"image": image, "prompt": ""}), 400)
        one_line_error(post(server.url, "explain", json={"image": image, "prompt": "What?", "method": "x"}), 400)
        one_line_error(post(server.url, "explain", json={"image": "bm90IGFuIGltYWdl", "prompt": "What?"}), 400)
        still_serving(server.url)
    finally:
        server.stop()
