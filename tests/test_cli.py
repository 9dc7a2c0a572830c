"""The command line and the Python API, as a user runs them: output, --json, exit codes."""

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from PIL import Image
from test_train import TINY_MODEL

import visprompt
from visprompt.cli.main import main
from visprompt.tasks.assistant import Assistant


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`visprompt data shapes` then `visprompt train` (a few steps), through the CLI entry point."""
    root = tmp_path_factory.mktemp("cli")
    assert main(["data", "shapes", str(root / "data"), "--train", "24", "--test", "4", "--seed", "1"]) == 0
    recipe = {
        "model": TINY_MODEL,
        "train": {
            "train_data": str(root / "data/train.json"),
            "eval_data": str(root / "data/test.json"),
            "batch_size": 8,
            "max_steps": 2,
        },
    }
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(root / "r.yaml"), "--output", str(root / "model"), "--set", "lm_lr=1e-3"]) == 0
    return root


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "visprompt.cli.main", *args], capture_output=True, text=True, timeout=300
    )


def test_ask_and_describe_print_the_answer_and_json(trained, capsys):
    image = str(trained / "data/images/test/00000.png")
    assert (
        main(["ask", image, "How many shapes are there?", "--model", str(trained / "model"), "--max-new-tokens", "4"])
        == 0
    )
    text = capsys.readouterr().out
    assert text.endswith("\n") and len(text.splitlines()) == 1
    assert main(["describe", image, "--model", str(trained / "model"), "--json", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "model", "image"} and isinstance(out["text"], str)


def test_bad_input_exits_2_with_one_line(trained, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not a picture")
    cases = [
        ["ask", str(not_image), "What is it?", "--model", str(trained / "model")],
        ["ask", str(tmp_path / "missing.png"), "What is it?", "--model", str(trained / "model")],
        ["describe", str(not_image), "--model", str(tmp_path / "no-model-here")],
        ["describe", str(not_image), "--model", "no-such-org/no-such-vlm"],
        ["describe", str(not_image), "--model", str(trained / "model"), "--style", "poetic"],
        ["train", str(tmp_path / "missing.yaml")],
    ]
    for args in cases:
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("question", ["", "   \n\t"])
def test_an_empty_question_is_one_line_before_any_model_loads(question, capsys, tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    # the default model is `starter`: refused before it (or the missing folder here) is loaded
    for model in ("starter", str(tmp_path / "no-model")):
        assert main(["ask", str(image), question, "--model", model]) == 2
        err = capsys.readouterr().err
        assert err == "error: the question is empty: ask something about the image\n"


def test_the_python_api_refuses_empty_questions(tiny_model):
    from visprompt.engine.backends.own import OwnVLMBackend
    from visprompt.errors import VispromptError

    assistant = Assistant(OwnVLMBackend(tiny_model))
    image = Image.new("RGB", (8, 8), "red")
    for question in ("", "  ", ["What?", ""], None):
        with pytest.raises(VispromptError, match="question"):
            assistant.ask(image, question)
    with pytest.raises(VispromptError, match="empty"):
        assistant.ask([image, image], " ")
    assert isinstance(assistant.ask(image, "What?", max_new_tokens=2), str)


def test_usage_errors_exit_2():
    proc = run_cli("ask")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_python_api_batches_over_lists(trained):
    model = visprompt.load(str(trained / "model"), max_new_tokens=4)
    assert isinstance(model, Assistant)
    images = [str(trained / f"data/images/test/{i:05d}.png") for i in range(3)]
    one = model.ask(images[0], "What color is the circle?")
    many = model.ask(images, "What color is the circle?")
    assert isinstance(one, str) and isinstance(many, list) and len(many) == 3
    assert many[0] == one  # batched greedy equals single
    assert model.describe(Image.open(images[1])) == model.describe([images[1]])[0]
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image", "image": images[2]}, {"type": "text", "text": "Count the shapes."}],
        }
    ]
    assert isinstance(model.generate(msgs, temperature=0.9, seed=3), str)
    assert len(model.generate([msgs, msgs])) == 2


def test_the_console_command_prints_warnings_on_one_line(capsys):
    import warnings

    from visprompt.cli.main import _one_line_warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        _one_line_warnings()
        warnings.warn("visprompt: decoding without the C++ layer kernel (no compiler)", stacklevel=1)
    assert capsys.readouterr().err == "warning: visprompt: decoding without the C++ layer kernel (no compiler)\n"


@pytest.mark.parametrize(
    ("sig", "code", "line"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_an_interrupted_command_exits_130_or_143_with_one_line(tmp_path, sig, code, line):
    out = tmp_path / "shapes"
    proc = subprocess.Popen(
        [sys.executable, "-m", "visprompt.cli.main", "data", "shapes", str(out), "--train", "200000", "--test", "10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any(out.rglob("*.png")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)  # interrupt once the command is at work, not while Python starts
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err


def test_help_shows_flags_as_flags(capsys):
    assert main(["describe", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--json" in out and "<bool>" not in out
    assert "--style brief|detailed" in out


def test_a_mistyped_local_folder_is_no_such_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "runs" / "shapes-tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert main(["describe", "x.png", "--model", "runs/shapes-tinny"]) == 2
    err = capsys.readouterr().err
    assert "no such folder 'runs/shapes-tinny'" in err and "did you mean runs/shapes-tiny?" in err
    assert "pull" not in err and len(err.strip().splitlines()) == 1


def test_an_unknown_set_key_names_the_close_setting():
    from visprompt.errors import ConfigError
    from visprompt.train.config import load_recipe

    with pytest.raises(
        ConfigError, match=r"unknown setting 'max_step': not a train or a model setting; did you mean max_steps\?"
    ):
        load_recipe(None, ["max_step=10"])
