"""Compare the three fusion strategies on a two-image shapes task, with one recipe and one budget.

    flock /tmp/visprompt-cpu.lock python bench/fusion.py --out runs/bench-fusion --docs docs/fusion.md

Every record shows two shapes scenes and asks questions that need both images:
  which   "Which image has a red circle?"            -> first | second | both | neither
  count   "How many squares are there in both images?" -> 0..6
  more    "Which image has more shapes?"             -> first | second | same
Each strategy trains (same seed, data, steps, learning rates; frozen pretrained EfficientNet-Lite0, a
connector and an LM from random weights) through visprompt's Trainer
in its own process; a second process loads the saved model and measures held-out exact match,
generation tokens/s (greedy, KV cache, the model's own forward for all three: `fast=False`) and
its peak RSS. The Markdown table goes to --docs between the BENCH markers.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from visprompt.data.shapes import COLORS, SHAPES, Scene, render_scene, sample_scene

QUESTIONS = {
    "which": ["Which image has {a}?", "Which image shows {a}?", "In which image is there {a}?"],
    "count": [
        "How many {shape}s are there in both images?",
        "How many {shape}s do the two images show in total?",
        "Count the {shape}s in both images.",
    ],
    "more": ["Which image has more shapes?", "Which image shows more objects?"],
}
KINDS = tuple(QUESTIONS)
MARK_BEGIN, MARK_END = "<!-- BENCH:BEGIN -->", "<!-- BENCH:END -->"

# --- the two-image task ------------------------------------------------------------------------


def _with_object(scene: Scene, color: str, shape: str, rng: random.Random) -> Scene:
    """The scene with one random object recoloured/reshaped to (color, shape); cell and size kept."""
    objs = list(scene.objects)
    i = rng.randrange(len(objs))
    objs[i] = type(objs[i])(shape, color, objs[i].size, objs[i].row, objs[i].col)
    return Scene(tuple(objs))


def ask_which(a: Scene, b: Scene, rng: random.Random) -> tuple[Scene, Scene, str, str]:
    """Answer drawn first (uniform over first/second/both/neither), scenes nudged to make it true."""
    want = rng.choice(("first", "second", "both", "neither"))
    if want == "both":
        o = rng.choice(a.objects)
        b = _with_object(b, o.color, o.shape, rng)
    in_a = {(o.color, o.shape) for o in a.objects}
    in_b = {(o.color, o.shape) for o in b.objects}
    pool = {"first": in_a - in_b, "second": in_b - in_a, "both": in_a & in_b}.get(want)
    if want == "neither" or not pool:
        want = "neither" if not pool else want
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in in_a | in_b]
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in in_a | in_b)]  # hard negatives
        color, shape = rng.choice(near or absent)
    else:
        color, shape = rng.choice(sorted(pool))
    article = "an" if color[0] in "aeiou" else "a"
    return a, b, rng.choice(QUESTIONS["which"]).format(a=f"{article} {color} {shape}"), want


def ask_count(a: Scene, b: Scene, rng: random.Random) -> tuple[str, str]:
    present = [o.shape for o in a.objects + b.objects]
    shape = rng.choice(present) if rng.random() < 0.7 else rng.choice(SHAPES)
    return rng.choice(QUESTIONS["count"]).format(shape=shape), str(present.count(shape))


def ask_more(a: Scene, b: Scene, rng: random.Random) -> tuple[str, str]:
    na, nb = len(a.objects), len(b.objects)
    return rng.choice(QUESTIONS["more"]), "first" if na > nb else "second" if nb > na else "same"


def generate_pairs(
    out: Path, n_train: int, n_test: int, seed: int = 0, image_size: int = 96, max_objects: int = 3
) -> dict:
    """Write images/{split}/NNNNN_{a,b}.png and {split}.json (LLaVA, two images per record)."""
    summary = {}
    train_sigs: set = set()
    for split, n in (("train", n_train), ("test", n_test)):
        rng = random.Random(f"fusion-bench:{seed}:{split}")
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        records, sigs = [], set()
        for i in range(n):
            while True:
                a, b = sample_scene(rng, max_objects), sample_scene(rng, max_objects)
                a, b, which_q, which_a = ask_which(a, b, rng)
                sig = (a.signature(), b.signature())
                if split == "train" or (sig not in train_sigs and sig not in sigs):
                    break
            sigs.add(sig)
            qas = [("which", which_q, which_a), ("count", *ask_count(a, b, rng)), ("more", *ask_more(a, b, rng))]
            rng.shuffle(qas)
            paths = []
            for tag, scene in (("a", a), ("b", b)):
                img, _ = render_scene(scene, rng, image_size)
                rel = f"images/{split}/{i:05d}_{tag}.png"
                img.save(out / rel)
                paths.append(rel)
            # One question per record, the two images after it (the shapes generator's default layout:
            # image tokens that come after the question can attend to it).
            for j, (kind, q, ans) in enumerate(qas):
                conv = [{"from": "human", "value": q + "\n<image>\n<image>"}, {"from": "gpt", "value": ans}]
                records.append({"id": f"{split}-{i:05d}-{j}", "image": paths, "conversations": conv, "kinds": [kind]})
        if split == "train":
            train_sigs = sigs
        (out / f"{split}.json").write_text(json.dumps(records))
        answers = Counter(t["value"] for r in records for t in r["conversations"] if t["from"] == "gpt")
        summary[split] = {"image_pairs": n, "questions": len(records), "answers": dict(answers.most_common())}
    return summary


# --- the recipe --------------------------------------------------------------------------------

MODEL = {
    # The packaged ImageNet EfficientNet-Lite0, frozen (the trainer runs it once per image), read at
    # block 8 as recipes/shapes-tiny.yaml does: 96 px -> 6x6 map -> pixel shuffle 2 -> a token per
    # scene cell. Image tokens 15x louder than the fresh LM's embeddings.
    "vision_source": "efficientnet-lite0",
    "image_size": 96,
    "vision_feature_layer": 8,
    "connector_pixel_shuffle": 2,
    "connector_output_gain": 15.0,
    "lm_source": "scratch",
    "lm_hidden_size": 128,
    "lm_layers": 3,
    "lm_heads": 4,
    "lm_kv_heads": 4,
    "lm_max_position": 256,
    "tokenizer_vocab_size": 384,
}
STRATEGIES = {
    "prefix": {"fusion": "prefix"},
    "cross_attention": {"fusion": "cross_attention", "xattn_every": 1},  # a block before each of the 3 layers
    "mixture": {"fusion": "mixture"},
}
# Not in the default run (it would take the bench past 15 minutes): --only "cross_attention, gates 0.5"
EXTRA = {"cross_attention, gates 0.5": {"fusion": "cross_attention", "xattn_every": 1, "xattn_gate_init": 0.5}}
TRAIN = {
    "batch_size": 64,
    "vision_lr": 0.0,
    "connector_lr": 1e-3,
    "lm_lr": 1e-3,
    "weight_decay": 0.01,
    "warmup_ratio": 0.05,
    "grad_clip": 1.0,
    "max_length": 256,
    "log_every": 20,
    "seed": 0,
}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_train(data: Path, out: Path, strategy: str, steps: int, threads: int) -> dict:
    from visprompt.models.config import VLMConfig
    from visprompt.train.config import Recipe, TrainConfig
    from visprompt.train.trainer import Trainer

    train = TrainConfig(
        train_data=str(data / "train.json"), output_dir=str(out), max_steps=steps, num_threads=threads, **TRAIN
    )
    summary = Trainer(Recipe(model=VLMConfig(**MODEL, **{**STRATEGIES, **EXTRA}[strategy]), train=train)).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "trainable_parameters": summary["trainable_parameters"],
        "parameters": summary["parameters"],
        "train_samples_per_s": rows[-1]["samples_per_s"],
        "train_time_s": summary["train_time_s"],
        "final_loss": rows[-1]["loss"],
        "train_peak_rss_mib": round(_peak_rss_mib()),
    }


def run_eval(data: Path, out: Path, threads: int, batch_size: int = 32, gen_tokens: int = 32) -> dict:
    import torch

    from visprompt.data.llava import load_llava_records
    from visprompt.engine.backend import SamplingParams
    from visprompt.engine.backends.own import OwnVLMBackend
    from visprompt.eval.metrics import exact_match
    from visprompt.eval.vqa import record_turn_conversations
    from visprompt.models.vision_language_model import VisionLanguageModel

    torch.set_num_threads(threads)
    model = VisionLanguageModel.from_pretrained(out)
    backend = OwnVLMBackend(model, fast=False)
    items = []
    for rec in load_llava_records(data / "test.json"):
        for (conv, gold), kind in zip(record_turn_conversations(rec), rec.extra["kinds"]):
            items.append((conv, gold, kind))
    hits: dict[str, list[bool]] = {k: [] for k in KINDS}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        results = backend.generate([c for c, _, _ in chunk], SamplingParams(max_new_tokens=8))
        for (_, gold, kind), r in zip(chunk, results):
            hits[kind].append(exact_match(r.text, gold))
    flat = [h for v in hits.values() for h in v]
    # Throughput: one batch of prompts (first turns: both images), exactly gen_tokens new tokens each
    # (no stop tokens); the image features come from the cache after the first round; best of 3.
    first_turns = [c for c, _, _ in items if len(c) == 1][:batch_size]
    timed = OwnVLMBackend(model, fast=False, max_batch=batch_size)
    timed.stop_ids = []
    timed.generate(first_turns, SamplingParams(max_new_tokens=1))
    best = float("inf")
    for _ in range(3):
        timed.prefix_cache.clear()
        t0 = time.perf_counter()
        res = timed.generate(first_turns, SamplingParams(max_new_tokens=gen_tokens))
        best = min(best, time.perf_counter() - t0)
    return {
        "exact_match": sum(flat) / len(flat),
        **{f"em_{k}": sum(v) / max(1, len(v)) for k, v in hits.items()},
        "questions": len(flat),
        "gen_tokens_per_s": sum(len(r.token_ids) for r in res) / best,
        "gen_peak_rss_mib": round(_peak_rss_mib()),
    }


# --- driver ------------------------------------------------------------------------------------


def _child(args: list[str]) -> dict:
    res = subprocess.run(
        [sys.executable, __file__, *args], check=True, stdout=subprocess.PIPE, text=True
    )  # stderr: progress
    return json.loads(res.stdout.strip().splitlines()[-1])


def majority_baseline(data: Path) -> dict:
    """Exact match of always giving the most common training answer of each question kind (no image)."""

    def answers(split):
        out: dict[str, list[str]] = {k: [] for k in KINDS}
        for r in json.loads((data / f"{split}.json").read_text()):
            gpt = [t["value"] for t in r["conversations"] if t["from"] == "gpt"]
            for kind, a in zip(r["kinds"], gpt):
                out[kind].append(a)
        return out

    train, test = answers("train"), answers("test")
    em = {k: sum(a == Counter(train[k]).most_common(1)[0][0] for a in test[k]) / len(test[k]) for k in KINDS}
    return {
        "exact_match": sum(em[k] * len(test[k]) for k in KINDS) / sum(len(v) for v in test.values()),
        **{f"em_{k}": v for k, v in em.items()},
    }


def table(results: dict[str, dict]) -> str:
    head = "| fusion | held-out exact match | which / count / more | trainable params | train samples/s | generation tokens/s | peak RSS train / generate |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "trainable_parameters" not in r:  # the no-image baseline
            lines.append(
                f"| {name} | {r['exact_match']:.1%} | {r['em_which']:.0%} / {r['em_count']:.0%} / {r['em_more']:.0%} | - | - | - | - |"
            )
            continue
        lines.append(
            f"| {name} | {r['exact_match']:.1%} | {r['em_which']:.0%} / {r['em_count']:.0%} / {r['em_more']:.0%} | "
            f"{r['trainable_parameters'] / 1e6:.2f}M | {r['train_samples_per_s']:.1f} | {r['gen_tokens_per_s']:.0f} | "
            f"{r['train_peak_rss_mib']} / {r['gen_peak_rss_mib']} MiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench-fusion")
    p.add_argument("--docs", default="", help="Markdown file whose BENCH block gets the table")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="1: on a shared 2-core box, 2 threads collapse when the other core is busy",
    )
    p.add_argument("--only", nargs="*", default=list(STRATEGIES), choices=[*STRATEGIES, *EXTRA])
    args = p.parse_args(argv)
    out = Path(args.out)
    data = out / "data"
    t0 = time.time()
    spec = {"layout": "one question per record, images after it", "n_train": args.n_train, "n_test": args.n_test}
    marker = data / "spec.json"
    if not marker.is_file() or json.loads(marker.read_text()) != spec:  # regenerate when the task changed
        shutil.rmtree(data, ignore_errors=True)
        print(json.dumps(generate_pairs(data, args.n_train, args.n_test)), file=sys.stderr)
        marker.write_text(json.dumps(spec))
    results = {}
    for name in args.only:
        run_dir = out / re.sub(r"[^\w.]+", "-", name)
        shutil.rmtree(run_dir, ignore_errors=True)  # the trainer appends to an old metrics.jsonl
        print(f"[{time.time() - t0:.0f}s] training {name} ...", file=sys.stderr, flush=True)
        r = _child(["_train", str(data), str(run_dir), name, str(args.steps), str(args.threads)])
        r.update(_child(["_eval", str(data), str(run_dir), str(args.threads)]))
        results[name] = r
        print(f"[{time.time() - t0:.0f}s] {name}: {json.dumps(r)}", file=sys.stderr, flush=True)
    results["majority answer, no image"] = majority_baseline(data)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = table(results)
    print(md)
    if args.docs:
        doc = Path(args.docs)
        text = doc.read_text() if doc.is_file() else f"{MARK_BEGIN}\n{MARK_END}\n"
        before, rest = text.split(MARK_BEGIN, 1)
        after = rest.split(MARK_END, 1)[1]
        cmd = "flock /tmp/visprompt-cpu.lock python bench/fusion.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        block = f"{MARK_BEGIN}\n{md}\n\n{args.n_train} training image pairs x 3 questions (one record each), {args.steps} steps of batch {TRAIN['batch_size']}; {args.n_test * 3} held-out questions; {args.threads} CPU threads; {time.time() - t0:.0f} s in all. Reproduce with `{cmd}`.\n{MARK_END}"
        doc.write_text(before + block + after)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_train":
        d, o, s, n, th = sys.argv[2:7]
        print(json.dumps(run_train(Path(d), Path(o), s, int(n), int(th))))
    elif len(sys.argv) > 1 and sys.argv[1] == "_eval":
        d, o, th = sys.argv[2:5]
        print(json.dumps(run_eval(Path(d), Path(o), int(th))))
    else:
        main()
