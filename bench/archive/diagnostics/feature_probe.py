"""Which EfficientNet-Lite0 layer says what is in each cell of a shapes scene? A linear probe per layer.

Each scene's image goes through the packaged, frozen EfficientNet-Lite0 at `--size` px; the feature
map of each probed layer (`vision_feature_layer` numbering: 0 the stem, k block k, -1 the head) is
cut into the scene's 3x3 cells (pixel shuffle, as the connector does), and one linear classifier per
layer is trained on the cells of `--train` scenes to name the cell's object (empty, or colour x
shape x size: 49 classes), then scored on the held-out scenes' cells. Features are standardised per
channel; 300 Adam steps of 4,096 cells.

    visprompt data shapes data/shapes --train 20000 --test 200 --seed 0
    python bench/archive/diagnostics/feature_probe.py --data data/shapes --size 96

Measured here (96 px, 4,000 training scenes, 200 held-out, one thread, 111 s): the head (1280
channels, stride 32) names only 37% of objects exactly (colour 49%, shape 63%) and 3% of whole scenes;
block 8 (80 channels, stride 16) names 100% of objects and of scenes. Shapes-specific by design
(reads scene records): diagnostics only, never part of the trainer.
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from visprompt.data.shapes import COLORS, SHAPES
from visprompt.images import ImagePreprocessor, load_image
from visprompt.models.efficientnet_lite import EfficientNetLiteEncoder

ap = argparse.ArgumentParser()
ap.add_argument("--data", default="data/shapes")
ap.add_argument("--size", type=int, default=96)
ap.add_argument("--train", type=int, default=4000)
ap.add_argument("--layers", default="5,8,11,16,-1")
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
layers = [int(x) for x in args.layers.split(",")]
colors = list(COLORS)

encoder = EfficientNetLiteEncoder.from_packaged().eval()
preprocess = ImagePreprocessor(args.size, encoder.image_mean, encoder.image_std)


def scenes(split: str, n: int) -> list[tuple[str, dict]]:
    seen: dict[str, dict] = {}
    for rec in json.loads(Path(args.data, f"{split}.json").read_text()):
        seen.setdefault(rec["image"], rec["scene"])
        if len(seen) >= n:
            break
    return list(seen.items())


def cell_labels(scene: dict) -> torch.Tensor:
    label = torch.zeros(9, dtype=torch.long)  # 0: empty cell
    for o in scene["objects"]:
        label[o["row"] * 3 + o["col"]] = (
            1 + colors.index(o["color"]) * 8 + SHAPES.index(o["shape"]) * 2 + (o["size"] == "large")
        )
    return label


@torch.no_grad()
def features(items: list[tuple[str, dict]]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    out: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    for start in range(0, len(items), 64):
        pixels = preprocess([load_image(f"{args.data}/{p}") for p, _ in items[start : start + 64]])
        for k in layers:
            fmap = encoder.feature_map(pixels, k)  # [B, C, h, w]
            b, c, h, _ = fmap.shape
            r = h // 3  # map cells per scene cell along each side
            out[k].append(
                fmap[:, :, : 3 * r, : 3 * r]
                .reshape(b, c, 3, r, 3, r)
                .permute(0, 2, 4, 1, 3, 5)
                .reshape(b, 9, c * r * r)
            )
    return {k: torch.cat(v) for k, v in out.items()}, torch.stack([cell_labels(s) for _, s in items])


t0 = time.time()
train_x, train_y = features(scenes("train", args.train))
test_x, test_y = features(scenes("test", 10**9))
print(f"features of {len(train_y)} + {len(test_y)} scenes in {time.time() - t0:.0f} s")
y, yt = train_y.reshape(-1), test_y.reshape(-1)
occupied = yt > 0


def acc(hits: torch.Tensor) -> float:
    """Share of the held-out occupied cells where `hits` is true."""
    return float(hits[occupied].float().mean())


for k in layers:
    x, xt = train_x[k].reshape(len(y), -1), test_x[k].reshape(len(yt), -1)
    mu, sd = x.mean(0), x.std(0) + 1e-5
    x, xt = (x - mu) / sd, (xt - mu) / sd
    probe = torch.nn.Linear(x.shape[1], 49)
    opt = torch.optim.Adam(probe.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(300):
        idx = torch.randint(0, len(x), (4096,))
        loss = F.cross_entropy(probe(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = probe(xt).argmax(-1)
    p, g = (pred - 1).clamp(min=0), (yt - 1).clamp(min=0)
    print(
        f"layer {k:>3} {tuple(train_x[k].shape[1:])}: objects named exactly {acc(pred == yt):.1%} "
        f"(colour {acc(p // 8 == g // 8):.1%}, shape {acc(p % 8 // 2 == g % 8 // 2):.1%}, size {acc(p % 2 == g % 2):.1%}), "
        f"whole scenes {float((pred.view(-1, 9) == yt.view(-1, 9)).all(1).float().mean()):.1%}"
    )
