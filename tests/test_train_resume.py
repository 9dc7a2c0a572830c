"""Stopping and resuming training: a run stopped at any moment (a signal, a kill, a kill in the middle
of a save) and resumed ends with the same weights as a run that was never stopped; saves are
complete or absent; the log has each step once; `--resume` without a checkpoint is an error."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_train import write_recipe

from visprompt.errors import ConfigError, ModelNotFoundError
from visprompt.models.vision_language_model import VisionLanguageModel
from visprompt.train import checkpoint as ckpt_module
from visprompt.train.config import load_recipe
from visprompt.train.sampler import EpochBatches
from visprompt.train.trainer import Trainer

STEPS = ["max_steps=8", "save_every=2", "log_every=1", "num_threads=1", "eval_data="]


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def logged_steps(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def recipe_at(tmp_path, shapes_dir, name, **train):
    path = write_recipe(tmp_path, shapes_dir, output_dir=str(tmp_path / name), **train)
    return path, tmp_path / name


class Died(Exception):
    """Stands for a process killed right after it saved a checkpoint: nothing in memory survives."""


def die_after_checkpoint(monkeypatch, at_step):
    real = ckpt_module.save_checkpoint

    def save_then_die(out, model, state, keep):
        folder = real(out, model, state, keep)
        if state["step"] == at_step:
            raise Died()
        return folder

    monkeypatch.setattr("visprompt.train.trainer.save_checkpoint", save_then_die)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["grad_accum=2", "batch_size=4", "augment=true", "model.connector_dropout=0.2"],
        ["model.lm_lora_rank=4", "vision_lr=0"],
    ],
    ids=["plain", "accumulation-augment-dropout", "lora-frozen-encoder"],
)
def test_a_run_killed_after_any_checkpoint_resumes_to_the_same_weights(tmp_path, shapes_dir, monkeypatch, extra):
    path, straight = recipe_at(tmp_path, shapes_dir, "straight")
    Trainer(load_recipe(path, STEPS + extra)).train()

    path, resumed = recipe_at(tmp_path, shapes_dir, "resumed")
    die_after_checkpoint(monkeypatch, at_step=4)
    with pytest.raises(Died):
        Trainer(load_recipe(path, STEPS + extra)).train()
    monkeypatch.undo()
    Trainer(load_recipe(path, STEPS + extra + ["resume=true"])).train()

    assert_same_weights(straight, resumed)
    assert logged_steps(resumed) == logged_steps(straight) == list(range(1, 9))
    rows = lambda f: [(r["step"], r["loss"]) for r in map(json.loads, (f / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert rows(resumed) == rows(straight)  # each step once, with the same loss


def test_a_kill_while_a_checkpoint_is_written_resumes_from_the_previous_one(tmp_path, shapes_dir, monkeypatch, capfd):
    path, straight = recipe_at(tmp_path, shapes_dir, "straight")
    Trainer(load_recipe(path, STEPS)).train()

    path, resumed = recipe_at(tmp_path, shapes_dir, "resumed")
    real_save = torch.save

    def dies_in_step_6_state(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 6:
            with open(f, "wb") as half:
                half.write(b"\0" * 100)  # part of the file, then the process is gone
            raise Died()
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dies_in_step_6_state)
    with pytest.raises(Died):
        Trainer(load_recipe(path, STEPS)).train()
    monkeypatch.undo()
    assert not (resumed / "checkpoint-6").exists()
    # what a SIGKILL leaves: the temporary folder (an exception's cleanup removed it here)
    (resumed / ".checkpoint-6.tmp-x").mkdir()
    (resumed / ".checkpoint-6.tmp-x" / "trainer_state.pt").write_bytes(b"\0" * 10)
    capfd.readouterr()
    Trainer(load_recipe(path, STEPS + ["resume=true"])).train()
    assert "resuming at step 4 from" in capfd.readouterr().err
    assert not list(resumed.glob(".*tmp*"))
    assert_same_weights(straight, resumed)


def test_resume_without_a_checkpoint_is_an_error_and_keeps_the_log(tmp_path, shapes_dir):
    path, out = recipe_at(tmp_path, shapes_dir, "run")
    Trainer(load_recipe(path, ["max_steps=2", "log_every=1", "eval_data="])).train()  # no save_every: no checkpoint
    log = (out / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        Trainer(load_recipe(path, ["max_steps=4", "eval_data=", "resume=true"])).train()
    assert (out / "metrics.jsonl").read_text() == log


def test_a_fresh_run_drops_an_earlier_runs_checkpoints(tmp_path, shapes_dir):
    path, out = recipe_at(tmp_path, shapes_dir, "run")
    Trainer(load_recipe(path, ["max_steps=4", "save_every=2", "eval_data="])).train()
    assert (out / "checkpoint-2").is_dir()
    Trainer(load_recipe(path, ["max_steps=1", "eval_data="])).train()
    assert not list(out.glob("checkpoint-*"))  # a later --resume cannot pick up the older run


def test_a_kill_during_the_final_save_leaves_the_previous_model_or_none(tmp_path, shapes_dir, monkeypatch):
    path, out = recipe_at(tmp_path, shapes_dir, "run")
    Trainer(load_recipe(path, ["max_steps=2", "eval_data="])).train()
    before, summary = weights(out), (out / "train_summary.json").read_text()

    import safetensors.torch

    def dies(*a, **k):
        raise Died()

    # killed while the new files are written beside: the old model, summary and card stay, together
    monkeypatch.setattr(safetensors.torch, "save_model", dies)
    with pytest.raises(Died):
        Trainer(load_recipe(path, ["max_steps=3", "eval_data="])).train()
    monkeypatch.undo()
    assert (out / "train_summary.json").read_text() == summary
    after = weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    VisionLanguageModel.from_pretrained(out)

    # killed while the new files are moved in: config.json goes first and comes back last, so
    # the folder is refused as incomplete rather than loaded with a mix of old and new
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise Died()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(Died):
        Trainer(load_recipe(path, ["max_steps=3", "eval_data=", "seed=1"])).train()
    monkeypatch.undo()
    with pytest.raises(ModelNotFoundError, match="incomplete"):
        VisionLanguageModel.from_pretrained(out)


def test_saved_files_get_the_usual_permissions(tmp_path, shapes_dir):
    path, out = recipe_at(tmp_path, shapes_dir, "run")
    Trainer(load_recipe(path, ["max_steps=2", "save_every=1", "eval_data="])).train()
    mask = os.umask(0)
    os.umask(mask)
    for f in (out / "model.safetensors", out / "config.json", out / "checkpoint-1" / "trainer_state.pt"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f
    assert (out / "checkpoint-1").stat().st_mode & 0o777 == 0o777 & ~mask


@pytest.mark.parametrize("start", [0, 1, 3])
def test_batches_resume_mid_epoch_in_the_same_order(start):
    batches = EpochBatches(22, 4, seed=5, drop_last=True, group=2)
    assert batches.batches_per_epoch() == 4 and batches.steps_per_epoch() == 2  # 5 full batches, whole groups
    batches.set_position(1, 0)
    full = list(batches)
    batches.set_position(1, start)
    assert list(batches) == full[start:]
    batches.set_position(2, 0)
    assert list(batches) != full  # a new shuffle each epoch


def test_length_grouped_batches_hold_similar_lengths_and_resume_in_order():
    lengths = [(i * 37) % 101 for i in range(400)]
    plain = EpochBatches(400, 8, seed=3, drop_last=True)
    grouped = EpochBatches(400, 4, seed=3, drop_last=True, rank=1, world=2, lengths=lengths)
    ranks = [EpochBatches(400, 4, seed=3, drop_last=True, rank=r, world=2, lengths=lengths) for r in (0, 1)]
    global_batches = [a + b for a, b in zip(*(list(r) for r in ranks))]
    assert sorted(i for b in global_batches for i in b) == list(range(400))  # each example once

    def spread(batches):  # mean (longest - shortest) per batch
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    assert spread(global_batches) < spread(list(plain)) / 4
    assert [len(b) for b in global_batches] == [8] * 50
    grouped.set_position(0, 7)
    assert list(grouped) == list(ranks[1])[7:]


# -- real signals, through the console command ----------------------------------------------------

TRAIN_CMD = [sys.executable, "-m", "visprompt.cli.main", "train"]


def _start(path, *args):
    return subprocess.Popen(
        [*TRAIN_CMD, str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "VISPROMPT_TEST_THREADS": "1"},
    )


def _wait_for_step(out, step, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(logged_steps_partial(out)) >= step:
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


def logged_steps_partial(out):
    steps = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return steps


CLI_SETS = [a for s in STEPS + ["max_steps=24", "save_every=5"] for a in ("--set", s)]


@pytest.fixture(scope="module")
def straight_cli_run(tmp_path_factory, shapes_dir):
    """One uninterrupted console-command run, the reference of the signal tests."""
    tmp = tmp_path_factory.mktemp("straight")
    path, out = recipe_at(tmp, shapes_dir, "straight")
    done = subprocess.run([*TRAIN_CMD, str(path), *CLI_SETS], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def _resume_and_compare(path, out, straight):
    done = subprocess.run([*TRAIN_CMD, str(path), *CLI_SETS, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_weights(straight, out)
    assert logged_steps(out) == list(range(1, 25))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_train_saves_a_checkpoint_and_resume_matches(tmp_path, shapes_dir, straight_cli_run, sig, code):
    path, stopped = recipe_at(tmp_path, shapes_dir, "stopped")
    proc = _start(path, *CLI_SETS)
    _wait_for_step(stopped, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    step = max(int(c.name.split("-")[1]) for c in stopped.glob("checkpoint-*"))
    assert 2 <= step < 24 and f"stopped at step {step}" in err
    assert err.strip().splitlines()[-1] in ("interrupted", "terminated")
    _resume_and_compare(path, stopped, straight_cli_run)


def test_sigkill_at_any_moment_then_resume_matches(tmp_path, shapes_dir, straight_cli_run):
    path, killed = recipe_at(tmp_path, shapes_dir, "killed")
    proc = _start(path, *CLI_SETS)
    _wait_for_step(killed, 8, proc)
    proc.kill()
    proc.wait()
    _resume_and_compare(path, killed, straight_cli_run)


def test_resume_without_a_checkpoint_exits_2_with_one_line(tmp_path, shapes_dir):
    path, _ = recipe_at(tmp_path, shapes_dir, "none")
    done = subprocess.run([*TRAIN_CMD, str(path), "--resume"], capture_output=True, text=True)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "no complete checkpoint" in done.stderr


def test_a_stale_checkpoint_folder_without_state_is_skipped(tmp_path, shapes_dir, capfd):
    path, out = recipe_at(tmp_path, shapes_dir, "run")
    Trainer(load_recipe(path, ["max_steps=4", "save_every=2", "eval_data="])).train()
    (out / "checkpoint-3").mkdir()  # a half-written folder (as older versions could leave)
    (out / "checkpoint-3" / "config.json").write_text("{}")
    capfd.readouterr()
    Trainer(load_recipe(path, ["max_steps=4", "save_every=2", "eval_data=", "resume=true"])).train()
    assert "resuming at step 2 from" in capfd.readouterr().err
