"""Shared constants and helpers have one home: the image placeholder, normalisation constants, hub
resolution, and LLaVA record -> conversation."""

import re
from pathlib import Path

import pytest

import visprompt
from visprompt.data.llava import LlavaRecord, record_conversation
from visprompt.errors import ModelNotFoundError
from visprompt.eval.vqa import record_turn_conversations
from visprompt.models.chat import IMAGE_TOKEN, to_chat
from visprompt.models.config import VLMConfig
from visprompt.models.hub import resolve_model_path
from visprompt.train.dataset import record_chat

SRC = Path(visprompt.__file__).parent


def files_containing(pattern: str) -> set[str]:
    return {
        p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py") if re.search(pattern, p.read_text(encoding="utf-8"))
    }


def test_the_image_placeholder_string_is_defined_once():
    assert files_containing(r"[\"']<image>[\"']") == {"models/chat.py"}
    assert VLMConfig().image_token == IMAGE_TOKEN == "<image>"


def test_normalisation_constants_are_defined_once():
    for number in ("0.48145466", "0.26862954", "0.485, 0.456", "0.229, 0.224", r"0\.5, 0\.5, 0\.5"):
        assert files_containing(number) == {"images/preprocess.py"}, number


def test_hf_backends_resolve_model_references_through_models_hub(tmp_path):
    from visprompt.engine.backends.hf_vlm import resolve_hf_ref

    assert resolve_hf_ref is resolve_model_path
    assert resolve_model_path(tmp_path) == tmp_path
    (tmp_path / "file").write_text("")
    with pytest.raises(ModelNotFoundError, match="is a file, not a model folder"):
        resolve_model_path(tmp_path / "file")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_path("visprompt-test/nothing-here", cache_dir=tmp_path, allow_download=False)
    assert str(info.value) == (
        "model 'visprompt-test/nothing-here' is not in the local cache and the hub cannot be reached; "
        "run `visprompt pull visprompt-test/nothing-here` on a connected machine, or pass a local folder"
    )


RECORD = LlavaRecord(
    id="0",
    images=["/data/a.png", "/data/b.png"],
    turns=[("<image>\nWhat is left?", "a cat"), ("And here?\n<image>", "a dog"), ("Same size?", "no")],
    system="Be brief.",
)


def test_a_llava_record_becomes_one_conversation():
    image = lambda path: {"type": "image", "image": path}  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    assert record_conversation(RECORD) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [image("/data/a.png"), text("What is left?")]},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": [text("And here?\n"), image("/data/b.png")]},
        {"role": "assistant", "content": "a dog"},
        {"role": "user", "content": [text("Same size?")]},
        {"role": "assistant", "content": "no"},
    ]
    no_system = LlavaRecord(id="1", turns=[("hi", "yes")])
    assert record_conversation(no_system, default_system="S")[0] == {"role": "system", "content": "S"}


def test_training_and_evaluation_read_records_through_the_same_conversion():
    conversation = record_conversation(RECORD)
    chat = record_chat(RECORD, "<img>")
    assert chat == to_chat(conversation, "<img>")[0]
    # the training text keeps the record's own layout
    assert [m["content"] for m in chat if m["role"] == "user"] == [
        "<img>\nWhat is left?",
        "And here?\n<img>",
        "Same size?",
    ]
    turns = record_turn_conversations(RECORD)
    assert [gold for _, gold in turns] == ["a cat", "a dog", "no"]
    assert [conv for conv, _ in turns] == [conversation[:2], conversation[:4], conversation[:6]]
