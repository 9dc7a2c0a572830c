"""Training checkpoints: `OUTPUT/checkpoint-STEP/`, a loadable model plus `trainer_state.pt`, which
holds everything else a resumed run needs to continue exactly as if it had not stopped: the
optimizer, every random number generator, the running log counters and, with LoRA, the unmerged
base weights and adapters (the model file holds them merged, so that a checkpoint loads like any
model). Each checkpoint is written atomically: a folder with this name is complete."""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..files import staged_folder
from ..models.lora import has_lora
from ..models.vision_language_model import CONFIG_NAME, WEIGHTS_NAME, VisionLanguageModel

STATE_NAME = "trainer_state.pt"
SHARDS_NAME = "dcp"  # under FSDP: each process's shards of model and optimizer (torch.distributed.checkpoint)
PREFIX = "checkpoint-"


def _step_of(path: Path) -> int | None:
    tail = path.name[len(PREFIX) :]
    return int(tail) if path.name.startswith(PREFIX) and tail.isdigit() else None


def complete_checkpoints(out: Path) -> list[Path]:
    """`checkpoint-STEP` folders with every file a resume needs, oldest first."""
    found = []
    for path in out.glob(f"{PREFIX}*"):
        step = _step_of(path)
        weights = (path / WEIGHTS_NAME).is_file() or (path / SHARDS_NAME / ".metadata").is_file()
        if step is not None and weights and all((path / n).is_file() for n in (CONFIG_NAME, STATE_NAME)):
            found.append((step, path))
    return [p for _, p in sorted(found)]


def newest_checkpoint(out: Path) -> Path:
    """The newest complete checkpoint in `out`; a ConfigError when there is none."""
    ckpts = complete_checkpoints(out)
    if not ckpts:
        raise ConfigError(
            f"--resume: no complete checkpoint ({PREFIX}STEP/ with {STATE_NAME}) in {out}; "
            "run without --resume to start from the beginning"
        )
    return ckpts[-1]


def remove_checkpoints(out: Path) -> int:
    """Delete every checkpoint folder in `out` (a fresh run must not be resumed from an older run's)."""
    old = [p for p in out.glob(f"{PREFIX}*") if p.is_dir() and _step_of(p) is not None]
    for path in old:
        shutil.rmtree(path)
    return len(old)


def rng_state(dataset_rng: random.Random) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "dataset": dataset_rng.getstate()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (name, keys.tolist(), pos, has_gauss, gauss)  # plain values: loads with weights_only
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any], dataset_rng: random.Random) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    dataset_rng.setstate(state["dataset"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a merged save loses: LoRA adapters and the base weights they wrap."""
    if not has_lora(model):
        return {}
    return {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_" in n or ".base_layer." in n}


def save_checkpoint(out: Path, model: VisionLanguageModel, state: dict[str, Any], keep: int) -> Path:
    """Write `out/checkpoint-STEP` atomically, then keep only the newest `keep` checkpoints."""
    folder = out / f"{PREFIX}{state['step']}"
    with staged_folder(folder) as tmp:
        model.save_pretrained(tmp)
        torch.save({**state, "lora": lora_tensors(model)}, tmp / STATE_NAME)
    for old in complete_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return folder


def load_state(folder: Path, model: VisionLanguageModel) -> dict[str, Any]:
    """The checkpoint's trainer state; puts its unmerged LoRA tensors back into `model`."""
    state = torch.load(folder / STATE_NAME, weights_only=True)
    if state.get("lora"):
        missing = set(state["lora"]) - set(model.state_dict())
        if missing:
            raise ConfigError(f"{folder}: its LoRA adapters do not fit the model ({sorted(missing)[:2]})")
        model.load_state_dict(state["lora"], strict=False)
    return state


def is_sharded_checkpoint(folder: Path) -> bool:
    return (folder / SHARDS_NAME).is_dir() and not (folder / WEIGHTS_NAME).is_file()


def save_sharded_checkpoint(out: Path, model, module, optimizer, state: dict[str, Any], keep: int, d) -> Path:
    """FSDP: every process writes its shards of model and optimizer into one temporary folder, then
    the main process adds config, tokenizer and trainer state and renames it into place. Collective."""
    from ..files import commit_folder, temp_sibling
    from .distributed import save_sharded

    folder = out / f"{PREFIX}{state['step']}"
    tmp = Path(d.gather(str(temp_sibling(folder)) if d.main else None)[0])
    save_sharded(tmp / SHARDS_NAME, module, optimizer)
    d.barrier()
    if d.main:
        model.cfg.save(tmp)
        model.tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE_NAME)
        commit_folder(tmp, folder)
        for old in complete_checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    d.barrier()
    return folder


def load_checkpoint_model(folder: Path) -> VisionLanguageModel:
    """The model of a checkpoint, in this process: a plain one loads as any saved model; a sharded
    (FSDP) one is read from its shards, resharded into one process."""
    if not is_sharded_checkpoint(folder):
        return VisionLanguageModel.from_pretrained(folder)
    import torch.distributed.checkpoint as dcp

    from ..models.config import VLMConfig
    from ..models.lora import add_lora
    from ..models.vision_language_model import load_tokenizer

    cfg = VLMConfig.load(folder)
    model = VisionLanguageModel.from_config(cfg, load_tokenizer(folder))
    names = dcp.FileSystemReader(str(folder / SHARDS_NAME)).read_metadata().state_dict_metadata
    if any("lora_" in n for n in names):
        add_lora(model.lm, cfg.lm_lora_rank, cfg.lm_lora_alpha, cfg.lm_lora_targets)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "no process group: loading in one process", which is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(folder / SHARDS_NAME))
    model.load_state_dict(state["model"])
    return model.eval()
