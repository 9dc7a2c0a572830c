"""One flat config for a whole VLM, saved as config.json next to model.safetensors.

Fields are prefixed by the part they describe (vision_*, connector_*, lm_*), as in nanoVLM. The
`*_source` fields say where the initial weights came from (a hub id, a local folder, a packaged
name, or "scratch" for a size spec with random weights); `vision_config` / `lm_config` hold the
full transformers config of each part once it is built, so `from_pretrained` can rebuild the
architecture offline and then load every weight from model.safetensors.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

FUSIONS = ("prefix", "cross_attention", "mixture")


@dataclass
class VLMConfig:
    model_type: str = "visprompt"

    # --- vision encoder -------------------------------------------------------------------
    vision_source: str = "scratch"  # "scratch" | hub id | folder | "efficientnet-lite0"
    vision_type: str = "vit"  # for scratch: "vit" | "resnet"
    vision_hidden_size: int = 128  # scratch ViT width / last ResNet stage width
    vision_layers: int = 4
    vision_heads: int = 4
    vision_patch_size: int = 8
    vision_feature_layer: int = -1  # which hidden state of a transformer encoder feeds the connector
    vision_config: dict[str, Any] | None = None  # the built encoder's transformers config
    # Input size and normalisation; 0 / () take the pretrained encoder's own (64 px, 0.5/0.5 for scratch).
    image_size: int = 0
    image_mean: tuple[float, ...] = ()
    image_std: tuple[float, ...] = ()
    image_resize_mode: str = "squash"

    # --- connector (modality projector) ---------------------------------------------------
    connector_type: str = "mlp"  # 2-layer MLP with GELU
    connector_hidden_size: int = 0  # 0: the LM's hidden size
    connector_pixel_shuffle: int = 1  # factor r: r*r neighbouring patches merge into one token
    connector_dropout: float = 0.0

    # --- fusion ---------------------------------------------------------------------------
    fusion: str = "prefix"

    # --- language model -------------------------------------------------------------------
    lm_source: str = "scratch"  # "scratch" | hub id | folder | "smollm2-135m"
    lm_hidden_size: int = 256
    lm_layers: int = 4
    lm_heads: int = 4
    lm_kv_heads: int = 4
    lm_intermediate_size: int = 0  # 0: 4 * hidden (rounded) for scratch
    lm_max_position: int = 512
    lm_dropout: float = 0.0
    lm_tie_embeddings: bool = True
    lm_config: dict[str, Any] | None = None  # the built LM's transformers config

    # --- tokenizer and prompt -------------------------------------------------------------
    tokenizer_vocab_size: int = 1024  # for a tokenizer trained on the data
    image_token: str = "<image>"
    image_token_id: int = -1  # filled in once the tokenizer exists
    tokens_per_image: int = 0  # filled in once the encoder and connector exist

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ConfigError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**data)

    def save(self, folder: str | Path) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "VLMConfig":
        path = Path(folder, "config.json")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        if data.get("model_type") != "visprompt":
            raise ConfigError(f"{path} is not a visprompt model config (model_type={data.get('model_type')!r})")
        return cls.from_dict(data)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(VLMConfig)]
