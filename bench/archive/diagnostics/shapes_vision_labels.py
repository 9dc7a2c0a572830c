"""Can shapes-tiny's scratch encoder (+ connector) learn per-cell colour and shape from labels alone?

The other half of `shapes_learning.py` (docs/training.md): the recipe's encoder and
connector, a linear head on each of the 9 image tokens, per-cell colour (6 + empty) and shape
(4 + empty) labels read from the generator's scene records, 400 AdamW steps of 32 images, one thread.
Held-out accuracy is over occupied cells.

    visprompt data shapes /tmp/sh20k --train 20000 --test 200 --seed 0
    python bench/archive/diagnostics/shapes_vision_labels.py --data /tmp/sh20k            # encoder + connector train
    python bench/archive/diagnostics/shapes_vision_labels.py --data /tmp/sh20k --freeze   # random encoder frozen

Shapes-specific by design (it reads scene records): diagnostics only, never part of the trainer.
"""

# ruff: noqa: SIM115
import argparse
import json
import random
import time

import torch
from PIL import Image

from visprompt.data.shapes import COLORS, SHAPES
from visprompt.images import ImagePreprocessor
from visprompt.models.vision_language_model import VisionLanguageModel
from visprompt.train.config import load_recipe

ap = argparse.ArgumentParser()
ap.add_argument("--data", required=True)
ap.add_argument("--freeze", action="store_true", help="train only the connector and the head")
ap.add_argument("--set", nargs="*", default=["lm_hidden_size=128", "lm_layers=2"])
a = ap.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)
random.seed(0)
m = VisionLanguageModel.build(load_recipe("recipes/shapes-tiny.yaml", a.set).model, texts=["a b c"])
cfg = m.cfg
pp = ImagePreprocessor(cfg.image_size, cfg.image_mean, cfg.image_std, cfg.image_resize_mode)
COLS, SH = list(COLORS), list(SHAPES)


def load(split, n):
    d = json.load(open(f"{a.data}/{split}.json"))[:n]
    px = pp([Image.open(f"{a.data}/{r['image']}").convert("RGB") for r in d])  # [n, 3, H, W]
    col = torch.full((len(d), 9), len(COLS))
    sh = torch.full((len(d), 9), len(SH))  # "empty" by default
    for i, r in enumerate(d):
        for o in r["scene"]["objects"]:
            c = o["row"] * 3 + o["col"]
            col[i, c] = COLS.index(o["color"])
            sh[i, c] = SH.index(o["shape"])
    return px, col, sh


Xtr, ctr, str_ = load("train", 4000)
Xte, cte, ste = load("test", 200)
nc, ns = len(COLS) + 1, len(SH) + 1
head = torch.nn.Linear(cfg.lm_config["hidden_size"], nc + ns)
params = ([] if a.freeze else list(m.vision.parameters())) + list(m.connector.parameters()) + list(head.parameters())
opt = torch.optim.AdamW(params, 2e-3, weight_decay=0.01)


def run(x):  # [B, 3, H, W] -> [B, 9, nc + ns]; image tokens rescaled to unit RMS for the head
    return head(m.encode_images(x) / m.connector.out_norm.weight.abs().mean())


t0 = time.time()
for step in range(1, 401):
    idx = torch.randint(0, len(Xtr), (32,))
    out = run(Xtr[idx])
    loss = torch.nn.functional.cross_entropy(
        out[..., :nc].reshape(-1, nc), ctr[idx].reshape(-1)
    ) + torch.nn.functional.cross_entropy(out[..., nc:].reshape(-1, ns), str_[idx].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 0:
        m.eval()
        with torch.no_grad():
            o = run(Xte)
            occupied = cte < len(COLS)
            colour = (o[..., :nc].argmax(-1) == cte)[occupied].float().mean().item()
            shape = (o[..., nc:].argmax(-1) == ste)[occupied].float().mean().item()
        m.train()
        print(
            step, f"loss {loss.item():.3f} colour {colour:.2f} shape {shape:.2f} | {time.time() - t0:.0f}s", flush=True
        )
