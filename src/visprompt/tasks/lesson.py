"""A lesson about an image: an explanation for learners at one level and multiple-choice questions.

The reply is JSON that validates against the package's schema (resources/lesson.schema.json): the
schema goes to the backend as `SamplingParams.json_schema`, so a local model is constrained token
by token (runtime/constraint.py) and a remote one gets it as `response_format`. The schema is
specialised per request: the number of questions is fixed (minItems = maxItems = N), the level is
the one asked for, and the strings' `maxLength` bounds are scaled down until the longest possible
lesson fits `max_new_tokens` (its text is printable ASCII, so a character is at most one token):
the grammar can always close before the length limit, and the reply always parses.
"""

from __future__ import annotations

import copy
import json
import math
from functools import cache
from importlib import resources
from typing import Any

from ..engine.backend import Backend, SamplingParams
from ..errors import VispromptError, one_line

LEVELS = {
    "child": "a child of about eight: short sentences, everyday words, one idea at a time",
    "school": "a secondary-school student: clear explanations with the right terms, defined briefly",
    "university": "a university student: precise terminology, underlying principles and context",
}
DEFAULT_MAX_NEW_TOKENS = 2048
MIN_LENGTH = 8  # the shortest maxLength a scaled-down string may get
_STRINGS = ("explanation", "question", "choice", "why")


@cache
def _packaged_schema() -> str:
    return resources.files("visprompt").joinpath("resources/lesson.schema.json").read_text(encoding="utf-8")


def lesson_base_schema() -> dict[str, Any]:
    """The packaged lesson schema (a fresh copy)."""
    return json.loads(_packaged_schema())


def _string_schemas(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    item = schema["properties"]["questions"]["items"]["properties"]
    return {
        "explanation": schema["properties"]["explanation"],
        "question": item["question"],
        "choice": item["choices"]["items"],
        "why": item["why"],
    }


def _longest(schema: dict[str, Any], questions: int, level: str) -> tuple[int, int]:
    """(characters of the lesson with every string empty, characters its strings may add at most),
    with ", " and ": " separators (an upper bound for any JSON layout without free whitespace)."""
    strings = _string_schemas(schema)
    n_choices = schema["properties"]["questions"]["items"]["properties"]["choices"]["maxItems"]
    item = {"question": "", "choices": [""] * n_choices, "answer": "A", "why": ""}
    empty = json.dumps({"level": level, "explanation": "", "questions": [item] * questions})
    most = strings["explanation"]["maxLength"] + questions * (
        strings["question"]["maxLength"] + n_choices * strings["choice"]["maxLength"] + strings["why"]["maxLength"]
    )
    return len(empty), most


def lesson_schema(questions: int = 3, level: str = "school", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict:
    """The schema for one lesson: exactly `questions` questions at `level`, its longest instance at most
    `max_new_tokens - 1` tokens (one token is left for the stop token).

    Raises:
        VispromptError: a level that is not one of LEVELS, fewer than 1 or more than the schema's
            questions, or a budget too small for even MIN_LENGTH-character strings.
    """
    if level not in LEVELS:
        raise VispromptError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    schema = lesson_base_schema()
    most_questions = schema["properties"]["questions"]["maxItems"]
    if not 1 <= questions <= most_questions:
        raise VispromptError(f"questions must be between 1 and {most_questions}, got {questions}")
    schema["properties"]["level"] = {"enum": [level]}
    schema["properties"]["questions"].update(minItems=questions, maxItems=questions)
    defaults = {name: s["maxLength"] for name, s in _string_schemas(schema).items()}
    budget = max_new_tokens - 1
    scale = 1.0
    while sum(_longest(schema, questions, level)) > budget:
        if all(s["maxLength"] == MIN_LENGTH for s in _string_schemas(schema).values()):
            fixed, most = _longest(schema, questions, level)
            raise VispromptError(
                f"max_new_tokens {max_new_tokens} is too small for a lesson with {questions} questions; "
                f"use at least {fixed + most + 1}"
            )
        scale *= 0.9
        for name, s in _string_schemas(schema).items():
            s["maxLength"] = max(MIN_LENGTH, math.floor(defaults[name] * scale))
    return schema


def lesson_prompt(questions: int, level: str) -> str:
    """What the model is asked (the schema constrains the reply's form; this says what to write)."""
    plural = "question" if questions == 1 else f"{questions} questions"
    return (
        f"Teach a short lesson about this picture for {LEVELS[level]}. "
        f"First write an explanation of the subject and the ideas behind it. "
        f"Then write {plural} for a multiple-choice quiz about the lesson: each with four choices "
        f"(A, B, C, D), the letter of the right answer, and why it is right. Reply in JSON."
    )


def check_lesson(lesson: Any, schema: dict[str, Any]) -> dict[str, Any]:
    """`lesson` if it validates against `schema`; else a one-line VispromptError."""
    import jsonschema

    try:
        jsonschema.validate(lesson, schema)
    except jsonschema.ValidationError as exc:
        raise VispromptError(f"the model's lesson does not follow the lesson schema: {one_line(exc.message)}") from None
    return lesson


def make_lesson(
    backend: Backend,
    image: Any,
    questions: int = 3,
    level: str = "school",
    params: SamplingParams | None = None,
    image_after_text: bool = False,
) -> dict[str, Any]:
    """A lesson about `image` from `backend`: {"level", "explanation", "questions": [{"question",
    "choices" (4), "answer" ("A"-"D"), "why"}]}, valid against `lesson_schema(...)`."""
    from .assistant import user_turn

    params = params or SamplingParams(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    schema = lesson_schema(questions, level, params.max_new_tokens)
    conversation = [user_turn([image], lesson_prompt(questions, level), image_after_text)]
    (result,) = backend.generate([conversation], params.updated(json_schema=copy.deepcopy(schema)))
    try:
        lesson = json.loads(result.text)
    except json.JSONDecodeError as exc:
        raise VispromptError(
            f"the model's lesson is not JSON ({one_line(exc)}; finish reason {result.finish_reason})"
        ) from None
    return check_lesson(lesson, schema)


def render_lesson(lesson: dict[str, Any]) -> str:
    """The lesson as plain text: the explanation, then numbered questions with lettered choices."""
    lines = [f"Lesson ({lesson['level']} level)", "", lesson["explanation"].strip()]
    for i, q in enumerate(lesson["questions"], 1):
        lines += ["", f"{i}. {q['question'].strip()}"]
        lines += [f"   {letter}. {choice.strip()}" for letter, choice in zip("ABCD", q["choices"])]
        lines.append(f"   Answer: {q['answer']}. {q['why'].strip()}")
    return "\n".join(lines)
