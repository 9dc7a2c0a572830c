"""Connector: patch tokens from the vision encoder -> tokens in the language model's space."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .config import CONNECTOR_INPUT_NORMS, CONNECTOR_TYPES


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Merge each factor x factor block of neighbouring patches into one token.

    [B, N, D] -> [B, N / factor^2, D * factor^2]; N must be a square grid divisible by factor.
    """
    if factor == 1:
        return x
    b, n, d = x.shape
    side = math.isqrt(n)
    if side * side != n or side % factor:
        raise ConfigError(f"pixel shuffle needs a square patch grid divisible by {factor}, got {n} patches")
    x = x.reshape(b, side // factor, factor, side // factor, factor, d)  # [B, h, r, w, r, D]
    x = x.permute(0, 1, 3, 2, 4, 5)  # [B, h, w, r, r, D]
    return x.reshape(b, (side // factor) ** 2, d * factor * factor)


class _TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channels of [B, N, D] tokens (statistics over all B*N tokens)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)  # [B, N, D]


class ModalityProjector(nn.Module):
    """Optional pixel shuffle, then a 2-layer MLP with GELU (LLaVA's `mlp2x_gelu`).

    kind "mlp" wraps the MLP in an input norm, an output LayerNorm at the LM's embedding scale and a
    learned position per token; kind "llava" is the bare MLP (`net.1`, `net.4`), as LLaVA-1.5 has it.
    """

    def __init__(
        self,
        vision_dim: int,
        lm_dim: int,
        hidden_dim: int = 0,
        pixel_shuffle_factor: int = 1,
        dropout: float = 0.0,
        output_scale: float = 1.0,
        num_patches: int = 0,
        input_norm: str = "layer",
        kind: str = "mlp",
        tile_separator: bool = False,
    ):
        super().__init__()
        if kind not in CONNECTOR_TYPES:
            raise ConfigError(f"connector type must be one of {CONNECTOR_TYPES}, got {kind!r}")
        self.kind = kind
        self.pixel_shuffle_factor = pixel_shuffle_factor
        in_dim = vision_dim * pixel_shuffle_factor**2
        hidden_dim = hidden_dim or lm_dim
        # Encoders differ wildly in feature scale (CNN maps vs ViT states), so the input is normalised.
        # "layer": per token, across channels. "batch": per channel, across the data (running
        # statistics at inference) -- for feature maps whose channels sit far from zero with small
        # image-dependent spread, e.g. a CNN's middle blocks, where LayerNorm keeps the constant part.
        if input_norm not in CONNECTOR_INPUT_NORMS:
            raise ConfigError(f"connector input norm must be one of {CONNECTOR_INPUT_NORMS}, got {input_norm!r}")
        if kind == "llava":
            norm: nn.Module = nn.Identity()  # keeps the linears at net.1 / net.4 either way
        else:
            norm = nn.LayerNorm(in_dim) if input_norm == "layer" else _TokenBatchNorm(in_dim)
        self.net = nn.Sequential(
            norm,
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, lm_dim),
        )
        # Image tokens come out at the scale of the LM's own token embeddings (`output_scale` is
        # their RMS). Unnormalised, the MLP's output drifts to a large, nearly image-independent
        # vector that the LM learns to treat as a constant, and a model trained from scratch never
        # starts to look at the image.
        self.out_norm = nn.LayerNorm(lm_dim) if kind == "mlp" else None
        # A learned position per output token. CNN features carry no absolute position, and the LM's
        # rotary positions are relative to the question's length, so without this "which token is
        # the top-left region" is hard to learn (positions, reading-order captions, relations).
        n_out = num_patches // pixel_shuffle_factor**2 if num_patches and kind == "mlp" else 0
        self.position = nn.Parameter(torch.randn(n_out, lm_dim) * output_scale) if n_out else None
        # AnyRes tiling: a learned token after each row of tiles (LLaVA-NeXT's image_newline).
        self.tile_separator = nn.Parameter(torch.randn(lm_dim) * output_scale) if tile_separator else None
        if self.out_norm is not None:
            with torch.no_grad():
                self.out_norm.weight.fill_(output_scale)

    def output_tokens(self, num_patches: int) -> int:
        return num_patches // self.pixel_shuffle_factor**2

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch tokens -> image tokens in the language model's space.

        Args:
            patches: [B, N, Dv] patch tokens from the vision encoder.

        Returns:
            [B, N / r^2, D_lm] image tokens (r: the pixel shuffle factor); kind "mlp": at the scale of
            the LM's token embeddings, with a learned position added per token.
        """
        tokens = self.net(pixel_shuffle(patches, self.pixel_shuffle_factor))  # [B, N', D_lm]
        if self.out_norm is not None:
            tokens = self.out_norm(tokens)
        if self.position is not None:
            if tokens.shape[1] != self.position.shape[0]:
                raise ConfigError(
                    f"the encoder gave {tokens.shape[1]} tokens, the connector was built for {self.position.shape[0]} (image size changed?)"
                )
            tokens = tokens + self.position
        return tokens

    def arrange_tiles(self, tokens: torch.Tensor, grids: list) -> list[torch.Tensor]:
        """Per image, its views' tokens in prompt order: the global view, then each row of tiles
        followed by the separator.

        Args:
            tokens: [n_views, N, D] connector outputs of every image's views, image after image (the
                global view first, then the tiles row-major; see images/tiling.py).
            grids: each image's TileGrid (rows x cols; 0 x 0: the global view only).

        Returns:
            one [n_views_i * N + rows_i, D] tensor per image.
        """
        out, k = [], 0
        for grid in grids:
            parts = [tokens[k]]
            for r in range(grid.rows):
                first = k + 1 + r * grid.cols
                parts.append(tokens[first : first + grid.cols].reshape(-1, tokens.shape[-1]))
                if self.tile_separator is None:
                    raise ConfigError("a tiled image needs a connector built with tile_separator")
                parts.append(self.tile_separator.to(tokens.dtype).unsqueeze(0))
            out.append(torch.cat(parts))
            k += grid.n_tiles
        if k != tokens.shape[0]:
            raise ValueError(f"the grids account for {k} views, {tokens.shape[0]} were encoded")
        return out
