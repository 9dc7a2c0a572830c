"""Large images as a grid of tiles plus a global view, as LLaVA-NeXT's AnyRes does.

The grid is the one whose resolution keeps the most of the image's pixels with the least padding
(LLaVA-NeXT's `select_best_resolution`, taken from transformers) among every grid of at most
`max_tiles` tiles of the encoder's input size. The image is resized to fit that resolution keeping
its aspect ratio, padded with the mean colour, and cut into tiles in row-major order; the global
view is the whole image at the encoder's input size, as the preprocessor's own resize mode gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .loading import ImageSource, to_rgb
from .preprocess import ImagePreprocessor

_ORIENTATION = 0x0112  # EXIF tag; values 5-8 turn the image a quarter
_TRANSPOSED = (5, 6, 7, 8)


@dataclass(frozen=True)
class TileGrid:
    """rows x cols tiles; 0 x 0 is an untiled image (the global view only)."""

    rows: int = 0
    cols: int = 0

    @property
    def n_tiles(self) -> int:
        """Encoder inputs for the image: the global view, then rows * cols tiles."""
        return 1 + self.rows * self.cols


def grid_shapes(max_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, cols) with rows * cols <= max_tiles, fewest tiles first."""
    shapes = [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles // r + 1)]
    return sorted(shapes, key=lambda rc: (rc[0] * rc[1], rc))


def grid_pinpoints(max_tiles: int, tile: tuple[int, int]) -> list[tuple[int, int]]:
    """LLaVA-NeXT's `image_grid_pinpoints` for these grids: (height, width) in pixels."""
    return [(r * tile[0], c * tile[1]) for r, c in grid_shapes(max_tiles)]


def select_grid(size: tuple[int, int], max_tiles: int, tile: tuple[int, int]) -> TileGrid:
    """The grid for an image of `size` (width, height), by LLaVA-NeXT's rule: most effective pixels,
    then least waste (transformers' `select_best_resolution`; ties go to fewer tiles)."""
    from transformers.image_processing_utils import select_best_resolution

    width, height = size
    best_h, best_w = select_best_resolution((height, width), grid_pinpoints(max_tiles, tile))
    return TileGrid(best_h // tile[0], best_w // tile[1])


def tile_pixels(img: Image.Image, grid: TileGrid, preprocess: ImagePreprocessor) -> torch.Tensor:
    """The encoder inputs of one image: its global view, then its tiles in row-major order.

    Args:
        img: an RGB image.
        grid: from `select_grid` (0 x 0: the global view only).
        preprocess: the model's preprocessor (its size is the tile size).

    Returns:
        [grid.n_tiles, 3, H, W] normalised pixels (H, W: preprocess.size).
    """
    img = to_rgb(img)
    views = preprocess([img])  # [1, 3, H, W]
    if not grid.rows:
        return views
    h, w = preprocess.size
    canvas = ImagePreprocessor((grid.rows * h, grid.cols * w), preprocess.mean, preprocess.std, "pad")
    big = canvas([img])[0]  # [3, rows * H, cols * W]
    tiles = big.unfold(1, h, h).unfold(2, w, w)  # [3, rows, cols, H, W]
    tiles = tiles.permute(1, 2, 0, 3, 4).reshape(-1, 3, h, w)  # [rows * cols, 3, H, W]
    return torch.cat([views, tiles])


def oriented_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) of an image as `load_image` will give it (EXIF orientation applied), read from
    the header without decoding the pixels."""
    if isinstance(source, Image.Image):
        return _oriented(source)
    with Image.open(source) as img:
        return _oriented(img)


def _oriented(img: Image.Image) -> tuple[int, int]:
    turned = img.getexif().get(_ORIENTATION) in _TRANSPOSED
    return (img.height, img.width) if turned else img.size
