"""Training throughput against the model a user would pick instead: visprompt's trainer step beside
transformers' `LlavaForConditionalGeneration` trained by a plain PyTorch loop, on the same model,
the same weights and the same batches.

    flock /tmp/visprompt-cpu.lock python bench/train.py                            # markdown on stdout
    flock /tmp/visprompt-cpu.lock python bench/train.py --docs docs/training.md    # and into the doc

The default is quick: 2 warm-up steps, then 10 timed steps per side (about 3 minutes on 2 cores,
once the first run has built the model); `--steps 50` for a steadier median.

The model: a SigLIP-base-shaped vision tower (12 x 768, patch 16, random weights) at 128 px, so an
image is 64 patch tokens; LLaVA-1.5's connector (Linear-GELU-Linear, random); SmolLM2-135M-Instruct
with its REAL weights (the packaged GGUF) as the LM. visprompt builds it (`VLMConfig`,
`lm_source="smollm2-135m"`), saves it, and both sides start from that save: the LLaVA model gets the
same tower, connector and LM weights. Features come from the tower's second-to-last layer on both
sides (LLaVA's default; it also keeps SigLIP's post-layernorm out of the comparison).

Training: the tower frozen, connector and LM trained (LLaVA's fine-tuning stage); AdamW with the
trainer's betas, decay rules and per-part LRs, a constant LR, gradient clipping at 1.0, batch 8, loss
on the answer tokens only. Data: the package's shapes generator, one question per image, so no
image repeats (the trainer's stored frozen-encoder features would not help here) and both sides see
the same pre-collated batches. The visprompt side runs the trainer's own step (`Trainer._accumulate`,
`freeze_parts`, `build_optimizer`, `train_mode`, `precision`); the LLaVA side a loop a user would
write. Each side runs in its own process, so its peak RSS is its own; the two processes take turns
step by step (the one waiting is idle), so a change in the machine's load falls on both alike.

Reported per side: samples/s (median time of the --steps timed steps, after --warmup untimed
ones; batch loading is left out on both sides), peak RSS, the loss of the first and the last step;
then where one step's time goes (torch.profiler, top ops by self CPU time). The headline is the
ratio of the two sides' samples/s, both measured in the same run. Run it on a quiet machine: the
figures are wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
CACHE = Path(tempfile.gettempdir()) / "visprompt-bench-train"

SIGLIP_BASE = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "patch_size": 16,
}
FEATURE_LAYER = -2  # LLaVA's default
LRS = {"vision": 0.0, "connector": 1e-3, "lm": 2e-5}
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0


# -- preparation (parent process) --------------------------------------------------------------
def prepare(image_size: int, n_records: int, seed: int) -> tuple[Path, Path]:
    """(model folder, train JSON): the initial model both sides load, and the shapes data."""
    import torch

    from visprompt.data.shapes import generate_shapes_dataset
    from visprompt.models.config import VLMConfig
    from visprompt.models.vision_language_model import VisionLanguageModel

    data = CACHE / f"shapes-{image_size}-{n_records}-{seed}"
    if not (data / "train.json").is_file():
        generate_shapes_dataset(data, n_train=n_records, n_test=0, seed=seed, image_size=image_size)
    model_dir = CACHE / f"model-{image_size}-{seed}"
    if not (model_dir / "config.json").is_file():
        from transformers import SiglipVisionConfig, SiglipVisionModel

        torch.manual_seed(seed)
        tower_dir = CACHE / f"siglip-base-{image_size}-{seed}"
        SiglipVisionModel(SiglipVisionConfig(**SIGLIP_BASE, image_size=image_size)).save_pretrained(tower_dir)
        cfg = VLMConfig(
            vision_source=str(tower_dir),
            vision_feature_layer=FEATURE_LAYER,
            connector_type="llava",
            lm_source="smollm2-135m",
        )
        torch.manual_seed(seed)
        VisionLanguageModel.build(cfg).save_pretrained(model_dir)
    return model_dir, data / "train.json"


# -- one side (child process) ------------------------------------------------------------------
def batches(model, train_json: Path, batch: int, n: int) -> list[dict]:
    """The first n batches of the data, collated by the trainer's own dataset code."""
    from visprompt.data.llava import load_llava_records
    from visprompt.images import ImagePreprocessor
    from visprompt.train.dataset import VLMDataset, collate

    cfg = model.cfg
    pre = ImagePreprocessor(cfg.image_size, cfg.image_mean, cfg.image_std, cfg.image_resize_mode)
    ds = VLMDataset(load_llava_records(str(train_json)), model, max_length=512, preprocess=pre)
    pad = model.tokenizer.pad_token_id
    return [collate([ds[i * batch + j] for j in range(batch)], pad) for i in range(n)]


def llava_from(model):
    """transformers' LLaVA with the visprompt model's architecture and weights."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vc = dict(model.cfg.vision_config)
    vc.pop("model_type")
    cfg = LlavaConfig(
        vision_config={"model_type": "siglip_vision_model", **vc},
        text_config=model.lm.config.to_dict(),
        image_token_id=model.cfg.image_token_id,
        vision_feature_layer=FEATURE_LAYER,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        tie_word_embeddings=model.lm.config.tie_word_embeddings,
    )
    llava = LlavaForConditionalGeneration(cfg)
    renames = [
        ("vision.model.", "model.vision_tower."),
        ("connector.net.1.", "model.multi_modal_projector.linear_1."),
        ("connector.net.4.", "model.multi_modal_projector.linear_2."),
        ("lm.model.", "model.language_model."),
        ("lm.lm_head.", "lm_head."),
    ]
    state = {}
    for name, t in model.state_dict().items():
        for old, new in renames:
            if name.startswith(old):
                state[new + name[len(old) :]] = t.clone()
                break
    missing, unexpected = llava.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    llava.tie_weights()
    assert torch.equal(llava.lm_head.weight, model.lm.lm_head.weight)
    return llava


def param_groups(parts: dict) -> list[dict]:
    """AdamW groups as the trainer makes them: per part its LR, no decay on 1-d weights."""
    groups = []
    for part, params in parts.items():
        params = [p for p in params if p.requires_grad]
        groups.append({"params": [p for p in params if p.ndim >= 2], "lr": LRS[part], "weight_decay": WEIGHT_DECAY})
        groups.append({"params": [p for p in params if p.ndim < 2], "lr": LRS[part], "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def visprompt_side(model, train_json: Path):
    """(step function, trainable parameters) of visprompt's trainer."""
    import torch

    from visprompt.train import precision
    from visprompt.train.config import Recipe, TrainConfig
    from visprompt.train.trainer import Trainer, build_optimizer, freeze_parts, train_mode

    tc = TrainConfig(
        train_data=str(train_json),
        vision_lr=LRS["vision"],
        connector_lr=LRS["connector"],
        lm_lr=LRS["lm"],
        weight_decay=WEIGHT_DECAY,
        grad_clip=GRAD_CLIP,
    )
    trainer = Trainer(Recipe(model=model.cfg, train=tc))
    freeze_parts(model, LRS)
    optimizer = build_optimizer(model, LRS, WEIGHT_DECAY)
    train_mode(model, LRS)
    autocast = precision.autocast(precision.choose(tc.dtype)[0])
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(batch: dict) -> float:
        loss = trainer._accumulate(model, [batch], autocast)
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def transformers_side(model):
    """The step of a plain PyTorch loop over transformers' LLaVA (same precision choice)."""
    import torch

    from visprompt.train import precision

    llava = llava_from(model)
    del model
    llava.model.vision_tower.requires_grad_(False)
    parts = {
        "connector": list(llava.model.multi_modal_projector.parameters()),
        "lm": list(llava.model.language_model.parameters()) + [llava.lm_head.weight],
    }
    parts["lm"] = list({id(p): p for p in parts["lm"]}.values())  # the tied head once
    optimizer = torch.optim.AdamW(param_groups(parts), betas=(0.9, 0.95))
    llava.train()
    autocast = precision.autocast(precision.choose("auto")[0])
    trainable = [p for p in llava.parameters() if p.requires_grad]

    def step(batch: dict) -> float:
        with autocast:
            out = llava(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                labels=batch["labels"],
            )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step


def run_side(args) -> None:
    """One side, driven by the parent: after loading it says `ready`, then runs one step per `step`
    line on stdin (answering `done`), one profiled step on `profile`, and on `finish` writes its
    result to --json. Its stdout carries only these answers (anything else printed goes to stderr)."""
    import resource

    import torch

    from visprompt.models.vision_language_model import VisionLanguageModel

    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints of the libraries: to stderr
    torch.manual_seed(args.seed)
    model = VisionLanguageModel.from_pretrained(args.model)
    data = batches(model, Path(args.data), args.batch, args.warmup + args.steps)
    tokens = [int(b["attention_mask"].sum()) for b in data]
    step = visprompt_side(model, Path(args.data)) if args.side == "visprompt" else transformers_side(model)
    times, losses, profile = [], [], []
    answers.write("ready\n")
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            t = time.perf_counter()
            losses.append(step(data[len(times)]))
            times.append(time.perf_counter() - t)
        elif command == "profile":
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                t = time.perf_counter()
                step(data[-1])
                wall = time.perf_counter() - t
            rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.profile]
            profile = [{"op": e.key, "ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in rows]
            profile.append({"op": "(step wall time)", "ms": wall * 1e3, "calls": 1})
        elif command == "finish":
            break
        answers.write("done\n")
    timed = times[args.warmup :]
    result = {
        "side": args.side,
        "step_s": statistics.median(timed),
        "samples_per_s": args.batch / statistics.median(timed),
        "step_times": times,
        "losses": losses,
        "tokens_per_batch": statistics.mean(tokens),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "profile": profile,
    }
    Path(args.json).write_text(json.dumps(result))


class Side:
    """A side's process, answering the parent's commands (`run_side`)."""

    def __init__(self, side: str, cmd: list):
        self.side = side
        self.proc = subprocess.Popen(
            [str(c) for c in cmd], env=ENV, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.expect("ready")

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        if command != "finish":
            self.expect("done")

    def expect(self, word: str) -> None:
        line = self.proc.stdout.readline().strip()
        if line != word:
            self.proc.kill()
            raise SystemExit(f"the {self.side} side stopped (expected {word!r}, got {line!r}): see its errors above")

    def finish(self) -> None:
        self.send("finish")
        if self.proc.wait() != 0:
            raise SystemExit(f"the {self.side} side failed")


# -- report ------------------------------------------------------------------------------------
def markdown(command: str, sides: dict, args) -> str:
    ours, theirs = sides["visprompt"], sides["transformers"]
    ratio = ours["samples_per_s"] / theirs["samples_per_s"]
    names = {"visprompt": "visprompt trainer step", "transformers": "transformers LLaVA, plain loop"}
    lines = [
        f"`{command}` (batch {args.batch}; median step time of {args.steps} steps after {args.warmup} "
        f"warm-up steps; {ours['threads']} threads; "
        f"{ours['tokens_per_batch']:.0f} tokens per batch, 64 of them image tokens per example):",
        "",
        "| | samples/s | s/step | peak RSS | loss, step 1 | loss, step " + str(args.warmup + args.steps) + " |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("visprompt", "transformers"):
        s = sides[key]
        lines.append(
            f"| {names[key]} | {s['samples_per_s']:.2f} | {s['step_s']:.2f} | {s['peak_rss_mb']:.0f} MB "
            f"| {s['losses'][0]:.4f} | {s['losses'][-1]:.4f} |"
        )
    lines += ["", f"visprompt / transformers: **{ratio:.2f}x** samples/s."]
    if ours["profile"] and theirs["profile"]:
        lines += ["", "Where one step goes (torch.profiler, self CPU time, ms):", ""]
        lines += ["| visprompt op | ms | transformers op | ms |", "|---|---|---|---|"]
        for a, b in zip(ours["profile"], theirs["profile"]):
            lines.append(f"| {a['op']} | {a['ms']:.0f} | {b['op']} | {b['ms']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="The defaults (2 warm-up + 10 timed steps per side, the sides taking turns) take about 3 minutes "
        "on 2 cores, once the first run has built and saved the model and the data (in the temporary folder).",
    )
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side, after the warm-up (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first, per side (default 2)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=128, help="px; patch 16, so 128 px is 64 image tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", type=int, default=8, help="top ops of one profiled step to show (0: none)")
    ap.add_argument("--docs", type=Path, help="write the tables between the bench:train markers of this file")
    ap.add_argument("--side", choices=("visprompt", "transformers"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        run_side(args)
        return
    started = time.perf_counter()
    shown, skip = [], False
    for arg in sys.argv[1:]:  # the command without --docs and its file
        if not skip and not arg.startswith("--docs"):
            shown.append(arg)
        skip = arg == "--docs"
    command = " ".join(["python bench/train.py", *shown])
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    model_dir, train_json = prepare(args.image_size, (args.warmup + args.steps) * args.batch, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for side in ("visprompt", "transformers"):
            flags = ["--steps", args.steps, "--warmup", args.warmup, "--batch", args.batch, "--seed", args.seed]
            cmd = [sys.executable, __file__, "--side", side, "--model", model_dir, "--data", train_json]
            cmd += [*flags, "--profile", args.profile, "--json", Path(tmp, side + ".json")]
            print(f"loading the {side} side ...", file=sys.stderr, flush=True)
            procs[side] = Side(side, cmd)
        # The sides take turns, one step each (the first alternating), so that a change in the
        # machine's load falls on both alike; the one waiting is idle.
        order = list(procs.values())
        for i in range(args.warmup + args.steps):
            print(f"step {i + 1}/{args.warmup + args.steps}", file=sys.stderr, flush=True)
            for proc in order if i % 2 == 0 else order[::-1]:
                proc.send("step")
        for proc in order:
            if args.profile:
                proc.send("profile")
            proc.finish()
        sides = {side: json.loads(Path(tmp, side + ".json").read_text()) for side in procs}
    text = markdown(command, sides, args)
    print(text)
    print(f"bench/train.py: {time.perf_counter() - started:.0f} s in all", file=sys.stderr)
    if args.docs:
        doc = args.docs.read_text()
        pattern = re.compile(r"(<!-- bench:train -->).*?(<!-- /bench:train -->)", re.S)
        if not pattern.search(doc):
            raise SystemExit(f"{args.docs} has no bench:train markers")
        args.docs.write_text(pattern.sub(lambda m: m.group(1) + "\n" + text + "\n" + m.group(2), doc))


if __name__ == "__main__":
    main()
