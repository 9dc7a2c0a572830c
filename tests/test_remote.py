"""`--model openai:MODEL`: a model behind a live `visprompt serve` on loopback answers as the model itself
does (plain, streamed, with an image, cut at a stop string), and a missing server is one line, exit 2."""

from __future__ import annotations

import socket

import pytest
from conftest import tiny_config
from PIL import Image
from test_backend_contract import own_backend

pytest.importorskip("openai")
pytest.importorskip("fastapi")

import visprompt  # noqa: E402
from visprompt.cli.main import main  # noqa: E402
from visprompt.engine.backend import Backend, SamplingParams  # noqa: E402
from visprompt.engine.backends.remote import RemoteBackend, TextStops  # noqa: E402
from visprompt.serve import ServeConfig, serve_in_thread  # noqa: E402

N = 16


@pytest.fixture(scope="module")
def live():
    """The own tiny model behind `visprompt serve` on loopback, and a remote backend for it."""
    backend = own_backend(tiny_config(lm_max_position=4096))  # room for the story's and tone's prompts
    server = serve_in_thread(backend, ServeConfig(model_name="own-tiny"))
    remote = RemoteBackend("own-tiny", base_url=server.url)
    yield backend, remote, server
    remote.close()
    server.stop()


def image_question(color: str = "red") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", (40, 30), color)},
                {"type": "text", "text": "What color is the circle?"},
            ],
        }
    ]


TEXT_ONLY = [{"role": "user", "content": "How many shapes are there?"}]


def test_remote_backend_implements_the_protocol(live):
    _, remote, _ = live
    assert isinstance(remote, Backend) and remote.name == "openai:own-tiny"


def test_plain_and_image_replies_equal_the_model_itself(live):
    backend, remote, _ = live
    params = SamplingParams(max_new_tokens=N)
    convs = [TEXT_ONLY, image_question("red"), image_question("blue")]
    got = remote.generate(convs, params)  # sent concurrently
    want = backend.generate(convs, params)
    assert [r.text for r in got] == [r.text for r in want]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
    assert [(r.prompt_tokens, r.completion_tokens) for r in got] == [
        (r.prompt_tokens, r.completion_tokens) for r in want
    ]
    assert got[1].text != got[2].text  # the image reached the model


def test_streamed_pieces_join_to_the_plain_reply(live):
    _, remote, _ = live
    params = SamplingParams(max_new_tokens=N)
    pieces = list(remote.stream(image_question(), params))
    assert len(pieces) > 1 and "".join(pieces) == remote.generate([image_question()], params)[0].text
    handle = remote.submit(image_question(), params)
    assert "".join(handle) == handle.result().text and handle.result().completion_tokens == N


def test_a_stop_string_cuts_the_reply_plain_and_streamed(live):
    _, remote, _ = live
    full = remote.generate([image_question()], SamplingParams(max_new_tokens=N))[0].text
    stop = next(full[i : i + 2] for i in range(len(full) // 3, len(full) - 1) if not full[i : i + 2].isspace())
    params = SamplingParams(max_new_tokens=N, stop=[stop])
    [cut] = remote.generate([image_question()], params)
    assert cut.finish_reason == "stop" and stop not in cut.text and full.startswith(cut.text)
    assert "".join(remote.stream(image_question(), params)) == cut.text


def test_stop_strings_are_also_cut_on_the_client():
    stops = TextStops(["END"])
    shown = [stops.feed(p) for p in [" Hello", " wor", "ld E", "N", "D more"]]
    assert "".join(shown) + stops.finish() == "Hello world" and stops.stopped


def test_a_cancelled_reply_stops_early(live):
    _, remote, _ = live
    handle = remote.submit(image_question(), SamplingParams(max_new_tokens=200))
    next(iter(handle))
    handle.cancel()
    result = handle.result(timeout=30)
    assert result.finish_reason in ("cancelled", "length")
    assert result.finish_reason == "cancelled" or result.completion_tokens == 200


def test_python_api_and_cli_take_base_url(live, capsys):
    backend, _, server = live
    model = visprompt.load("openai:own-tiny", base_url=server.url, api_key="unused", max_new_tokens=N)
    image = Image.new("RGB", (40, 30), "green")
    want = backend.generate([image_question("green")], SamplingParams(max_new_tokens=N))[0].text
    assert model.ask(image, "What color is the circle?") == want


def test_a_missing_server_is_one_line_and_exit_2(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    code = main(["describe", str(image), "--model", "openai:m", "--base-url", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot reach") and len(err.strip().splitlines()) == 1
    assert main(["describe", str(image), "--base-url", "http://127.0.0.1:1"]) == 2  # not a remote model


def test_tone_and_story_run_on_the_remote_model_as_on_the_model_itself(live):
    from visprompt.tasks.assistant import Assistant
    from visprompt.tasks.story import Story

    backend, remote, _ = live
    local, far = (
        Assistant(backend, SamplingParams(max_new_tokens=N)),
        Assistant(remote, SamplingParams(max_new_tokens=N)),
    )
    image = Image.new("RGB", (40, 30), "red")
    assert far.describe(image, tone="calm") == local.describe(image, tone="calm")
    stories = [Story(a, max_new_tokens=N) for a in (local, far)]
    assert [s.turn(image) for s in stories] == [stories[0].paragraphs[0]] * 2


def test_a_lesson_through_the_remote_model_sends_the_schema_and_validates(live):
    """The lesson's JSON schema goes to the server as `response_format`, which constrains the reply
    there: the lesson validates and equals the one the model itself writes."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    from visprompt.tasks.assistant import Assistant
    from visprompt.tasks.lesson import lesson_base_schema, lesson_schema

    backend, remote, _ = live
    image = Image.new("RGB", (40, 30), "orange")
    far = Assistant(remote).lesson(image, questions=1, level="child", max_new_tokens=1000)
    jsonschema.validate(far, lesson_schema(1, "child", 1000))
    jsonschema.validate(far, lesson_base_schema())
    assert far == Assistant(backend).lesson(image, questions=1, level="child", max_new_tokens=1000)
