"""Drawing an Explanation: attention heatmaps over the image, and the per-layer modality balance.

matplotlib (the `train` extra) draws off-screen (the Agg canvas); files are written atomically.
"""

from __future__ import annotations

import io
import os
import textwrap

import numpy as np

from ..errors import VispromptError
from ..files import atomic_write_bytes
from .attention import Explanation

_COLUMNS = 4  # heatmaps per row when several tokens are explained


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VispromptError(
            "drawing heatmaps needs matplotlib: pip install 'visprompt[train]' (or matplotlib)"
        ) from None
    return plt


def _save(fig, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def draw_heatmaps(explanation: Explanation, path: str | os.PathLike) -> None:
    """One panel per explained token: the image the model saw, its attention map upsampled over it
    (one block per image-token cell, 60% opaque), a colour bar of the attention mass per image cell, the token in the title.

    Args:
        explanation: what `explain` returned.
        path: the PNG to write.
    """
    plt = _pyplot()
    n = len(explanation.maps)
    cols = min(n, _COLUMNS)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 4.0 * rows + 0.8), squeeze=False, layout="constrained")
    image = np.asarray(explanation.image.convert("RGB"))
    h, w = image.shape[:2]
    for ax, token, grid_map, mass in zip(axes.flat, explanation.tokens, explanation.maps, explanation.image_mass):
        ax.imshow(image, extent=(0, w, h, 0))
        # each image token's cell as one block: the map is only as fine as the model's token grid
        shown = ax.imshow(grid_map, cmap="inferno", alpha=0.6, extent=(0, w, h, 0), interpolation="nearest")
        fig.colorbar(shown, ax=ax, shrink=0.85, label="attention mass")
        ax.set_title(f"{token!r}  (image {100 * mass:.0f}%)", fontsize=11)
        ax.set_axis_off()
    for ax in list(axes.flat)[n:]:
        ax.set_axis_off()
    how = "mean over heads and layers" if explanation.method == "mean" else "attention rollout"
    title = f"{explanation.prompt} -> {explanation.answer}"
    fig.suptitle("\n".join(textwrap.wrap(title, 70)) + f"\n({how})", fontsize=11)
    try:
        _save(fig, path)
    finally:
        plt.close(fig)


def draw_balance(explanation: Explanation, path: str | os.PathLike) -> None:
    """Per LM layer, the share of the explained tokens' attention on image vs text tokens (stacked bars).

    Args:
        explanation: what `explain` returned.
        path: the PNG to write.
    """
    plt = _pyplot()
    image = np.asarray(explanation.balance, dtype=float)
    layers = np.arange(len(image))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(image) + 2.5), 3.4), layout="constrained")
    ax.bar(layers, image, color="#d95f02", label="image tokens")
    ax.bar(layers, 1.0 - image, bottom=image, color="#7570b3", label="text tokens")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of attention")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=9)
    ax.set_title("\n".join(textwrap.wrap(f"Modality balance: {explanation.prompt} -> {explanation.answer}", 60)))
    try:
        _save(fig, path)
    finally:
        plt.close(fig)
