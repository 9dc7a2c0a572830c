"""Several processes and large batches: gradient accumulation gives the update of the equivalent large
batch; 2 CPU processes under torchrun (DDP over gloo) give the loss curve of 1 process with the same
global batch, and a DDP run killed and resumed ends as an uninterrupted one; a NaN loss stops the run
before it spoils the weights."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
from test_train import write_recipe

from visprompt.train.config import load_recipe
from visprompt.train.trainer import Trainer, TrainingDiverged

# A ViT tower: BatchNorm (the ResNet's) normalises by the batch at hand, so it cannot match a larger batch.
VIT = ["model.vision_type=vit", "model.vision_heads=2", "model.vision_patch_size=8"]
BASE = ["max_steps=6", "log_every=1", "num_threads=1", "eval_data=", "cache_vision_features=false", *VIT]


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def assert_close_weights(a, b, atol):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= atol, worst


def test_gradient_accumulation_gives_the_update_of_the_large_batch(tmp_path, shapes_dir):
    big = write_recipe(tmp_path, shapes_dir, output_dir=str(tmp_path / "big"))
    Trainer(load_recipe(big, BASE + ["batch_size=8"])).train()
    acc = write_recipe(tmp_path, shapes_dir, output_dir=str(tmp_path / "acc"))
    Trainer(load_recipe(acc, BASE + ["batch_size=4", "grad_accum=2"])).train()
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), abs=1e-5)
    assert_close_weights(tmp_path / "big", tmp_path / "acc", atol=1e-5)


def test_a_nan_loss_stops_before_the_update_and_names_the_last_checkpoint(tmp_path, shapes_dir, monkeypatch):
    path = write_recipe(tmp_path, shapes_dir, output_dir=str(tmp_path / "run"))
    calls = {"n": 0}
    real = Trainer._accumulate

    def nan_on_fourth(self, module, group, autocast):
        calls["n"] += 1
        loss = real(self, module, group, autocast)
        return float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(Trainer, "_accumulate", nan_on_fourth)
    with pytest.raises(TrainingDiverged, match=r"nan at step 4.*checkpoint-2"):
        Trainer(load_recipe(path, BASE + ["save_every=2"])).train()


# -- torchrun --------------------------------------------------------------------------------------


def torchrun(path, nproc, *args, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "visprompt.train", str(path), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VISPROMPT_TEST_THREADS": "1"}
    if not wait:
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def sets(*items):
    return [a for s in items for a in ("--set", s)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, shapes_dir):
    """2 processes x batch 4, checkpoints every 2 steps: the reference of the DDP tests."""
    tmp = tmp_path_factory.mktemp("ddp")
    path = write_recipe(tmp, shapes_dir, output_dir=str(tmp / "ddp"))
    torchrun(path, 2, *sets(*BASE, "batch_size=4", "save_every=2"))
    return tmp / "ddp"


@pytest.mark.slow
def test_two_processes_give_the_loss_curve_of_one_with_the_same_global_batch(tmp_path, shapes_dir, ddp_run):
    one = write_recipe(tmp_path, shapes_dir, output_dir=str(tmp_path / "one"))
    Trainer(load_recipe(one, BASE + ["batch_size=8"])).train()
    assert losses(ddp_run) == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert_close_weights(ddp_run, tmp_path / "one", atol=1e-5)
    summary = json.loads((ddp_run / "train_summary.json").read_text())
    assert summary["steps"] == 6


@pytest.mark.slow
def test_a_killed_ddp_run_resumes_to_the_uninterrupted_result(tmp_path, shapes_dir, ddp_run):
    path = write_recipe(tmp_path, shapes_dir, output_dir=str(tmp_path / "killed"))
    args = sets(*BASE, "batch_size=4", "save_every=2")
    proc = torchrun(path, 2, *args, wait=False)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoint-4").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, at once
    proc.wait()
    torchrun(path, 2, *args, "--resume")
    assert_close_weights(ddp_run, tmp_path / "killed", atol=1e-6)
    assert [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]


@pytest.mark.slow
def test_fsdp_on_two_processes_trains_like_ddp_and_its_checkpoints_load_in_one(tmp_path, shapes_dir, ddp_run):
    from visprompt.models.vision_language_model import VisionLanguageModel
    from visprompt.train.checkpoint import is_sharded_checkpoint, load_checkpoint_model

    path = write_recipe(tmp_path, shapes_dir, output_dir=str(tmp_path / "fsdp"))
    args = sets(*BASE, "batch_size=4", "save_every=2", "fsdp=true")
    torchrun(path, 2, *args)
    out = tmp_path / "fsdp"
    assert losses(out) == pytest.approx(losses(ddp_run), abs=1e-5)
    assert_close_weights(ddp_run, out, atol=1e-5)  # the final save is whole: it loads anywhere
    VisionLanguageModel.from_pretrained(out)
    ckpt = out / "checkpoint-4"
    assert is_sharded_checkpoint(ckpt) and (ckpt / "dcp" / ".metadata").is_file()
    one = load_checkpoint_model(ckpt)  # resharded into this one process
    ddp_ckpt = VisionLanguageModel.from_pretrained(ddp_run / "checkpoint-4")
    a, b = one.state_dict(), ddp_ckpt.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in b) <= 1e-5

    # a run stopped after checkpoint-4 resumes from its shards to the same result
    for f in ("model.safetensors", "train_summary.json"):
        (out / f).unlink()
    torchrun(path, 2, *args, "--set", "max_steps=6", "--resume")
    assert_close_weights(ddp_run, out, atol=1e-5)
