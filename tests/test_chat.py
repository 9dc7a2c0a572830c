"""`visprompt chat` and `tasks.chat.Chat`: turns kept, images saved by content hash beside the JSON, a
resumed conversation answering as the original would, and the terminal loop driven through a pseudo
terminal: streamed answers, Ctrl-C stopping an answer without leaving, /save, --resume, Ctrl-D."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import TEXTS, spread_weights, tiny_config
from PIL import Image

import visprompt
from visprompt.engine.backends.own import OwnVLMBackend
from visprompt.tasks.assistant import Assistant
from visprompt.tasks.chat import Chat, images_folder

pexpect = pytest.importorskip("pexpect")


def tiny_model(max_position: int = 256, never_stops: bool = False):
    """The tiny own model; never_stops: its stop tokens' (tied) output rows zeroed, so greedy replies
    run to their length (a stop token's logit is 0, below the largest of the others)."""
    from visprompt.models.tokenizer import stop_token_ids
    from visprompt.models.vision_language_model import VisionLanguageModel

    torch.manual_seed(0)
    model = spread_weights(VisionLanguageModel.build(tiny_config(lm_max_position=max_position), TEXTS)).eval()
    if never_stops:
        with torch.no_grad():
            model.lm.get_output_embeddings().weight[stop_token_ids(model.tokenizer)] = 0
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny own model with a long context (answers of thousands of tokens: time to press Ctrl-C)."""
    folder = tmp_path_factory.mktemp("chat-model")
    tiny_model(4096, never_stops=True).save_pretrained(folder)
    return folder


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), "red").save(path)
    return path


def assistant() -> Assistant:
    return Assistant(OwnVLMBackend(tiny_model()))


def test_turns_are_kept_and_images_go_with_the_next_message(photo):
    chat = Chat(assistant(), max_new_tokens=6)
    chat.add_image(str(photo))
    first = chat.say("What color is the circle?")
    second = chat.say("How many shapes are there?")
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert [p["type"] for p in chat.messages[0]["content"]] == ["image", "text"]
    assert [p["type"] for p in chat.messages[2]["content"]] == ["text"] and not chat.pending_images
    assert chat.messages[1]["content"] == first and chat.messages[3]["content"] == second
    chat.reset()
    assert chat.messages == []


def test_a_saved_conversation_stores_images_by_hash_and_resumes_the_same(photo, tmp_path):
    chat = Chat(assistant(), max_new_tokens=6)
    chat.add_image(str(photo))
    chat.say("What color is the circle?")
    chat.add_image(str(photo))  # the same picture again: stored once
    saved = chat.save(tmp_path / "talk.json")
    digest = hashlib.sha256(photo.read_bytes()).hexdigest()
    assert [p.name for p in images_folder(saved).iterdir()] == [f"{digest}.png"]
    data = json.loads(saved.read_text())
    assert data["messages"][0]["content"][0]["image"] == f"talk.images/{digest}.png"
    assert data["pending_images"] == [f"talk.images/{digest}.png"] and "base64" not in saved.read_text()
    resumed = Chat.load(saved, assistant(), max_new_tokens=6)
    assert resumed.say("Where is the square?") == chat.say("Where is the square?")
    assert resumed.messages[-1] == chat.messages[-1]


def spawn(*args: str, cwd, command: str = "chat") -> pexpect.spawn:
    src = str(Path(visprompt.__file__).parents[1])  # the package under test, from any working folder
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }
    return pexpect.spawn(
        sys.executable,
        ["-m", "visprompt.cli.main", command, *args],
        cwd=str(cwd),
        env=env,
        encoding="utf-8",
        timeout=120,
    )


def test_chat_in_a_terminal_streams_stops_on_ctrl_c_saves_and_resumes(model_dir, photo, tmp_path):
    child = spawn("--model", str(model_dir), "--max-new-tokens", "4000", cwd=tmp_path)
    child.expect("you> ")
    child.sendline(f"/image {photo}")
    child.expect("image added")
    child.expect("you> ")
    child.sendline("Describe the image.")
    child.expect("model> ")
    child.expect(r"\S")  # the answer (4000 tokens) has begun streaming
    child.sendintr()  # Ctrl-C: stops the answer, not the chat
    child.expect(r"\[stopped\]")
    child.expect("you> ")
    child.sendline("/save talk.json")
    child.expect("saved")
    child.expect("you> ")
    child.sendcontrol("d")  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    saved = json.loads((tmp_path / "talk.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]  # the stopped answer's start is kept
    assert 0 < len(saved["messages"][1]["content"])

    child = spawn("--model", str(model_dir), "--max-new-tokens", "5", "--resume", "talk.json", cwd=tmp_path)
    child.expect("you> ")
    child.sendline("Where is the square?")
    child.expect("model> ")
    child.expect("you> ")
    child.sendline("/save again.json")
    child.expect("you> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert len(again["messages"]) == 4 and again["messages"][1] == saved["messages"][1]
    image = again["messages"][0]["content"][0]["image"]  # the same picture, now in again.images/
    assert image == saved["messages"][0]["content"][0]["image"].replace("talk.images", "again.images")
    assert (tmp_path / image).is_file()
