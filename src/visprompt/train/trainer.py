"""The training loop: AdamW with per-part learning rates (0 freezes a part), warmup + cosine,
gradient accumulation and clipping, periodic evaluation, checkpoints with resume, and a JSONL log.
Nothing here knows what the data is about: it reads any dataset `data.records.load_records` reads."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data.llava import IMAGE_TOKEN
from ..data.records import RecordSet, load_records
from ..errors import ConfigError, VispromptError
from ..eval import evaluate
from ..files import atomic_write_text, remove_stale_temporaries
from ..images import ImagePreprocessor, load_image
from ..models.versions import weights_version
from ..models.vision_language_model import VisionLanguageModel
from . import precision
from .bad_records import report_bad_records
from .checkpoint import (
    SHARDS_NAME,
    complete_checkpoints,
    is_sharded_checkpoint,
    load_checkpoint_model,
    load_state,
    newest_checkpoint,
    remove_checkpoints,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
)
from .config import Recipe
from .dataset import IGNORE_INDEX, VLMDataset, collate, record_texts
from .distributed import accumulation_sync, full_state_dict, is_sharded, load_sharded, setup, wrap
from .interrupt import StopRequest
from .runlog import METRICS_NAME, RunLog, plot_curves, trim
from .sampler import EpochBatches


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
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=fused_adamw_applies(groups))


def fused_adamw_applies(groups: list[dict]) -> bool:
    """Whether torch's fused AdamW (one kernel over all parameters: several times faster than the default
    per-tensor-list update on a CPU, the same update up to float rounding) takes these parameters: plain
    floating tensors on a CPU or a GPU. FSDP's sharded parameters (DTensors) keep the default."""
    params = [p for g in groups for p in g["params"]]
    return all(
        type(p) is torch.nn.Parameter and p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )


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
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            # One ETA: the trainer's, in `info` (it leaves evaluation time out; rich's own remaining
            # time column, from the recent step rate, disagreed with it)
            self.bar = RichProgress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
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


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("visprompt")
    except PackageNotFoundError:
        return "unknown"


def data_fingerprint(path: str, records: int, files: list[Path] | None = None) -> dict[str, Any]:
    """Which data a model saw: the dataset, its record count and the SHA-256 of its record files
    (`files`, in order; default: `path` itself). Images named by a file are not hashed: a dataset is
    identified by its record file (shards hold their images, so theirs are)."""
    import hashlib

    digest = hashlib.sha256()
    for name in files or [Path(path)]:
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return {"path": str(path), "records": records, "sha256": digest.hexdigest()}


class TrainingDiverged(VispromptError):
    """The loss became NaN or infinite; the weights are left as after the last good step."""


class Trainer:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.dist = setup()  # one process, or this one of several under torchrun
        self.tc = recipe.train
        self.out = Path(self.tc.output_dir)
        for name, tc in recipe.stages or [("", recipe.train)]:
            tc.validate(f"stages.{name}" if name else "train")
            if not tc.train_data:
                raise ConfigError(f"train_data is not set{f' in stage {name!r}' if name else ''} (a dataset)")
        self._record_sets: dict[tuple[str, str, str], RecordSet] = {}
        # a frozen encoder's stored outputs, kept for the next stage while that encoder is unchanged
        self._stored_features: tuple[tuple, dict, dict] | None = None

    def _records(self, path: str, tc) -> RecordSet:
        """The dataset at `path`, read and checked once per run (stages may share data)."""
        key = (path, tc.data_format, tc.image_root)
        if key not in self._record_sets:
            self._record_sets[key] = load_records(path, tc.data_format, tc.image_root)
        return self._record_sets[key]

    # -- setup -----------------------------------------------------------------------------------
    def _build_model(self, train_records) -> VisionLanguageModel:
        if self.tc.init_from:
            return VisionLanguageModel.from_pretrained(self.tc.init_from)
        if self.recipe.stages:  # a tokenizer trained on every stage's text, not only the first's
            texts = [t for _, tc in self.recipe.stages for t in record_texts(self._records(tc.train_data, tc).records)]
        else:
            texts = record_texts(train_records)
        return VisionLanguageModel.build(self.recipe.model, texts=texts)

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
            if tc.resume and i > 0 and not complete_checkpoints(out):
                tc = dataclasses.replace(tc, resume=False)  # resuming at the start of this stage
            if model is None and i > 0 and not tc.resume:
                tc = dataclasses.replace(tc, init_from=str(prev))
            print(f"stage {i + 1}/{len(self.recipe.stages)}: {name} ({tc.train_data})", file=sys.stderr, flush=True)
            summary = self._train_stage(tc, model)
            summaries.append({"stage": name, **summary})
            # the next stage continues in memory; a sharded model is read back from disk instead
            model, prev = (None if is_sharded(self.module) else self.model), out
        final = dict(summaries[-1])
        final.pop("stage")
        final["train_time_s"] = round(sum(s["train_time_s"] for s in summaries), 1)
        final["stages"] = summaries
        atomic_write_text(base / "train_summary.json", json.dumps(final, indent=2) + "\n")
        return final

    def _train_stage(self, tc, model: VisionLanguageModel | None = None) -> dict[str, Any]:
        """One training run with settings `tc`; `model`: continue training this model in memory."""
        self.tc, self.out = tc, Path(tc.output_dir)
        if tc.num_threads:
            torch.set_num_threads(tc.num_threads)
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        splits = {"train": (tc.train_data, self._records(tc.train_data, tc))}
        if tc.eval_data:
            splits["eval"] = (tc.eval_data, self._records(tc.eval_data, tc))
        report_bad_records(splits, self.out, tc.on_bad_record, self.dist.main)  # before any step
        train_records = splits["train"][1].records
        eval_records = splits["eval"][1].records[: tc.eval_max_records] if tc.eval_data else []

        if self.dist.main:
            remove_stale_temporaries(self.out)  # what a killed save left behind
        resume_from = newest_checkpoint(self.out) if tc.resume else None
        if resume_from:
            model = load_checkpoint_model(resume_from)
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
        cfg, d = model.cfg, self.dist
        preprocess = ImagePreprocessor(cfg.image_size, cfg.image_mean, cfg.image_std, cfg.image_resize_mode)
        dataset = VLMDataset(
            train_records, model, tc.max_length, preprocess, augment=tc.augment, seed=tc.seed + 1009 * d.rank
        )
        dataset.require_examples(tc.train_data)
        eval_dataset = VLMDataset(eval_records, model, tc.max_length, preprocess) if eval_records else None
        drop_last = d.active or len(dataset) > tc.batch_size  # several processes: every slice full
        lengths = [len(ex.input_ids) for ex in dataset.examples] if tc.group_by_length else None
        batches = EpochBatches(
            len(dataset), tc.batch_size, tc.seed, drop_last, tc.grad_accum, d.rank, d.world, lengths=lengths
        )
        steps_per_epoch = batches.steps_per_epoch()
        if steps_per_epoch == 0:
            raise ConfigError(
                f"a step takes grad_accum={tc.grad_accum} x batch_size={tc.batch_size} x {d.world} process(es) "
                f"examples, more than the {len(dataset)} training examples: lower grad_accum or batch_size"
            )
        # Own generator: making a loader iterator must not draw from the global RNG (dropout's), or a
        # resumed run, which starts its iterator mid-epoch, would draw different numbers.
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=partial(collate, pad_id=model.tokenizer.pad_token_id),
            generator=torch.Generator().manual_seed(tc.seed),
        )

        lrs = {"vision": tc.vision_lr, "connector": tc.connector_lr, "lm": tc.lm_lr}
        counts = freeze_parts(model, lrs)
        self.lrs = lrs
        if tc.cache_vision_features and lrs["vision"] == 0 and not tc.augment:
            self._store_vision_features(dataset, model, tc)
        train_mode(model, lrs)
        sharded_ckpt = resume_from is not None and is_sharded_checkpoint(resume_from)
        if resume_from and d.active and tc.fsdp and not sharded_ckpt:
            raise ConfigError(f"{resume_from} was not written by an FSDP run: resume it without fsdp")
        self.module = module = wrap(
            model, d, tc.fsdp
        )  # what the step calls: the model, DDP over it, or the FSDP-sharded model
        optimizer = build_optimizer(model, lrs, tc.weight_decay)  # after sharding: over the shards
        clipped = [p for p in model.parameters() if p.requires_grad]  # after sharding too
        total = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
        warmup = int(tc.warmup_ratio * total)
        base_lrs = [g["lr"] for g in optimizer.param_groups]
        # What a checkpoint carries besides the model, beside the optimizer and the RNGs.
        run = {"step": 0, "window_loss": 0.0, "window_n": 0}
        metrics = self.out / METRICS_NAME
        if resume_from:
            state = load_state(resume_from, model)
            if sharded_ckpt:
                load_sharded(resume_from / SHARDS_NAME, module, optimizer)
            else:
                optimizer.load_state_dict(state["optimizer"])
            self._restore_rng(state, dataset, tc)
            run = {k: state[k] for k in run}
            if d.main:
                trim(metrics, run["step"])
        else:
            if d.active:  # the same initial weights everywhere, then each process its own dropout
                torch.manual_seed(tc.seed + 1009 * d.rank)
            if d.main:
                self.out.mkdir(parents=True, exist_ok=True)
                dropped = remove_checkpoints(self.out)
                if dropped:
                    print(f"removed {dropped} checkpoint(s) of an earlier run in {self.out}", file=sys.stderr)
        d.barrier()
        step = run["step"]
        log = RunLog(self.out, step if resume_from else None, tc.tensorboard) if d.main else None
        total_params = sum(p.numel() for p in model.parameters())
        trainable = sum(counts.values())
        dtype, why = precision.choose(tc.dtype)
        if d.main:
            print(
                f"model: {total_params / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable "
                f"({', '.join(f'{k} {v / 1e6:.2f}M' for k, v in counts.items())}); {_image_tokens_note(cfg)}; "
                f"{len(dataset)} examples, {total} steps"
                + (f" on {d.world} processes" if d.active else "")
                + (f", resuming at step {step} from {resume_from}" if resume_from else "")
                + f"; precision {why}",
                file=sys.stderr,
            )
        autocast = precision.autocast(dtype)

        def checkpoint() -> Path:
            rngs = d.gather(rng_state(dataset.rng))  # every process's, in rank order
            folder = self.out / f"checkpoint-{step}"
            state = {"step": step, "window_loss": window_loss, "window_n": window_n, "world": d.world, "rng": rngs}
            if is_sharded(module):
                return save_sharded_checkpoint(self.out, model, module, optimizer, state, tc.save_total_limit, d)
            if d.main:
                state["optimizer"] = optimizer.state_dict()
                folder = save_checkpoint(self.out, model, state, tc.save_total_limit)
            d.barrier()
            return folder

        progress = Progress(total, step) if d.main else None
        start_step = step
        t_start, samples = time.time(), 0
        window_loss, window_n = run["window_loss"], run["window_n"]
        self.eval_seconds = 0.0  # evaluation time, left out of samples/s and ETA
        final_eval: dict[str, Any] = {}
        stopping = False
        with StopRequest() as stop:
            try:
                while step < total and not stopping:
                    epoch, done = divmod(step, steps_per_epoch)
                    batches.set_position(epoch, done * tc.grad_accum)
                    micro = iter(loader)
                    for _ in range(steps_per_epoch - done):
                        group = [next(micro) for _ in range(tc.grad_accum)]
                        loss = self._accumulate(module, group, autocast)
                        samples += sum(b["input_ids"].shape[0] for b in group) * d.world
                        if not math.isfinite(loss):
                            last = complete_checkpoints(self.out)
                            raise TrainingDiverged(
                                f"the training loss is {loss} at step {step + 1}: stopped before the update; "
                                + (f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved")
                                + " (lower the learning rates, or set grad_clip)"
                            )
                        scale = warmup_cosine(step, total, warmup, tc.min_lr_ratio)
                        for g, base in zip(optimizer.param_groups, base_lrs):
                            g["lr"] = base * scale
                        if tc.grad_clip > 0:
                            torch.nn.utils.clip_grad_norm_(clipped, tc.grad_clip)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        step += 1
                        window_loss += loss
                        window_n += 1
                        if d.main and (step % tc.log_every == 0 or step == total):
                            elapsed = time.time() - t_start - self.eval_seconds
                            rate = samples / max(elapsed, 1e-9)
                            mean = window_loss / max(1, window_n)
                            eta = (total - step) * elapsed / max(1, step - start_step)
                            progress.update(step, f"loss {mean:.4f} | {rate:.1f} samples/s | ETA {_eta(eta)}")
                            row = {
                                "step": step,
                                "epoch": epoch,
                                "loss": round(mean, 5),
                                "lr": optimizer.param_groups[0]["lr"],
                                "samples_per_s": round(rate, 2),
                                "elapsed_s": round(elapsed, 1),
                            }
                            log.write(row)
                        if step % tc.log_every == 0 or step == total:
                            window_loss, window_n = 0.0, 0
                        if tc.eval_every and step % tc.eval_every == 0 and step < total and eval_records:
                            whole = self._whole_model(model, module)
                            if d.main:
                                self._log_eval(whole, eval_records, eval_dataset, step, log, progress)
                            d.barrier()
                        if tc.save_every and step % tc.save_every == 0 and step < total:
                            checkpoint()
                        stopping = d.any(stop.requested)  # every process stops after the same step
                        if stopping or step >= total:
                            break
            finally:
                if progress is not None:
                    progress.close()
            train_time = time.time() - t_start - self.eval_seconds
            if stopping:  # mid-run: a checkpoint after the step that was running
                if log is not None:
                    log.close()
                folder = checkpoint()
                if d.main:
                    print(
                        f"stopped at step {step}: saved {folder}; continue with --resume", file=sys.stderr, flush=True
                    )
                stop.stop()
            summary = {
                "steps": step,
                "train_time_s": round(train_time, 1),
                "examples": len(dataset),
                "parameters": total_params,
                "trainable_parameters": trainable,
                "data": {
                    split: data_fingerprint(path, n, rs.files)
                    for split, path, n, rs in (
                        ("train", tc.train_data, len(train_records), splits["train"][1]),
                        ("eval", tc.eval_data, len(eval_records), splits.get("eval", (None, None))[1]),
                    )
                    if path
                },
            }
            whole = self._whole_model(model, module)
            if d.main:
                if eval_records:
                    final_eval = self._log_eval(whole, eval_records, eval_dataset, step, log, None)
                summary.update({f"eval_{k}": v for k, v in final_eval.items() if k != "mistakes"})
                whole.eval()
                # Weights, summary and card in one atomic save: they always describe each other.
                card = {
                    "train_summary.json": json.dumps(summary, indent=2) + "\n",
                    "README.md": self._model_card(summary),
                }
                whole.save_pretrained(self.out, extra_files=card)
            if log is not None:
                log.close()
                plot_curves(self.out)
            d.barrier()
            if stop.requested:  # during the final evaluation or save: the model is saved, stop now
                stop.stop()
        return summary

    def _accumulate(self, module: torch.nn.Module, group: list[dict], autocast) -> float:
        """Forward and backward over one optimizer step's micro-batches. The gradient is that of the
        mean loss over every answer token of the step (all micro-batches on all processes), so that
        accumulation and several processes give the update of one large batch. Returns that loss."""
        d = self.dist
        counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group]  # loss tokens
        tokens = max(d.sum([float(sum(counts))])[0], 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64)  # one read of the value per step, not per micro-batch
        for i, (batch, n) in enumerate(zip(group, counts)):
            last = i == len(group) - 1
            with accumulation_sync(module, last):  # gradients are reduced once per step
                with autocast:
                    out = module(
                        batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"],
                        vision_features=batch.get("vision_features"),
                        image_layouts=batch.get("image_layouts"),
                        labels=batch["labels"],
                    )
                summed = out.loss * n if n else out.logits.sum() * 0.0  # no answer tokens: adds nothing
                # DDP averages gradients over processes; the factor world makes that a sum.
                (summed * (d.world / tokens)).backward()
            loss_sum += summed.detach().double()
        return d.sum([float(loss_sum)])[0] / tokens

    def _whole_model(self, model: VisionLanguageModel, module: torch.nn.Module) -> VisionLanguageModel | None:
        """The trained model, whole, on the main process (None elsewhere): `model` itself, or under
        FSDP a copy gathered from the shards (collective: every process calls it)."""
        if not is_sharded(module):
            return model if self.dist.main else None
        full = full_state_dict(module)
        if not self.dist.main:
            return None
        from ..models.lora import add_lora, has_lora

        whole = VisionLanguageModel.from_config(model.cfg, model.tokenizer)
        if has_lora(model.lm):
            add_lora(whole.lm, model.cfg.lm_lora_rank, model.cfg.lm_lora_alpha, model.cfg.lm_lora_targets)
        whole.load_state_dict(full)
        return whole

    def _restore_rng(self, state: dict[str, Any], dataset: VLMDataset, tc) -> None:
        d, rngs = self.dist, state["rng"]
        if len(rngs) == d.world:
            set_rng_state(rngs[d.rank], dataset.rng)
            return
        if d.main:
            print(
                f"warning: the checkpoint was written by {len(rngs)} process(es), this run has {d.world}: the data "
                "order continues, but random state (dropout, augmentation) starts afresh, so the result is not "
                "bit-identical to an uninterrupted run",
                file=sys.stderr,
            )
        torch.manual_seed(tc.seed + 1009 * d.rank + state["step"])
        dataset.rng.seed(tc.seed + 1009 * d.rank + state["step"])

    def _store_vision_features(self, dataset: VLMDataset, model: VisionLanguageModel, tc) -> None:
        """The frozen encoder runs once per distinct image instead of once per example and epoch
        (and a stage reuses what an earlier stage stored, while the encoder has not changed)."""
        paths = dataset.image_paths()
        if not paths:
            return
        with torch.no_grad():
            one = model.vision.eval()(dataset.preprocess([load_image(paths[0])]))  # [1, N, Dv]
        need = one.numel() * one.element_size() * len(paths)
        if model.cfg.image_tiling == "anyres":  # up to 1 + max_tiles views per image
            need *= 1 + model.cfg.max_tiles
        if need > tc.cache_vision_features_gb * 2**30:
            print(
                f"not storing the frozen encoder's outputs: {need / 2**30:.1f} GiB for {len(paths)} images is over cache_vision_features_gb={tc.cache_vision_features_gb}",
                file=sys.stderr,
            )
            return
        t0 = time.time()
        state = (model.vision, weights_version(model.vision, buffers=True))  # the module held: ids stay unique
        known, layouts = {}, {}
        if self._stored_features is not None and self._stored_features[0] == state:
            known, layouts = self._stored_features[1:]
        kept = dataset.store_vision_features(model.vision, tc.eval_batch_size, known, layouts)
        self._stored_features = (state, dataset.vision_features, dataset.stored_layouts)
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
                    image_layouts=batch.get("image_layouts"),
                    labels=batch["labels"],
                )
                loss_sum += float(out.loss) * batch["input_ids"].shape[0]
                n += batch["input_ids"].shape[0]
        report = evaluate(model, eval_records, batch_size=self.tc.eval_batch_size)
        result = {"eval_loss": round(loss_sum / max(1, n), 5), **report.to_dict()}
        log.write({"step": step, **result, "eval_time_s": round(time.time() - t0, 1)})
        msg = f"eval @ step {step}: loss {result['eval_loss']:.4f}, exact match {report.exact_match:.1%} of {report.total}"
        if report.by_kind:
            msg += " (" + ", ".join(f"{k} {v:.0%}" for k, v in report.by_kind.items()) + ")"
        print(msg, file=sys.stderr, flush=True)
        self.eval_seconds += time.time() - t0
        train_mode(model, self.lrs)
        return result

    def _model_card(self, summary: dict[str, Any]) -> str:
        """README.md of the saved model: how it was trained (the settings, the package version, the
        data files' fingerprints) and how it scored."""
        import yaml

        train = {k: v for k, v in dataclasses.asdict(self.tc).items() if k not in ("resume",)}
        lines = ["# visprompt model", "", f"Trained with `visprompt train` (visprompt {package_version()}).", ""]
        lines += ["## Results", "", *[f"- {k}: {v}" for k, v in summary.items() if k != "data"], ""]
        lines += ["## Data", "", "| split | file | records | sha256 |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {k} | `{v['path']}` | {v['records']} | `{v['sha256'][:16]}` |" for k, v in summary["data"].items()
        ]
        lines += [
            "",
            "## Training settings",
            "",
            "```yaml",
            yaml.safe_dump({"train": train}, sort_keys=False).strip(),
            "```",
        ]
        return "\n".join(lines) + "\n"


def _image_tokens_note(cfg) -> str:
    from ..models.image_inputs import max_image_tokens

    if cfg.image_tiling == "anyres":
        return f"{cfg.tokens_per_image} tokens per view, up to {max_image_tokens(cfg)} per image (anyres, max_tiles={cfg.max_tiles})"
    return f"{cfg.tokens_per_image} tokens per image"
