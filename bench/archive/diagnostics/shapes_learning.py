"""Where does shapes-tiny's learning stall? A diagnostic training loop.

Same model, tokenizer and dataset code as `visprompt train`, but a bare AdamW loop with a
teacher-forced per-answer exact match by question kind on the held-out split. By default the
encoder + connector are replaced by an "oracle": perfect per-cell one-hot features (colour, shape,
size, empty) read from the generator's scene records, so it measures how fast the LM side learns.

    visprompt data shapes /tmp/sh20k --train 20000 --test 200 --seed 0
    python bench/archive/diagnostics/shapes_learning.py --data /tmp/sh20k --set lm_hidden_size=128 lm_layers=2 --steps 3000 --every 250
    ... --ofmt real --oscale 15      # oracle features through Linear + the connector's output LayerNorm, 15x louder
    ... --ofmt mlp --oscale 15       # ... through an MLP like the connector's
    ... --real [--linconn] [--bnin] [--oscale 15] [--recon 500] [--align 1000 --alignfile F]
                                     # the real encoder + connector (linear / BatchNorm input / louder
                                     # output / label-free reconstruction warm-up / an align stage first)

Shapes-specific by design (it reads scene records): diagnostics only, never part of the trainer.
"""

# ruff: noqa: SIM115, RUF046  (a throwaway-style diagnostic: short file reads, int(round()))
import argparse
import collections
import json
import random
import time

import torch

from visprompt.data.llava import load_llava_records
from visprompt.images import ImagePreprocessor
from visprompt.models.vision_language_model import VisionLanguageModel
from visprompt.train.config import load_recipe
from visprompt.train.dataset import VLMDataset, collate

ap = argparse.ArgumentParser()
ap.add_argument("--set", nargs="*", default=[])
ap.add_argument("--steps", type=int, default=1000)
ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--data", default="data/shapes")
ap.add_argument("--ntrain", type=int, default=0)
ap.add_argument("--bs", type=int, default=32)
ap.add_argument("--every", type=int, default=100)
ap.add_argument("--align", type=int, default=0)
ap.add_argument("--wd", type=float, default=0.01)
ap.add_argument("--warm", type=int, default=50)
ap.add_argument("--kinds", default="")
ap.add_argument("--oscale", type=float, default=1.0)
ap.add_argument("--alignfile", default="")
ap.add_argument("--recon", type=int, default=0)
ap.add_argument("--ofmt", default="oracle")
ap.add_argument("--linconn", action="store_true")
ap.add_argument("--bnin", action="store_true")
ap.add_argument("--vfreeze", action="store_true")
ap.add_argument("--pscale", type=float, default=0.02)
ap.add_argument("--real", action="store_true")
ap.add_argument("--cache", action="store_true")
ap.add_argument("--turnloss", action="store_true")
ap.add_argument("--vlr", type=float, default=0.0)
a = ap.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)
random.seed(0)
rec = load_recipe("recipes/shapes-tiny.yaml", a.set)
trj = json.load(open(f"{a.data}/train.json"))
tej = json.load(open(f"{a.data}/test.json"))
if a.ntrain:
    trj = trj[: a.ntrain]
texts = ["system", "user", "assistant"] + [t["value"].replace("<image>", "") for r in trj for t in r["conversations"]]
m = VisionLanguageModel.build(rec.model, texts=texts)
cfg = m.cfg
if a.linconn:
    net = m.connector.net
    m.connector.net = torch.nn.Sequential(net[0], torch.nn.Linear(net[1].in_features, net[4].out_features))
if a.bnin:

    class BNTok(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(c)

        def forward(self, x):
            return self.bn(x.reshape(-1, x.shape[-1])).view_as(x)

    m.connector.net[0] = BNTok(m.connector.net[0].normalized_shape[0])
with torch.no_grad():
    emb = m.lm.get_input_embeddings().weight
    print(
        "text emb rms",
        emb.pow(2).mean().sqrt().item(),
        "out_norm w",
        m.connector.out_norm.weight.mean().item(),
        flush=True,
    )
    m.connector.out_norm.weight.mul_(a.oscale)
    m.connector.position.mul_(a.oscale)
COLS = ["red", "green", "blue", "yellow", "purple", "orange"]
SH = ["circle", "square", "triangle", "diamond"]


def feat(r):
    f = torch.zeros(9, 13)
    for o in r["scene"]["objects"]:
        c = o["row"] * 3 + o["col"]
        f[c, COLS.index(o["color"])] = 1
        f[c, 6 + SH.index(o["shape"])] = 1
        f[c, 10 + (o["size"] == "large")] = 1
    for c in range(9):
        f[c, 12] = f[c, :12].sum() == 0
    return f


pp = ImagePreprocessor(cfg.image_size, cfg.image_mean, cfg.image_std, cfg.image_resize_mode)


def items(js, path):
    recs = load_llava_records(path)
    byid = {r["id"]: r for r in js}
    recs = [r for r in recs if r.id in byid]
    ds = VLMDataset(recs, m, 256, pp)
    out = []
    for i, (r, ex) in enumerate(zip(recs, ds.examples)):
        it = {
            "input_ids": ex.input_ids,
            "labels": ex.labels,
            "pixel_values": None,
            "oracle": feat(byid[r.id])[None],
            "kinds": byid[r.id].get("kinds", []),
            "path": ex.images[0],
        }
        if a.real:
            if it["path"] not in pix_cache:
                pix_cache[it["path"]] = ds[i]["pixel_values"]  # one tensor per image file
            it["pixel_values"] = pix_cache[it["path"]]
        if a.cache:
            if it["path"] not in feat_cache:
                with torch.no_grad():
                    feat_cache[it["path"]] = m.vision(it["pixel_values"])  # frozen encoder: features once per image
            it["pixel_values"] = feat_cache[it["path"]]
        out.append(it)
    return out


if a.cache:
    m.vision.eval()
    m.encode_images = lambda f: m.connector(f)
t_c = time.time()
feat_cache = {}
pix_cache = {}
tr = items(trj, f"{a.data}/train.json")
te = items(tej, f"{a.data}/test.json")
af = a.alignfile or f"{a.data}/align.json"
al = items(json.load(open(af)), af) if a.align else []
print("train records", len(tr), "test", len(te), f"prep {time.time() - t_c:.0f}s", flush=True)
D = cfg.lm_config["hidden_size"]
proj = torch.nn.Linear(13, D)
pos = torch.nn.Parameter(torch.randn(9, D) * a.pscale)
lnorm = torch.nn.LayerNorm(D)
with torch.no_grad():
    lnorm.weight.fill_(0.02 * a.oscale)
if not a.real:
    if a.ofmt == "oracle":
        m.encode_images = lambda px: proj(px) + pos
    elif a.ofmt == "mlp":
        mlp = torch.nn.Sequential(
            torch.nn.LayerNorm(13), torch.nn.Linear(13, D), torch.nn.GELU(), torch.nn.Linear(D, D)
        )
        proj = torch.nn.ModuleList([proj, mlp])
        m.encode_images = lambda px: lnorm(mlp(px)) + pos
    else:
        m.encode_images = lambda px: lnorm(proj(px)) + pos


def coll(b):
    out = collate(b, 0)
    if not a.real:
        out["pixel_values"] = torch.cat([i["oracle"] for i in b])
    return out


params = [p for n_, p in m.named_parameters() if not ((a.vfreeze or a.cache) and n_.startswith("vision."))] + (
    [] if a.real else list(proj.parameters()) + list(lnorm.parameters()) + [pos]
)
if a.vlr:  # separate learning rate for the vision encoder + connector
    img = {id(p) for n_, p in m.named_parameters() if n_.startswith(("vision.", "connector."))}
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if id(p) in img], "lr": a.vlr},
            {"params": [p for p in params if id(p) not in img]},
        ],
        lr=a.lr,
        weight_decay=a.wd,
    )
else:
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.wd)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a.warm))


def evaluate():
    m.eval()
    hit = collections.Counter()
    tot = collections.Counter()
    with torch.no_grad():
        for i in range(0, len(te), 64):
            b = coll(te[i : i + 64])
            out = m(b["input_ids"], b["attention_mask"], b["pixel_values"])
            pred = out.logits[:, :-1].argmax(-1)
            lab = b["labels"][:, 1:]
            for j in range(len(pred)):
                sel = (lab[j] != -100).tolist()
                spans = []
                k = 0
                while k < len(sel):
                    if sel[k]:
                        s = k
                        while k < len(sel) and sel[k]:
                            k += 1
                        spans.append((s, k))
                    else:
                        k += 1
                kinds = te[i + j]["kinds"]
                for si, (s, e) in enumerate(spans):
                    kind = kinds[si] if si < len(kinds) else "?"
                    ok = bool(
                        (pred[j, s : e - 1] == lab[j, s : e - 1]).all()
                    )  # answer tokens (the last labelled one is end-of-turn)
                    hit[kind] += ok
                    tot[kind] += 1
    m.train()
    allh = sum(hit.values())
    allt = sum(tot.values())
    return allh / allt, {k: round(hit[k] / tot[k], 2) for k in sorted(tot)}


if a.recon:
    # generic vision warm-up: each patch token reconstructs its own region at low resolution
    X = torch.cat([it["pixel_values"] for it in tr[:8000]])  # [N, 3, H, W]
    side = int(round(m.cfg.vision_num_patches**0.5))
    res = 8
    tgt_all = torch.nn.functional.adaptive_avg_pool2d(X, side * res)  # [N, 3, side*res, side*res]
    tgt_all = (
        tgt_all.view(len(X), 3, side, res, side, res)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(len(X), side * side, 3 * res * res)
    )
    v0 = m.vision(X[:2])
    head = torch.nn.Linear(v0.shape[-1], 3 * res * res)
    ropt = torch.optim.AdamW(list(m.vision.parameters()) + list(head.parameters()), lr=2e-3, weight_decay=0.01)
    t1 = time.time()
    for s_ in range(1, a.recon + 1):
        idx = torch.randint(0, len(X), (32,))
        loss = torch.nn.functional.mse_loss(head(m.vision(X[idx])), tgt_all[idx])
        ropt.zero_grad()
        loss.backward()
        ropt.step()
        if s_ % 100 == 0:
            print("recon", s_, round(loss.item(), 4), f"{time.time() - t1:.0f}s", flush=True)


def turn_loss(logits, labels):
    # every answer turn weighs the same, however many tokens it has
    lab = labels[:, 1:]
    lg = logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(
        lg.reshape(-1, lg.shape[-1]), lab.reshape(-1), ignore_index=-100, reduction="none"
    ).view_as(lab)
    mask = lab != -100
    start = mask & ~torch.nn.functional.pad(mask, (1, 0))[:, :-1]
    turn_id = torch.cumsum(start.long(), 1) * mask  # 1.. per row
    w = torch.zeros_like(ce)
    for r in range(lab.shape[0]):
        ids = turn_id[r]
        n = torch.bincount(ids)
        w[r] = torch.where(mask[r], 1.0 / n[ids].clamp(min=1), torch.zeros(()))
    return (ce * w).sum() / start.sum()


m.train()
t0 = time.time()
for step in range(1, a.steps + 1):
    pool = al if step <= a.align else tr
    b = coll(random.sample(pool, a.bs))
    out = m(b["input_ids"], b["attention_mask"], b["pixel_values"], labels=b["labels"], full_logits=a.turnloss)
    if a.turnloss:
        out.loss = turn_loss(out.logits, b["labels"])
    opt.zero_grad()
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    if step % a.every == 0 or step == a.steps:
        acc, by = evaluate()
        print(f"step {step} loss {out.loss.item():.3f} | EM {acc:.1%} {by} | {time.time() - t0:.0f}s", flush=True)
