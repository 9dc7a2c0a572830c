"""Vision encoders: any transformers vision model (ViT-style or CNN), or one built from a size spec.

Whatever the family, the encoder returns patch tokens `[B, N, D]`: transformer encoders give their
hidden states without the CLS/register tokens, CNNs give their last feature map flattened row by row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import ConfigError
from ..images.preprocess import CLIP_MEAN, CLIP_STD, HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD
from .config import VLMConfig
from .hub import quiet_loading, resolve_model_path

# Transformer encoders: how many leading non-patch tokens (CLS) to drop.
_LEADING_TOKENS = {"vit": 1, "clip_vision_model": 1, "dinov2": 1, "dinov2_with_registers": 1, "siglip_vision_model": 0}
# Full two-tower checkpoints whose vision half we take.
_TWO_TOWER = {"clip": "clip_vision_model", "siglip": "siglip_vision_model", "siglip2": "siglip2_vision_model"}
CNN_TYPES = {"resnet", "convnext", "convnextv2", "efficientnet", "mobilenet_v2", "regnet", "bit"}
PACKAGED = {"efficientnet-lite0"}

# Normalisation per family when the checkpoint has no image processor config (else ImageNet's).
_DEFAULT_NORM = {
    "clip_vision_model": (CLIP_MEAN, CLIP_STD),
    "siglip_vision_model": (HALF_MEAN, HALF_STD),
}


class ImageSettings(NamedTuple):
    """Input size and normalisation an encoder is used with."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _model_from_config(config) -> nn.Module:
    from transformers import AutoModel

    if config.model_type == "vit":
        from transformers import ViTModel

        return ViTModel(config, add_pooling_layer=False)
    return AutoModel.from_config(config)


def scratch_vision_config(cfg: VLMConfig, image_size: int):
    """A transformers config from the size spec in `cfg` (random weights, no download)."""
    if cfg.vision_type == "vit":
        from transformers import ViTConfig

        if image_size % cfg.vision_patch_size:
            raise ConfigError(f"image_size {image_size} is not a multiple of vision_patch_size {cfg.vision_patch_size}")
        return ViTConfig(
            hidden_size=cfg.vision_hidden_size,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads,
            intermediate_size=4 * cfg.vision_hidden_size,
            image_size=image_size,
            patch_size=cfg.vision_patch_size,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    if cfg.vision_type == "resnet":
        from transformers import ResNetConfig

        # Stage widths double up to vision_hidden_size; one block per stage keeps it small.
        widths = [max(16, cfg.vision_hidden_size >> (cfg.vision_layers - 1 - i)) for i in range(cfg.vision_layers)]
        return ResNetConfig(
            embedding_size=widths[0],
            hidden_sizes=widths,
            depths=[1] * cfg.vision_layers,
            layer_type="basic",
            downsample_in_first_stage=False,
        )
    raise ConfigError(f"vision_type must be 'vit' or 'resnet' for a scratch encoder, got {cfg.vision_type!r}")


class VisionEncoder(nn.Module):
    """Wraps a transformers vision model (or the packaged EfficientNet-Lite0) -> patch tokens [B, N, D]."""

    def __init__(self, model: nn.Module, model_type: str, feature_layer: int = -1, num_leading_tokens: int = 0):
        super().__init__()
        self.model = model
        self.model_type = model_type
        self.feature_layer = feature_layer
        self.num_leading_tokens = num_leading_tokens
        self._channels: int | None = None  # of an intermediate CNN map, found on first use
        self.is_cnn = model_type in CNN_TYPES or model_type in PACKAGED

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: VLMConfig) -> VisionEncoder:
        """Rebuild the architecture saved in cfg.vision_config (weights come from the checkpoint)."""
        if cfg.vision_config is None:
            raise ConfigError("vision_config is missing: this config was never built")
        vc = dict(cfg.vision_config)
        model_type = vc.pop("model_type")
        if model_type in PACKAGED:
            from .efficientnet_lite import EfficientNetLiteEncoder

            # 17 MB; then overwritten by the checkpoint
            return cls(EfficientNetLiteEncoder.from_packaged(), model_type, cfg.vision_feature_layer)
        from transformers import AutoConfig

        config = AutoConfig.for_model(model_type, **vc)
        return cls(_model_from_config(config), model_type, cfg.vision_feature_layer, _leading_tokens(config))

    @classmethod
    def build(cls, cfg: VLMConfig) -> tuple[VisionEncoder, ImageSettings]:
        """Build per cfg.vision_source (scratch / packaged / hub id / folder).

        Returns the encoder and the image settings to use with it: cfg's own where set, else the
        encoder's (its image processor's, or family defaults). cfg is not changed.
        """
        src = cfg.vision_source
        if src == "scratch":
            settings = ImageSettings(cfg.image_size or 64, cfg.image_mean or HALF_MEAN, cfg.image_std or HALF_STD)
            config = scratch_vision_config(cfg, settings.size)
            enc = cls(_model_from_config(config), config.model_type, cfg.vision_feature_layer, _leading_tokens(config))
        elif src in PACKAGED:
            from .efficientnet_lite import EfficientNetLiteEncoder

            net = EfficientNetLiteEncoder.from_packaged()
            enc = cls(net, src, cfg.vision_feature_layer)
            settings = ImageSettings(
                cfg.image_size or net.image_size,
                cfg.image_mean or tuple(net.image_mean),
                cfg.image_std or tuple(net.image_std),
            )
        else:
            enc, settings = cls._from_pretrained(src, cfg)
        return enc, settings

    @classmethod
    @quiet_loading()
    def _from_pretrained(cls, ref: str, cfg: VLMConfig) -> tuple[VisionEncoder, ImageSettings]:
        from transformers import AutoConfig, AutoModel

        path = resolve_model_path(ref)
        config = AutoConfig.from_pretrained(path)
        if config.model_type in _TWO_TOWER:
            config = config.vision_config
        kwargs: dict[str, Any] = {"add_pooling_layer": False} if config.model_type == "vit" else {}
        if config.model_type in _TWO_TOWER.values():
            model_cls = type(AutoModel.from_config(config))  # e.g. CLIPVisionModel: reads the vision half
            model = model_cls.from_pretrained(path, **kwargs)
        else:
            model = AutoModel.from_pretrained(path, **kwargs)
        enc = cls(model, config.model_type, cfg.vision_feature_layer, _leading_tokens(config))
        return enc, _image_settings(cfg, path, config)

    def config_dict(self) -> dict[str, Any]:
        if self.model_type in PACKAGED:
            return {"model_type": self.model_type}
        d = self.model.config.to_dict()
        d["model_type"] = self.model_type
        for k in ("transformers_version", "architectures", "_name_or_path"):
            d.pop(k, None)
        return d

    @property
    def hidden_size(self) -> int:
        if self.is_cnn and self.feature_layer != -1:
            return self._probe_channels()
        if self.model_type in PACKAGED:
            return self.model.hidden_size
        c = self.model.config
        if self.is_cnn:
            return c.hidden_sizes[-1] if hasattr(c, "hidden_sizes") else getattr(c, "hidden_dim", c.hidden_size)
        return c.hidden_size

    def _probe_channels(self) -> int:
        """Channels of an intermediate CNN feature map: one tiny forward pass (in eval mode, so
        BatchNorm statistics stay as they are), remembered."""
        if self._channels is None:
            param = next(self.model.parameters())
            was_training = self.training
            with torch.no_grad():
                x = torch.zeros(1, 3, 64, 64, device=param.device, dtype=param.dtype)
                self._channels = int(self.eval().forward(x).shape[-1])
            self.train(was_training)
        return self._channels

    # -- forward --------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images -> patch tokens of the hidden state `feature_layer` picks.

        Args:
            pixel_values: [B, 3, H, W] normalised images.

        Returns:
            [B, N, D] patch tokens: a transformer's hidden states without CLS/register tokens, or a
            CNN's feature map [B, D, h, w] flattened row by row (N = h * w); D = `hidden_size`.
        """
        if self.model_type in PACKAGED:
            return self.model(pixel_values, layer=self.feature_layer)
        if self.is_cnn:
            # hidden_states[0] is the stem's output, [k] stage k's (transformers' convention)
            fmap = self._hidden_state(pixel_values)  # [B, C, h, w]
            return fmap.flatten(2).transpose(1, 2)  # [B, h*w, C]
        return self._hidden_state(pixel_values)[:, self.num_leading_tokens :]  # [B, T, D]

    def _hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The hidden state `feature_layer` picks (the last one without asking for them all)."""
        if self.feature_layer == -1:
            return self.model(pixel_values=pixel_values).last_hidden_state
        states = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        if not -len(states) <= self.feature_layer < len(states):
            raise ConfigError(
                f"vision_feature_layer {self.feature_layer} is out of range for this {self.model_type} encoder (-{len(states)}..{len(states) - 1})"
            )
        return states[self.feature_layer]


def _leading_tokens(config) -> int:
    n = _LEADING_TOKENS.get(config.model_type, 0)
    return n + int(getattr(config, "num_register_tokens", 0) or 0)


def _image_settings(cfg: VLMConfig, path, config) -> ImageSettings:
    """Image size and normalisation from the checkpoint's image processor, else family defaults;
    values the user set in the config win."""
    mean, std = _DEFAULT_NORM.get(config.model_type, (IMAGENET_MEAN, IMAGENET_STD))
    size = getattr(config, "image_size", None) or 224
    try:
        proc = json.loads(Path(path, "preprocessor_config.json").read_text())
        mean, std = proc.get("image_mean", mean), proc.get("image_std", std)
        s = proc.get("crop_size") or proc.get("size") or size
        if isinstance(s, dict):
            s = s.get("height") or s.get("shortest_edge") or size
        size = int(s)
    except (OSError, ValueError):
        pass
    if isinstance(size, (list, tuple)):
        size = size[0]
    return ImageSettings(cfg.image_size or int(size), cfg.image_mean or tuple(mean), cfg.image_std or tuple(std))
