"""The config of a whole VLM, saved as config.json next to model.safetensors.

`VLMConfig` holds the user's settings, prefixed by the part they describe (vision_*, connector_*,
lm_*), as in nanoVLM. The `*_source` fields say where the initial weights came from (a hub id, a local
folder, a packaged name, or "scratch" for a size spec with random weights).

`BuiltConfig` (`VLMConfig.built`) holds what building the model works out: the full transformers
config of each part (so `from_pretrained` rebuilds the architecture offline, then loads every weight
from model.safetensors), the placeholder token's id and the token counts per image. Building never
writes into the caller's config: `VisionLanguageModel.build` keeps a filled copy as `model.cfg`.
Config files that keep the built fields at the top level (the older flat layout) still load.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, one_line
from .chat import IMAGE_TOKEN

CONNECTOR_INPUT_NORMS = ("layer", "batch")  # see ModalityProjector
CONNECTOR_TYPES = ("mlp", "llava")  # see ModalityProjector

FUSIONS = ("prefix", "cross_attention", "mixture")
IMAGE_TILINGS = ("none", "anyres")  # see VLMConfig.image_tiling


@dataclass
class BuiltConfig:
    """Fields computed when a model is built; never user settings."""

    vision_config: dict[str, Any] | None = None  # the built encoder's transformers config
    vision_num_patches: int = 0  # patch tokens per image out of the encoder
    image_feature_tokens: int = 0  # tokens per image the fusion reads (connector/resampler output)
    lm_config: dict[str, Any] | None = None  # the built LM's transformers config
    image_token_id: int = -1  # the placeholder token's id in the tokenizer
    # Placeholder tokens per image in the prompt: the connector's output length for prefix/mixture,
    # 1 for cross_attention. With image_tiling "anyres": per view (global view or tile).
    tokens_per_image: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)


BUILT_FIELDS = tuple(f.name for f in dataclasses.fields(BuiltConfig))


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
    # Which hidden state feeds the connector, indexed like transformers' hidden_states (0: embeddings
    # or stem; -1: the last; -2: LLaVA's choice for CLIP). For CNNs a stage's (EfficientNet-Lite0: a
    # block's) feature map; middle layers keep position and colour that the last one has pooled away.
    vision_feature_layer: int = -1
    # Input size and normalisation; 0 / () take the pretrained encoder's own (64 px, 0.5/0.5 for scratch).
    image_size: int = 0
    image_mean: tuple[float, ...] = ()
    image_std: tuple[float, ...] = ()
    image_resize_mode: str = "squash"
    # "anyres" (LLaVA-NeXT): a large image becomes a global view plus a grid of up to max_tiles tiles
    # of image_size, the grid chosen by aspect ratio; a learned separator token ends each row of
    # tiles, so an image takes (1 + rows * cols) * tokens_per_image + rows tokens. Prefix fusion only.
    # "none": one view of image_size.
    image_tiling: str = "none"
    max_tiles: int = 4

    # --- connector (modality projector) ---------------------------------------------------
    # "mlp": input norm, 2-layer MLP with GELU, LayerNorm at the LM's embedding scale, learned positions.
    # "llava": LLaVA-1.5's `mlp2x_gelu` exactly (Linear-GELU-Linear, nothing else): for a pretrained
    # LM, and what `visprompt export --format llava|gguf` can write as a LLaVA checkpoint.
    connector_type: str = "mlp"
    connector_hidden_size: int = 0  # 0: the LM's hidden size
    connector_pixel_shuffle: int = 1  # factor r: r*r neighbouring patches merge into one token
    connector_dropout: float = 0.0
    connector_input_norm: str = "layer"  # "layer" (per token) | "batch" (per channel, running stats)
    # Image tokens start at this multiple of the LM's token-embedding RMS (its output LayerNorm's
    # initial weight and the learned positions' scale). Louder than text (e.g. 15) lets an LM trained
    # from scratch find them sooner (README, shapes diagnostics); 1 suits a pretrained LM.
    connector_output_gain: float = 1.0

    # --- fusion ---------------------------------------------------------------------------
    # prefix: image tokens overwrite placeholder embeddings (LLaVA, nanoVLM).
    # cross_attention: gated cross-attention blocks before every xattn_every-th decoder layer
    #   (Flamingo); the prompt holds ONE placeholder per image, marking where the image sits.
    # mixture: one prefix-fusion branch per image, mixed per token by a learned text->image score.
    fusion: str = "prefix"
    xattn_every: int = 1  # a cross-attention block before decoder layers N-1, 2N-1, ... (OpenFlamingo)
    xattn_heads: int = 0  # 0: the LM's number of attention heads
    xattn_ff_mult: int = 4  # width of the gated feed-forward, in multiples of the LM's hidden size
    # Initial value of the tanh gates. 0 (Flamingo): the untrained model IS the LM, right for a
    # pretrained vision encoder; but the gate also scales every gradient reaching the image side, so
    # an encoder trained from scratch gets none at 0: start such models at e.g. 0.5.
    xattn_gate_init: float = 0.0
    resampler_latents: int = 0  # > 0: a Perceiver resampler turns each image into this many latents
    resampler_depth: int = 2
    mixture_max_images: int = 8  # learned score bias per image index (later images share the last)

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
    # LoRA (peft) on the LM: with lm_lr > 0 the trainer trains rank-r adapters on these projections
    # and keeps the LM's own weights frozen; save_pretrained merges them into the weights.
    lm_lora_rank: int = 0
    lm_lora_alpha: float = 16.0
    lm_lora_targets: str = "q_proj,k_proj,v_proj,o_proj"

    # --- tokenizer and prompt -------------------------------------------------------------
    tokenizer_vocab_size: int = 1024  # for a tokenizer trained on the data
    image_token: str = IMAGE_TOKEN
    system_prompt: str = ""  # used when a conversation has no system message, in training and generation
    # Where `ask`/`describe` put the image in the user's message: before the text (LLaVA's usual
    # layout) or after it. The trainer sets it from the training data, so a model is asked the way
    # it was trained. Explicit content lists (`generate`, the HTTP server) keep their own order.
    image_after_text: bool = False

    # --- computed when the model is built -------------------------------------------------
    built: BuiltConfig = dataclasses.field(default_factory=BuiltConfig)

    # Read access to the built fields under their own names (model.cfg.image_token_id, ...).
    vision_config = property(lambda self: self.built.vision_config)
    vision_num_patches = property(lambda self: self.built.vision_num_patches)
    image_feature_tokens = property(lambda self: self.built.image_feature_tokens)
    lm_config = property(lambda self: self.built.lm_config)
    image_token_id = property(lambda self: self.built.image_token_id)
    tokens_per_image = property(lambda self: self.built.tokens_per_image)

    def __post_init__(self) -> None:
        if isinstance(self.built, dict):
            self.built = BuiltConfig(**self.built)
        check_field_types(self)
        if self.fusion not in FUSIONS:
            raise ConfigError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        for name in ("xattn_every", "mixture_max_images", "xattn_ff_mult", "resampler_depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("xattn_heads", "resampler_latents"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.image_tiling not in IMAGE_TILINGS:
            raise ConfigError(f"image_tiling must be one of {', '.join(IMAGE_TILINGS)}, got {self.image_tiling!r}")
        if self.image_tiling == "anyres" and self.fusion != "prefix":
            raise ConfigError(f"image_tiling 'anyres' needs fusion 'prefix', got {self.fusion!r}")
        if self.max_tiles < 1:
            raise ConfigError(f"max_tiles must be >= 1, got {self.max_tiles}")
        if self.connector_type not in CONNECTOR_TYPES:
            raise ConfigError(f"connector_type must be one of {CONNECTOR_TYPES}, got {self.connector_type!r}")
        if self.connector_input_norm not in CONNECTOR_INPUT_NORMS:
            raise ConfigError(
                f"connector_input_norm must be one of {CONNECTOR_INPUT_NORMS}, got {self.connector_input_norm!r}"
            )
        if not self.connector_output_gain > 0:
            raise ConfigError(f"connector_output_gain must be > 0, got {self.connector_output_gain}")

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLMConfig:
        """From `to_dict`'s layout, or the flat one with the built fields at the top level."""
        data = dict(data)
        built = data.pop("built", None) or {}
        if not isinstance(built, dict):
            raise ConfigError(f"built: expected a mapping, got {built!r}")
        built = dict(built)
        # the older flat layout kept the built fields at the top level
        built.update({k: data.pop(k) for k in BUILT_FIELDS if k in data})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known) + sorted(set(built) - set(BUILT_FIELDS))
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**data, built=BuiltConfig(**built))

    def save(self, folder: str | Path) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> VLMConfig:
        path = Path(folder, "config.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror or one_line(e)}") from None
        except ValueError as e:  # not JSON, or not UTF-8
            raise ConfigError(f"{path} is not valid JSON: {one_line(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} is not a model config: a JSON {type(data).__name__}, not an object")
        if data.get("model_type") != "visprompt":
            raise ConfigError(f"{path} is not a visprompt model config (model_type={data.get('model_type')!r})")
        try:
            return cls.from_dict(data)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{path}: {one_line(e)}") from None


def checked_value(name: str, value: Any, default: Any) -> Any:
    """`value` for the setting `name` whose default is `default`, in the default's type (an int where a
    float is expected becomes a float, a list where a tuple is expected a tuple of floats). A value of
    another type is a ConfigError naming the setting: "lm_layers: expected an int, got 'abc'"."""
    number = (int, float)
    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an int"
    elif isinstance(default, float):
        ok, expected = isinstance(value, number) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok, expected = isinstance(value, str), "a string"
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, number) and not isinstance(v, bool) for v in value)
        expected = "a list of numbers"
        value = tuple(float(v) for v in value) if ok else value
    elif default is None:  # the built transformers configs
        ok, expected = value is None or isinstance(value, dict), "a mapping"
    else:
        ok, expected = True, ""
    if not ok:
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")
    return value


def check_field_types(obj: Any, section: str = "") -> None:
    """Check (and normalise, see `checked_value`) every field of a config dataclass against its default;
    messages name the field as `section.field`."""
    for f in dataclasses.fields(obj):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        name = f"{section}.{f.name}" if section else f.name
        setattr(obj, f.name, checked_value(name, getattr(obj, f.name), default))


def field_names() -> list[str]:
    """The user settings (the built fields are not settings)."""
    return [f.name for f in dataclasses.fields(VLMConfig) if f.name != "built"]
