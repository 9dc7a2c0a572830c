"""`visprompt lesson`: an explanation and a quiz as JSON that always validates against the packaged
schema, because generation is constrained to it (runtime/constraint.py), not because the model is
good: the model here is a random tiny one."""

import json

import pytest
import torch
from conftest import TEXTS, spread_weights, tiny_config
from PIL import Image

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from visprompt.cli.main import main  # noqa: E402
from visprompt.engine.backend import SamplingParams  # noqa: E402
from visprompt.engine.backends.own import OwnVLMBackend  # noqa: E402
from visprompt.errors import VispromptError  # noqa: E402
from visprompt.tasks.assistant import Assistant  # noqa: E402
from visprompt.tasks.lesson import (  # noqa: E402
    LEVELS,
    lesson_base_schema,
    lesson_prompt,
    lesson_schema,
    make_lesson,
    render_lesson,
)

BUDGET = 1000  # tokens: 7 questions fit with their strings bounded to a few characters


@pytest.fixture(scope="module")
def backend():
    """A random tiny VLM whose context holds a whole lesson (prompt + BUDGET tokens)."""
    from visprompt.models.vision_language_model import VisionLanguageModel

    torch.manual_seed(0)
    model = VisionLanguageModel.build(tiny_config(lm_max_position=1280), TEXTS)
    return OwnVLMBackend(spread_weights(model).eval())


IMAGE = Image.new("RGB", (40, 30), "orange")


@pytest.mark.parametrize("questions", [1, 3, 7])
def test_lessons_from_a_random_model_validate_against_the_schema(backend, questions):
    for params in (
        SamplingParams(max_new_tokens=BUDGET),
        SamplingParams(max_new_tokens=BUDGET, temperature=1.0, seed=3),
    ):
        lesson = make_lesson(backend, IMAGE, questions, "child", params)
        jsonschema.validate(lesson, lesson_schema(questions, "child", BUDGET))
        jsonschema.validate(lesson, lesson_base_schema())  # the packaged schema as shipped
        assert len(lesson["questions"]) == questions and lesson["level"] == "child"
        assert all(len(q["choices"]) == 4 and q["answer"] in "ABCD" for q in lesson["questions"])


def test_without_the_constraint_the_same_model_writes_no_json(backend):
    conversation = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "JSON"}]}]
    (free,) = backend.generate([conversation], SamplingParams(max_new_tokens=60))
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.text)
    schema = {
        "type": "object",
        "properties": {"a": {"enum": ["x", "y"]}},
        "required": ["a"],
        "additionalProperties": False,
    }
    (bound,) = backend.generate([conversation], SamplingParams(max_new_tokens=60, json_schema=schema))
    assert json.loads(bound.text) in ({"a": "x"}, {"a": "y"}) and bound.finish_reason == "stop"


def test_constrained_and_free_requests_share_a_batch(backend):
    """A constrained row does not change its unconstrained neighbours (greedy is batch-independent)."""
    conv = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "red?"}]}]
    plain = SamplingParams(max_new_tokens=12)
    (alone,) = backend.generate([conv], plain)
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}
    sched = backend.scheduler
    prompt = backend.prompts([conv])[0]
    handles = [sched.submit(prompt, plain.updated(json_schema=schema)), sched.submit(prompt, plain)]
    bound, free = [h.result() for h in handles]
    assert free.text == alone.text
    assert len(json.loads(bound.text)) == 2


def test_strings_shrink_to_fit_the_budget_and_too_small_a_budget_is_an_error():
    roomy = lesson_schema(1, "school", 4096)
    tight = lesson_schema(7, "school", BUDGET)
    expl = lambda s: s["properties"]["explanation"]["maxLength"]  # noqa: E731
    assert expl(roomy) == lesson_base_schema()["properties"]["explanation"]["maxLength"] > expl(tight)
    assert tight["properties"]["questions"]["minItems"] == tight["properties"]["questions"]["maxItems"] == 7
    with pytest.raises(VispromptError, match="too small .* use at least"):
        lesson_schema(7, "school", 300)
    with pytest.raises(VispromptError, match="level must be one of"):
        lesson_schema(3, "professor")


def test_the_level_changes_the_prompt():
    prompts = {level: lesson_prompt(3, level) for level in LEVELS}
    assert len(set(prompts.values())) == 3
    assert "child" in prompts["child"] and "university" in prompts["university"]


def test_the_python_api_and_text_rendering(backend):
    lesson = Assistant(backend).lesson(IMAGE, questions=2, level="university", max_new_tokens=600)
    assert lesson["level"] == "university" and len(lesson["questions"]) == 2
    text = render_lesson(lesson)
    assert text.startswith("Lesson (university level)") and "   D. " in text and "Answer: " in text


def test_bad_lesson_options_exit_2_before_a_model_loads(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "red").save(image)
    for args in (["--level", "kindergarten"], ["--questions", "0"], ["--questions", "7", "--max-new-tokens", "200"]):
        assert main(["lesson", str(image), "--model", str(tmp_path / "no-model"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
