"""The training loop: AdamW with per-part learning rates (0 freezes a part), warmup + cosine,
gradient accumulation and clipping, periodic evaluation, checkpoints with resume, and a JSONL log.
Nothing here knows what the data is about: it reads any LLaVA-format dataset."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data.llava import IMAGE_TOKEN, load_llava_records
from ..errors import ConfigError
from ..eval import evaluate
from ..images import ImagePreprocessor, load_image
from ..models.vision_language_model import VisionLanguageModel
from .config import Recipe
from .dataset import VLMDataset, collate, record_texts

STATE_NAME = "trainer_state.pt"


def freeze_parts(model: VisionLanguageModel, lrs: dict[str, float]) -> dict[str, int]:
    """requires_grad follows each part's LR (for an LM with LoRA adapters: the adapters only); then
    check it really did (open_flamingo's habit)."""
    from ..models.lora import has_lora

    lora = has_lora(model.lm)
    for part, lr in lrs.items():
        for name, p in model.part(part).named_parameters():
            p.requires_grad_(lr > 0 and (part != "lm" or not lora or "lora_" in name))
    if lora and lrs.get("lm", 0) > 0:
        assert all(("lora_" in n) == p.requires_grad for n, p in model.lm.named_parameters()), (
            "LoRA: only adapters may train in the LM"
        )
    counts = model.trainable_parameters()
    for part, lr in lrs.items():
        assert (counts[part] > 0) == (lr > 0), f"part {part}: lr={lr} but {counts[part]} trainable parameters"
    return counts


def train_mode(model: VisionLanguageModel, lrs: dict[str, float]) -> None:
    """Training mode for trained parts; frozen parts stay in eval mode so their BatchNorm statistics
    and dropout stay as pretrained (a frozen CNN must not drift on the new data)."""
    model.train()
    for part, lr in lrs.items():
        if lr <= 0:
            model.part(part).eval()


def build_optimizer(model: VisionLanguageModel, lrs: dict[str, float], weight_decay: float) -> torch.optim.AdamW:
    groups = []
    for part, lr in lrs.items():
        if lr <= 0:
            continue
        params = [p for p in model.part(part).parameters() if p.requires_grad]
        # No decay on norms and biases (1-d), as is standard.
        groups.append(
            {"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": weight_decay, "part": part}
        )
        groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0, "part": part})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("every part is frozen (all learning rates are 0): nothing to train")
    return torch.optim.AdamW(groups, betas=(0.9, 0.95))


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Progress:
    """A progress line on stderr: a live rich bar on a terminal, plain log lines otherwise."""

    def __init__(self, total: int, start: int):
        self.total, self.live = total, sys.stderr.isatty()
        self.bar = None
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self.bar = RichProgress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        else:
            print(f"step {step}/{self.total} {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def image_after_text(records) -> bool | None:
    """Whether most training turns with an image put it after their text ("Q?\\n<image>"); None
    when no turn has an image. Saved in the model's config, so `ask` uses the trained layout."""
    after = before = 0
    for rec in records:
        for human, _ in rec.turns:
            if IMAGE_TOKEN in human:
                if human.split(IMAGE_TOKEN, 1)[0].strip():
                    after += 1
                else:
                    before += 1
    return None if after + before == 0 else after > before


class Trainer:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.tc = recipe.train
        self.out = Path(self.tc.output_dir)
        for name, tc in recipe.stages or [("", recipe.train)]:
            tc.validate(f"stages.{name}" if name else "train")
            if not tc.train_data:
                raise ConfigError(f"train_data is not set{f' in stage {name!r}' if name else ''} (a LLaVA JSON file)")

    # -- setup -----------------------------------------------------------------------------------
    def _build_model(self, train_records) -> VisionLanguageModel:
        if self.tc.init_from:
            return VisionLanguageModel.from_pretrained(self.tc.init_from)
        if self.recipe.stages:  # a tokenizer trained on every stage's text, not only the first's
            texts = [
                t
                for _, tc in self.recipe.stages
                for t in record_texts(load_llava_records(tc.train_data, check_images=False))
            ]
        else:
            texts = record_texts(train_records)
        return VisionLanguageModel.build(self.recipe.model, texts=texts)

    def _latest_checkpoint(self) -> Path | None:
        ckpts = sorted(self.out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        return ckpts[-1] if ckpts else None

    # -- run -------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train; with stages, run them in order on one model. Earlier stages save to
        OUTPUT/stages/NAME, the last to OUTPUT; with resume, a finished stage is not run again."""
        if not self.recipe.stages:
            return self._train_stage(self.recipe.train)
        base = Path(self.recipe.train.output_dir)
        model, summaries = None, []
        for i, (name, tc) in enumerate(self.recipe.stages):
            last = i == len(self.recipe.stages) - 1
            out = base if last else base / "stages" / name
            tc = dataclasses.replace(tc, output_dir=str(out))
            done = out / "train_summary.json"
            if tc.resume and done.exists() and not last:  # finished: the next stage loads it from disk
                summaries.append({"stage": name, **json.loads(done.read_text())})
                model, prev = None, out
                continue
            if model is None and i > 0 and not (tc.resume and self._has_checkpoint(out)):
                tc = dataclasses.replace(tc, init_from=str(prev))
            print(f"stage {i + 1}/{len(self.recipe.stages)}: {name} ({tc.train_data})", file=sys.stderr, flush=True)
            summary = self._train_stage(tc, model)
            summaries.append({"stage": name, **summary})
            model, prev = self.model, out
        final = dict(summaries[-1])
        final.pop("stage")
        final["train_time_s"] = round(sum(s["train_time_s"] for s in summaries), 1)
        final["stages"] = summaries
        (base / "train_summary.json").write_text(json.dumps(final, indent=2) + "\n")
        return final

    @staticmethod
    def _has_checkpoint(out: Path) -> bool:
        return any(out.glob("checkpoint-*"))

    def _train_stage(self, tc, model: VisionLanguageModel | None = None) -> dict[str, Any]:
        """One training run with settings `tc`; `model`: continue training this model in memory."""
        self.tc, self.out = tc, Path(tc.output_dir)
        if tc.num_threads:
            torch.set_num_threads(tc.num_threads)
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        train_records = load_llava_records(tc.train_data)
        eval_records = load_llava_records(tc.eval_data)[: tc.eval_max_records] if tc.eval_data else []

        resume_from = self._latest_checkpoint() if tc.resume else None
        if resume_from:
            model = VisionLanguageModel.from_pretrained(resume_from)
        elif model is None:
            model = self._build_model(train_records)
        self.model = model
        layout = image_after_text(train_records)
        if layout is not None:
            model.cfg.image_after_text = layout
        if self.recipe.model.lm_lora_rank > 0:  # the recipe's LoRA settings win over a loaded model's
            for key in ("lm_lora_rank", "lm_lora_alpha", "lm_lora_targets"):
                setattr(model.cfg, key, getattr(self.recipe.model, key))
        if model.cfg.lm_lora_rank > 0 and tc.lm_lr > 0:
            from ..models.lora import add_lora, has_lora

            if not has_lora(model.lm):
                add_lora(model.lm, model.cfg.lm_lora_rank, model.cfg.lm_lora_alpha, model.cfg.lm_lora_targets)
        cfg = model.cfg
        preprocess = ImagePreprocessor(cfg.image_size, cfg.image_mean, cfg.image_std, cfg.image_resize_mode)
        dataset = VLMDataset(train_records, model, tc.max_length, preprocess, augment=tc.augment, seed=tc.seed)
        dataset.require_examples(tc.train_data)
        eval_dataset = VLMDataset(eval_records, model, tc.max_length, preprocess) if eval_records else None
        pad_id = model.tokenizer.pad_token_id
        loader = DataLoader(
            dataset,
            batch_size=tc.batch_size,
            shuffle=True,
            collate_fn=partial(collate, pad_id=pad_id),
            generator=torch.Generator().manual_seed(tc.seed),
            drop_last=len(dataset) > tc.batch_size,
        )

        lrs = {"vision": tc.vision_lr, "connector": tc.connector_lr, "lm": tc.lm_lr}
        counts = freeze_parts(model, lrs)
        self.lrs = lrs
        if tc.cache_vision_features and lrs["vision"] == 0 and not tc.augment:
            self._store_vision_features(dataset, model, tc)
        train_mode(model, lrs)
        optimizer = build_optimizer(model, lrs, tc.weight_decay)
        steps_per_epoch = max(1, len(loader) // tc.grad_accum)
        total = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
        warmup = int(tc.warmup_ratio * total)
        base_lrs = [g["lr"] for g in optimizer.param_groups]
        step = 0
        if resume_from:
            state = torch.load(resume_from / STATE_NAME, weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            step = state["step"]
            torch.set_rng_state(state["torch_rng"])
        self.out.mkdir(parents=True, exist_ok=True)
        # A resumed run continues its log; a fresh run into the same folder starts a new one.
        log = (self.out / "metrics.jsonl").open("a" if resume_from else "w")
        total_params = sum(p.numel() for p in model.parameters())
        trainable = sum(counts.values())
        print(
            f"model: {total_params / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable "
            f"({', '.join(f'{k} {v / 1e6:.2f}M' for k, v in counts.items())}); {cfg.tokens_per_image} tokens per image; "
            f"{len(dataset)} examples, {total} steps" + (f", resuming at step {step}" if resume_from else ""),
            file=sys.stderr,
        )
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if tc.dtype == "bfloat16" else contextlib.nullcontext()

        progress = Progress(total, step)
        start_step = step
        t_start, samples, window_loss, window_n = time.time(), 0, 0.0, 0
        self.eval_seconds = 0.0  # evaluation time, left out of samples/s and ETA
        epoch = step // steps_per_epoch
        final_eval: dict[str, Any] = {}
        try:
            while step < total:
                for micro, batch in enumerate(loader):
                    with autocast:
                        out = model(
                            batch["input_ids"],
                            attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"],
                            vision_features=batch.get("vision_features"),
                            labels=batch["labels"],
                        )
                    (out.loss / tc.grad_accum).backward()
                    window_loss += out.loss.item()
                    window_n += 1
                    samples += batch["input_ids"].shape[0]
                    if (micro + 1) % tc.grad_accum:
                        continue
                    scale = warmup_cosine(step, total, warmup, tc.min_lr_ratio)
                    for g, base in zip(optimizer.param_groups, base_lrs):
                        g["lr"] = base * scale
                    if tc.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tc.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    if step % tc.log_every == 0 or step == total:
                        elapsed = time.time() - t_start - self.eval_seconds
                        rate = samples / max(elapsed, 1e-9)
                        loss = window_loss / max(1, window_n)
                        eta = (total - step) * elapsed / max(1, step - start_step)
                        progress.update(step, f"loss {loss:.4f} | {rate:.1f} samples/s | ETA {_eta(eta)}")
                        log.write(
                            json.dumps(
                                {
                                    "step": step,
                                    "epoch": epoch,
                                    "loss": round(loss, 5),
                                    "lr": optimizer.param_groups[0]["lr"],
                                    "samples_per_s": round(rate, 2),
                                    "elapsed_s": round(elapsed, 1),
                                }
                            )
                            + "\n"
                        )
                        log.flush()
                        window_loss, window_n = 0.0, 0
                    if tc.eval_every and step % tc.eval_every == 0 and step < total and eval_records:
                        self._log_eval(model, eval_records, eval_dataset, step, log, progress)
                    if tc.save_every and step % tc.save_every == 0 and step < total:
                        self._save_checkpoint(model, optimizer, step)
                    if step >= total:
                        break
                epoch += 1
        finally:
            progress.close()
        train_time = time.time() - t_start - self.eval_seconds
        if eval_records:
            final_eval = self._log_eval(model, eval_records, eval_dataset, step, log, None)
        log.close()
        model.eval()
        model.save_pretrained(self.out)
        summary = {
            "steps": step,
            "train_time_s": round(train_time, 1),
            "examples": len(dataset),
            "parameters": total_params,
            "trainable_parameters": trainable,
            **{f"eval_{k}": v for k, v in final_eval.items() if k != "mistakes"},
        }
        (self.out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self._write_model_card(summary)
        return summary

    @staticmethod
    def _store_vision_features(dataset: VLMDataset, model: VisionLanguageModel, tc) -> None:
        """The frozen encoder runs once per distinct image instead of once per example and epoch."""
        paths = dataset.image_paths()
        if not paths:
            return
        with torch.no_grad():
            one = model.vision.eval()(dataset.preprocess([load_image(paths[0])]))  # [1, N, Dv]
        need = one.numel() * one.element_size() * len(paths)
        if need > tc.cache_vision_features_gb * 2**30:
            print(
                f"not storing the frozen encoder's outputs: {need / 2**30:.1f} GiB for {len(paths)} images is over cache_vision_features_gb={tc.cache_vision_features_gb}",
                file=sys.stderr,
            )
            return
        t0 = time.time()
        kept = dataset.store_vision_features(model.vision, tc.eval_batch_size)
        print(
            f"frozen encoder run once over {len(paths)} images: {kept / 2**20:.0f} MiB of features in {time.time() - t0:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    # -- evaluation and checkpoints ----------------------------------------------------------------
    @torch.no_grad()
    def _log_eval(self, model, eval_records, eval_dataset, step, log, progress) -> dict[str, Any]:
        model.eval()
        t0 = time.time()
        loss_sum, n = 0.0, 0
        if eval_dataset is not None:
            loader = DataLoader(
                eval_dataset,
                batch_size=self.tc.eval_batch_size,
                collate_fn=partial(collate, pad_id=model.tokenizer.pad_token_id),
            )
            for batch in loader:
                out = model(
                    batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"],
                    labels=batch["labels"],
                )
                loss_sum += float(out.loss) * batch["input_ids"].shape[0]
                n += batch["input_ids"].shape[0]
        report = evaluate(model, eval_records, batch_size=self.tc.eval_batch_size)
        result = {"eval_loss": round(loss_sum / max(1, n), 5), **report.to_dict()}
        log.write(json.dumps({"step": step, **result, "eval_time_s": round(time.time() - t0, 1)}) + "\n")
        log.flush()
        msg = f"eval @ step {step}: loss {result['eval_loss']:.4f}, exact match {report.exact_match:.1%} of {report.total}"
        if report.by_kind:
            msg += " (" + ", ".join(f"{k} {v:.0%}" for k, v in report.by_kind.items()) + ")"
        print(msg, file=sys.stderr, flush=True)
        self.eval_seconds += time.time() - t0
        train_mode(model, self.lrs)
        return result

    def _save_checkpoint(self, model, optimizer, step: int) -> None:
        folder = self.out / f"checkpoint-{step}"
        model.save_pretrained(folder)
        torch.save(
            {"optimizer": optimizer.state_dict(), "step": step, "torch_rng": torch.get_rng_state()}, folder / STATE_NAME
        )
        ckpts = sorted(self.out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in ckpts[: -self.tc.save_total_limit]:
            shutil.rmtree(old)

    def _write_model_card(self, summary: dict[str, Any]) -> None:
        lines = ["# visprompt model", "", f"Trained with `visprompt train` on `{self.tc.train_data}`.", ""]
        lines += [f"- {k}: {v}" for k, v in summary.items()]
        (self.out / "README.md").write_text("\n".join(lines) + "\n")
