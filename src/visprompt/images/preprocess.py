"""From RGB PIL images to the normalised float tensor a vision encoder takes, plus training jitter."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

from ..errors import ConfigError
from .loading import to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)

RESIZE_MODES = ("squash", "pad", "crop")

_BICUBIC = Image.Resampling.BICUBIC


@dataclass
class ImagePreprocessor:
    """Resize and normalise images into a float32 batch [B, 3, H, W]: (x / 255 - mean) / std.

    `image_size` is an int (square) or (height, width). `resize_mode`: "squash" resizes to the exact size
    ignoring the aspect ratio; "pad" letterboxes, keeping the aspect ratio, on a background of the mean
    colour (which normalises to 0); "crop" resizes the short side and crops the centre. Resampling is
    bicubic.
    """

    image_size: int | tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "squash"

    def __post_init__(self) -> None:
        if isinstance(self.image_size, list):  # from a config file
            self.image_size = tuple(self.image_size)
        size = self.image_size
        if not (_is_side(size) or (isinstance(size, tuple) and len(size) == 2 and all(map(_is_side, size)))):
            raise ConfigError(f"image_size must be a positive int or (height, width), got {size!r}")
        self.mean = _triple("mean", self.mean)
        self.std = _triple("std", self.std)
        if min(self.std) <= 0:
            raise ConfigError(f"std values must be > 0, got {self.std}")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the output."""
        size = self.image_size
        return size if isinstance(size, tuple) else (size, size)

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        if isinstance(images, Image.Image):
            images = [images]
        height, width = self.size
        batch = np.empty((len(images), height, width, 3), dtype=np.float32)
        for i, img in enumerate(images):
            batch[i] = np.asarray(self.resize(to_rgb(img)))
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        batch = (batch / np.float32(255) - mean) / std
        return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()

    def resize(self, img: Image.Image) -> Image.Image:
        """Resize one RGB image to `size` according to `resize_mode`."""
        height, width = self.size
        if self.resize_mode == "squash":
            return img.resize((width, height), _BICUBIC)
        if self.resize_mode == "pad":
            scale = min(width / img.width, height / img.height)
            inner = (
                min(width, max(1, round(img.width * scale))),
                min(height, max(1, round(img.height * scale))),
            )
            canvas = Image.new("RGB", (width, height), tuple(round(m * 255) for m in self.mean))
            canvas.paste(img.resize(inner, _BICUBIC), ((width - inner[0]) // 2, (height - inner[1]) // 2))
            return canvas
        # "crop": the centre box of the source that, scaled so the short side fits, covers the output.
        scale = max(width / img.width, height / img.height)
        box_w, box_h = width / scale, height / scale
        left, top = (img.width - box_w) / 2, (img.height - box_h) / 2
        return img.resize((width, height), _BICUBIC, box=(left, top, left + box_w, top + box_h))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready values, for a model config."""
        size = self.image_size
        return {
            "image_size": list(size) if isinstance(size, tuple) else size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize_mode": self.resize_mode,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImagePreprocessor:
        unknown = set(values) - {"image_size", "mean", "std", "resize_mode"}
        if unknown:
            raise ConfigError(f"unknown image preprocessor keys: {', '.join(sorted(unknown))}")
        try:
            return cls(**values)
        except TypeError as exc:  # a required key is missing
            raise ConfigError(f"image preprocessor config: {exc}") from None


# Words that make a flip or a colour change turn a true answer false.
SIDE_WORDS = frozenset("left right leftmost rightmost lefthand righthand".split())
COLOUR_WORDS = frozenset(
    """red orange yellow green blue purple violet pink brown black white grey gray beige cyan magenta
    turquoise teal navy maroon olive gold golden silver tan cream colour color colours colors coloured
    colored colourful colorful reddish bluish greenish yellowish""".split()
)
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class AugmentPolicy:
    """Which label-changing jitters a training example allows: a horizontal flip unless its text
    speaks of left or right, colour jitter (saturation, hue) unless it speaks of colours."""

    flip: bool = False
    colour: bool = False

    @classmethod
    def for_text(cls, text: str) -> AugmentPolicy:
        words = set(_WORD.findall(text.lower().replace("-", "")))
        return cls(flip=not words & SIDE_WORDS, colour=not words & COLOUR_WORDS)


def augment(
    img: Image.Image, rng: random.Random, strength: float = 1.0, policy: AugmentPolicy = AugmentPolicy()
) -> Image.Image:
    """Training-time jitter that keeps the answers to questions about the image true.

    Always: brightness and contrast each change by a factor within 1 +- 0.2 * strength (both act on
    the three channels alike, so hues survive), and a zoom of up to 1 + 0.15 * strength at a random
    offset gives scale and translation jitter with no border to fill; the size is unchanged. What
    `policy` allows (see `AugmentPolicy.for_text`): a horizontal flip half the time, and saturation
    within 1 +- 0.3 * strength and a hue shift within +- 0.05 * strength turns. The same number of
    random draws whatever the policy, so examples stay in step. `strength` is in [0, 1].
    """
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    jitter = 0.2 * strength
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - jitter, 1 + jitter))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - jitter, 1 + jitter))
    zoom = rng.uniform(1.0, 1.0 + 0.15 * strength)
    box_w, box_h = img.width / zoom, img.height / zoom
    left = rng.uniform(0, img.width - box_w)
    top = rng.uniform(0, img.height - box_h)
    img = img.resize(img.size, _BICUBIC, box=(left, top, left + box_w, top + box_h))
    flip = rng.random() < 0.5
    saturation = rng.uniform(1 - 0.3 * strength, 1 + 0.3 * strength)
    hue = rng.uniform(-0.05 * strength, 0.05 * strength)
    if policy.flip and flip and strength > 0:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if policy.colour and strength > 0:
        img = ImageEnhance.Color(img).enhance(saturation)
        if hue:
            h, sat, v = img.convert("HSV").split()
            shift = round(hue * 256) % 256
            h = h.point(lambda x: (x + shift) % 256)
            img = Image.merge("HSV", (h, sat, v)).convert("RGB")
    return img


def _triple(name: str, values: Sequence[float]) -> tuple[float, float, float]:
    try:
        a, b, c = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be three numbers (R, G, B), got {values!r}") from None
    return (a, b, c)


def _is_side(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
