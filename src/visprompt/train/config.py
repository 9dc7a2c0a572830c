"""Training recipes: a YAML file with a `model:` section (VLMConfig fields), a `train:` section, and
optionally `stages:`, a list of training stages run one after the other on the same model (LLaVA's
alignment then instruction tuning): each stage is a mapping with a `name` and the `train:` settings
it changes (data, steps, learning rates, freezing)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.formats import FORMATS
from ..errors import ConfigError
from ..models.config import VLMConfig, check_field_types, checked_value


@dataclass
class TrainConfig:
    train_data: str = ""  # a dataset in any of DATA_FORMATS (docs/training.md, "Data formats")
    eval_data: str = ""  # held-out split for periodic evaluation ("" = none)
    data_format: str = "auto"  # of train_data and eval_data; auto: told from each path
    image_root: str = ""  # relative image paths start here ("" = the data file's folder)
    on_bad_record: str = "skip"  # skip | fail (docs/training.md, "Bad records")
    output_dir: str = "runs/vlm"
    init_from: str = ""  # start from a saved model folder (e.g. stage 2 after alignment)
    resume: bool = False  # continue from the newest checkpoint in output_dir

    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 512

    # Learning rate per part; 0 freezes the part.
    vision_lr: float = 1e-4
    connector_lr: float = 1e-3
    lm_lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of each part's LR
    grad_clip: float = 1.0
    # Brightness, contrast and zoom jitter; plus a horizontal flip unless the conversation speaks of
    # left or right, and colour jitter unless it speaks of colours (images.preprocess.AugmentPolicy).
    augment: bool = False
    # Batches of similar lengths (less padding): each shuffled window of 50 global batches is sorted
    # by length, cut into batches, and the batches shuffled (transformers' group_by_length).
    group_by_length: bool = False
    # With a frozen encoder (vision_lr 0) and no augmentation, run it once per distinct training
    # image and train on its stored outputs (kept in memory, up to cache_vision_features_gb).
    cache_vision_features: bool = True
    cache_vision_features_gb: float = 8.0

    dtype: str = "auto"  # auto (bf16 autocast where the CPU has bf16 units, else float32) | float32 | bfloat16
    num_threads: int = 0  # 0: torch default
    fsdp: bool = False  # under torchrun: shard the model over the processes (FSDP2) instead of copying it (DDP)
    seed: int = 0

    log_every: int = 10
    tensorboard: bool = False  # also write the logged scalars as TensorBoard event files (OUTPUT/tensorboard/)
    eval_every: int = 0  # steps; 0: only at the end
    eval_max_records: int = 200
    eval_batch_size: int = 64
    save_every: int = 0  # steps; 0: only at the end
    save_total_limit: int = 2

    def validate(self, section: str = "train") -> None:
        """ConfigError naming the first setting out of its range ("train.batch_size must be >= 1, got 0")."""
        check_field_types(self, section)  # settings assigned after construction are checked too
        rules = [(name, ">= 1", lambda v: v >= 1) for name in _AT_LEAST_ONE]
        rules += [(name, ">= 0", lambda v: v >= 0) for name in _NOT_NEGATIVE]
        rules += [("epochs", "> 0", lambda v: v > 0)]
        rules += [(name, "between 0 and 1", lambda v: 0 <= v <= 1) for name in ("warmup_ratio", "min_lr_ratio")]
        for name, wanted, ok in rules:
            value = getattr(self, name)
            if not ok(value):  # NaN fails every rule
                raise ConfigError(f"{section}.{name} must be {wanted}, got {value!r}")
        for name, allowed in (("dtype", DTYPES), ("data_format", DATA_FORMATS), ("on_bad_record", ON_BAD_RECORD)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{section}.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


DTYPES = ("auto", "float32", "bfloat16")  # auto: bfloat16 where the CPU has bf16 units (precision.py)
DATA_FORMATS = FORMATS
ON_BAD_RECORD = ("skip", "fail")
_AT_LEAST_ONE = ("batch_size", "grad_accum", "max_length", "log_every", "eval_batch_size", "save_total_limit")
_NOT_NEGATIVE = (
    "max_steps",
    "vision_lr",
    "connector_lr",
    "lm_lr",
    "weight_decay",
    "grad_clip",
    "cache_vision_features_gb",
    "num_threads",
    "eval_every",
    "eval_max_records",
    "save_every",
)


@dataclass
class Recipe:
    model: VLMConfig = field(default_factory=VLMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list[tuple[str, TrainConfig]] = field(default_factory=list)  # (name, full settings), in order


def _stage(raw: Any, index: int, base: TrainConfig) -> tuple[str, TrainConfig]:
    if not isinstance(raw, dict):
        raise ConfigError(f"stage {index + 1} must be a mapping of train settings, got {raw!r}")
    raw = dict(raw)
    name = str(raw.pop("name", f"stage{index + 1}"))
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"stage name must be letters, digits, - or _, got {name!r}")
    tc = dataclasses.replace(base)
    for k, v in raw.items():
        _apply(tc, k, v, f"stages.{name}")
    return name, tc


def _coerce(value: Any, target: Any, name: str) -> Any:
    """A value for the setting `name` whose current value is `target`: a --set string is parsed with
    YAML rules, then the value must have the setting's type (`checked_value`)."""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
    if isinstance(target, str):
        return parsed if isinstance(parsed, str) else str(value)
    if isinstance(target, float) and isinstance(parsed, str):
        try:
            parsed = float(parsed)  # YAML reads "1e-3" (no dot) as a string
        except ValueError:
            pass
    return checked_value(name, parsed, target)


def _unknown_setting(key: str, recipe: Recipe) -> str:
    """--set KEY with no section that neither train nor model has, with the closest name of either."""
    import difflib

    names = {f.name for f in dataclasses.fields(TrainConfig)} | {f.name for f in dataclasses.fields(recipe.model)}
    close = difflib.get_close_matches(key, sorted(names - {"built"}), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown setting {key!r}: not a train or a model setting{hint}"


def _apply(obj: Any, key: str, value: Any, section: str) -> None:
    names = {f.name for f in dataclasses.fields(obj)} - {"built"}  # VLMConfig.built is computed, not a setting
    if key not in names:
        raise ConfigError(f"unknown {section} setting {key!r}")
    setattr(obj, key, _coerce(value, getattr(obj, key), f"{section}.{key}"))


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    section = data.get(name)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"recipe section '{name}:' must be a mapping of settings, got {section!r}")
    return section


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML and apply `key=value` overrides (`train.lr=...`, `model.lm_layers=2`, or a bare key)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read recipe {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping with model: and train: sections")
    unknown = set(data) - {"model", "train", "stages"}
    if unknown:
        raise ConfigError(
            f"recipe sections must be 'model', 'train' and 'stages', found {', '.join(sorted(map(str, unknown)))}"
        )
    recipe = Recipe(model=VLMConfig(), train=TrainConfig())
    for section in ("model", "train"):
        for k, v in _section(data, section).items():
            _apply(getattr(recipe, section), str(k), v, section)
    raw_stages = data.get("stages") or []
    if not isinstance(raw_stages, list):
        raise ConfigError("stages must be a list of mappings")
    stage_overrides: dict[str, list[tuple[str, str]]] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        if key.startswith("stages."):  # stages.NAME.key=value: one stage only
            _, stage_name, name = (key.split(".", 2) + ["", ""])[:3]
            stage_overrides.setdefault(stage_name, []).append((name, value))
            continue
        section, _, name = key.rpartition(".")
        if not section:
            in_train = name in {f.name for f in dataclasses.fields(TrainConfig)}
            section = "train" if in_train else "model"
            if not in_train and name not in {f.name for f in dataclasses.fields(recipe.model)}:
                raise ConfigError(_unknown_setting(name, recipe))
        if section not in ("model", "train"):
            raise ConfigError(f"--set key must start with model. or train., got {key!r}")
        _apply(getattr(recipe, section), name, value, section)
        if section == "train":
            stage_overrides.setdefault("*", []).append((name, value))
    # A stage starts from `train:` (with the command line's overrides) and sets its own keys; the
    # command line then wins again, so `--set max_steps=5` shortens every stage.
    for i, raw in enumerate(raw_stages):
        name, tc = _stage(raw, i, recipe.train)
        for key, value in stage_overrides.get("*", []) + stage_overrides.pop(name, []):
            _apply(tc, key, value, f"stage {name!r}")
        recipe.stages.append((name, tc))
    unknown_stages = set(stage_overrides) - {"*"}
    if unknown_stages:
        raise ConfigError(f"--set names unknown stage(s): {', '.join(sorted(unknown_stages))}")
    if len({n for n, _ in recipe.stages}) != len(recipe.stages):
        raise ConfigError("stage names must be unique")
    recipe.model.__post_init__()
    recipe.train.validate()
    for name, tc in recipe.stages:
        tc.validate(f"stages.{name}")
    return recipe
