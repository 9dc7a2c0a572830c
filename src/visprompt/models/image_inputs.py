"""What one image becomes for a model: encoder inputs and the number of prompt tokens it fills.

One code path for training and inference: the training dataset and the inference backend both call
`image_layout` (token counts, to expand the placeholders) and `prepare_image` (pixels), so an image
always takes as many tokens as the model will write into its slots.

With `image_tiling: none` an image is one view and `tokens_per_image` tokens. With `anyres` it is a
global view plus a grid of tiles (images/tiling.py); its tokens are, in order: the global view's,
then per row of tiles each tile's followed by one learned separator (LLaVA-NeXT's `image_newline`,
here once per row of tiles; `ModalityProjector.arrange_tiles` writes them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..images import ImagePreprocessor
from ..images.tiling import TileGrid, select_grid, tile_pixels
from .config import VLMConfig


@dataclass(frozen=True)
class ImageLayout:
    """How one image's tokens are laid out: grid (0 x 0: untiled) and tokens per view."""

    grid: TileGrid
    tokens_per_view: int

    @property
    def n_views(self) -> int:
        """Encoder inputs: the global view and the tiles."""
        return self.grid.n_tiles

    @property
    def n_tokens(self) -> int:
        """Prompt tokens: every view's, plus one separator after each row of tiles."""
        return self.n_views * self.tokens_per_view + self.grid.rows


def image_preprocessor(cfg: VLMConfig) -> ImagePreprocessor:
    """The preprocessor of a built model's config (its size is one view's)."""
    return ImagePreprocessor(cfg.image_size, cfg.image_mean, cfg.image_std, cfg.image_resize_mode)


def image_layout(cfg: VLMConfig, size: tuple[int, int]) -> ImageLayout:
    """The layout of an image of `size` (width, height) for a built model's config."""
    if cfg.image_tiling != "anyres":
        return ImageLayout(TileGrid(), cfg.tokens_per_image)
    return ImageLayout(select_grid(size, cfg.max_tiles, (cfg.image_size, cfg.image_size)), cfg.tokens_per_image)


def max_image_tokens(cfg: VLMConfig) -> int:
    """The most prompt tokens one image can take (the token budget `max_tiles` sets)."""
    if cfg.image_tiling != "anyres":
        return cfg.tokens_per_image
    return (1 + cfg.max_tiles) * cfg.tokens_per_image + cfg.max_tiles  # a max_tiles x 1 grid


def prepare_image(
    img: Image.Image, cfg: VLMConfig, preprocess: ImagePreprocessor | None = None
) -> tuple[torch.Tensor, ImageLayout]:
    """Encoder inputs and token layout of one RGB image.

    Args:
        img: the image (augmented already, in training).
        cfg: a built model's config.
        preprocess: `image_preprocessor(cfg)`, when the caller keeps one.

    Returns:
        ([layout.n_views, 3, H, W] normalised pixels, its ImageLayout).
    """
    preprocess = preprocess or image_preprocessor(cfg)
    layout = image_layout(cfg, img.size)
    return tile_pixels(img, layout.grid, preprocess), layout


def prepare_images(
    images: Sequence[Image.Image], cfg: VLMConfig, preprocess: ImagePreprocessor | None = None
) -> tuple[torch.Tensor, list[ImageLayout]]:
    """`prepare_image` over several images: ([sum of n_views, 3, H, W], one layout per image)."""
    preprocess = preprocess or image_preprocessor(cfg)
    if cfg.image_tiling != "anyres":  # one batched resize, as before tiling existed
        return preprocess(list(images)), [image_layout(cfg, im.size) for im in images]
    parts = [prepare_image(im, cfg, preprocess) for im in images]
    return torch.cat([p for p, _ in parts]), [lay for _, lay in parts]
