"""Drawing an Explanation: attention heatmaps over the image, and the per-layer modality balance.

matplotlib (the `train` extra) draws off-screen (the Agg canvas); files are written atomically.
"""

from __future__ import annotations

import base64
import io
import os
import textwrap
import unicodedata

import numpy as np

from ..errors import VispromptError
from ..files import atomic_write_bytes
from .attention import Explanation, explain

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


def _png(plt, fig) -> bytes:
    """The figure as PNG bytes (the figure is closed)."""
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _text(value: str) -> str:
    """Model text made safe for a title: control characters shown as "?", `$` not read as math."""
    shown = "".join("?" if unicodedata.category(c) == "Cc" and c != "\n" else c for c in value)
    return shown.replace("$", r"\$")


def draw_heatmaps(explanation: Explanation, path: str | os.PathLike) -> None:
    """One panel per explained token: the image the model saw, its attention map upsampled over it
    (one block per image-token cell, 60% opaque), a colour bar of the attention mass per image cell, the token in the title.

    Args:
        explanation: what `explain` returned.
        path: the PNG to write.
    """
    atomic_write_bytes(path, heatmaps_png(explanation))


def draw_balance(explanation: Explanation, path: str | os.PathLike) -> None:
    """Per LM layer, the share of the explained tokens' attention on image vs text tokens (stacked bars).

    Args:
        explanation: what `explain` returned.
        path: the PNG to write.
    """
    atomic_write_bytes(path, balance_png(explanation))


def heatmaps_png(explanation: Explanation) -> bytes:
    """`draw_heatmaps`' figure as PNG bytes."""
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
        ax.set_title(_text(f"{token!r}  (image {100 * mass:.0f}%)"), fontsize=11)
        ax.set_axis_off()
    for ax in list(axes.flat)[n:]:
        ax.set_axis_off()
    how = "mean over heads and layers" if explanation.method == "mean" else "attention rollout"
    title = _text(f"{explanation.prompt} -> {explanation.answer}")
    fig.suptitle("\n".join(textwrap.wrap(title, 70)) + f"\n({how})", fontsize=11)
    return _png(plt, fig)


def balance_png(explanation: Explanation) -> bytes:
    """`draw_balance`' figure as PNG bytes."""
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
    title = _text(f"Modality balance: {explanation.prompt} -> {explanation.answer}")
    ax.set_title("\n".join(textwrap.wrap(title, 60)))
    return _png(plt, fig)


def explanation_json(
    backend, image, prompt: str, token: str | None = None, method: str = "mean", max_new_tokens: int = 32
) -> dict:
    """`explain` drawn for a web page: {"answer", "tokens", "image_mass", "balance", "method",
    "heatmap" and "balance_plot" (PNG data: URLs)}. Arguments as `explain`'s."""
    found = explain(backend, image, prompt, token=token, method=method, max_new_tokens=max_new_tokens)

    def url(png: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(png).decode("ascii")

    return {
        "answer": found.answer,
        "tokens": list(found.tokens),
        "image_mass": [float(m) for m in found.image_mass],
        "balance": [float(b) for b in found.balance],
        "method": found.method,
        "heatmap": url(heatmaps_png(found)),
        "balance_plot": url(balance_png(found)),
    }
