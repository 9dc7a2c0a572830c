"""LLaVA records -> training examples: token ids with image placeholders expanded, a loss mask on
the assistant's replies only, and the record's images."""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..data.llava import IMAGE_TOKEN, LlavaRecord, image_label, record_conversation
from ..errors import ConfigError, DatasetError, ImageError
from ..images import AugmentPolicy, ImagePreprocessor, load_image
from ..images.tiling import oriented_size
from ..models.chat import encode_training_example, to_chat
from ..models.image_inputs import image_layout, prepare_images

IGNORE_INDEX = -100


def record_chat(record: LlavaRecord, image_token: str, default_system: str = "") -> list[dict[str, str]]:
    """The record as string-content chat messages, one `image_token` per image, rendered exactly as
    a conversation is rendered for generation."""
    return to_chat(record_conversation(record), image_token, default_system)[0]


def record_texts(records: list[LlavaRecord]) -> list[str]:
    """Text to train a tokenizer on: every turn, plus the chat template's role names."""
    texts = ["system", "user", "assistant"]
    for r in records:
        if r.system:
            texts.append(r.system)
        for human, gpt in r.turns:
            texts.append(human.replace(IMAGE_TOKEN, "").strip())
            texts.append(gpt)
    return texts


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    images: list[str]
    record_id: str = ""
    augment: AugmentPolicy = AugmentPolicy()  # which label-changing jitters its text allows


class VLMDataset(Dataset):
    def __init__(
        self,
        records: list[LlavaRecord],
        model,
        max_length: int,
        preprocess: ImagePreprocessor,
        augment: bool = False,
        seed: int = 0,
    ):
        self.preprocess = preprocess
        self.augment = augment
        self.rng = random.Random(seed)
        self.vision_features: dict[str, torch.Tensor] | None = None  # see store_vision_features
        self.stored_layouts: dict[str, object] = {}  # tiled images: each stored image's ImageLayout
        self.examples: list[Example] = []
        self.n_records, self.max_length = len(records), max_length
        tok, cfg = model.tokenizer, model.cfg
        self.tiled_cfg = cfg if cfg.image_tiling == "anyres" else None  # tiled images: see prepare_images
        skipped = 0
        for rec in records:
            ids, mask = encode_training_example(tok, record_chat(rec, cfg.image_token, cfg.system_prompt))
            counts = iter(self._image_token_counts(rec, cfg))
            full_ids, full_mask = [], []
            for t, m in zip(ids, mask):
                n = next(counts, cfg.tokens_per_image) if t == cfg.image_token_id else 1
                full_ids.extend([t] * n)
                full_mask.extend([m] * n)
            if len(full_ids) > max_length:
                skipped += 1  # cutting would drop image tokens or answers: skip, and say so
                continue
            labels = [t if m else IGNORE_INDEX for t, m in zip(full_ids, full_mask)]
            text = " ".join([rec.system or "", *(t for turn in rec.turns for t in turn)])
            self.examples.append(Example(full_ids, labels, list(rec.images), rec.id, AugmentPolicy.for_text(text)))
        if skipped:
            print(
                f"warning: skipped {skipped} of {len(records)} records longer than max_length={max_length}",
                file=sys.stderr,
            )

    def __len__(self) -> int:
        return len(self.examples)

    def _image_token_counts(self, rec: LlavaRecord, cfg) -> list[int]:
        """Prompt tokens per image of the record (tiled images: by their size, read from the header)."""
        if self.tiled_cfg is None:
            return [cfg.tokens_per_image] * len(rec.images)
        counts = []
        for p in rec.images:
            try:
                counts.append(image_layout(cfg, oriented_size(p)).n_tokens)
            except OSError as exc:  # missing, unreadable, or not an image (UnidentifiedImageError)
                raise ImageError(f"training image {p} (record id {rec.id!r}): {exc.strerror or exc}") from None
        return counts

    def require_examples(self, source: str) -> None:
        """A one-line error when no example is left: `source` has no records, or all are too long."""
        if self.examples:
            return
        if not self.n_records:
            raise DatasetError(f"{source}: the file has no records to train on")
        raise ConfigError(
            f"{source}: no training examples left: all {self.n_records} records are longer than "
            f"max_length={self.max_length} tokens"
        )

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        if self.vision_features is not None and self.tiled_cfg is not None:  # every view of each image
            feats = torch.cat([self.vision_features[p] for p in ex.images]) if ex.images else None
            layouts = [self.stored_layouts[p] for p in ex.images]
            return {
                "input_ids": ex.input_ids,
                "labels": ex.labels,
                "pixel_values": None,
                "vision_features": feats,
                "image_layouts": layouts,
            }
        if self.vision_features is not None:  # a frozen encoder's stored outputs, one per image file
            feats = torch.stack([self.vision_features[p] for p in ex.images]) if ex.images else None
            return {"input_ids": ex.input_ids, "labels": ex.labels, "pixel_values": None, "vision_features": feats}
        images = [self._load_image(p) for p in ex.images]
        if self.augment:
            from ..images.preprocess import augment

            images = [augment(im, self.rng, policy=ex.augment) for im in images]
        if self.tiled_cfg is not None:
            pixels, layouts = prepare_images(images, self.tiled_cfg, self.preprocess) if images else (None, [])
            return {"input_ids": ex.input_ids, "labels": ex.labels, "pixel_values": pixels, "image_layouts": layouts}
        pixels = self.preprocess(images) if images else None
        return {"input_ids": ex.input_ids, "labels": ex.labels, "pixel_values": pixels}

    def image_paths(self) -> list[str]:
        """Every distinct image file of the examples, in first-use order."""
        return list(self._image_records())

    def _image_records(self) -> dict[str, str]:
        """Every distinct image file -> the id of the first record that uses it."""
        out: dict[str, str] = {}
        for ex in self.examples:
            for p in ex.images:
                out.setdefault(p, ex.record_id)
        return out

    def _load_image(self, path: str, record_id: str | None = None):
        """load_image, with a refusal naming the file and the record that uses it."""
        try:
            return load_image(path)
        except ImageError as exc:
            if record_id is None:
                record_id = self._image_records().get(path, "")
            raise ImageError(f"training image {image_label(path)} (record id {record_id!r}): {exc}") from None

    @torch.no_grad()
    def store_vision_features(
        self,
        vision: torch.nn.Module,
        batch_size: int = 64,
        known: dict[str, torch.Tensor] | None = None,
        known_layouts: dict[str, object] | None = None,
    ) -> int:
        """Run a frozen encoder once over every distinct image and serve its outputs from then on
        (as `vision_features`), instead of decoding and encoding the images again every epoch.
        Only valid while the encoder does not change and without augmentation. `known` (with
        `known_layouts` for tiled images): outputs of this same encoder stored before (an earlier
        stage's), used as they are. Returns the bytes kept."""
        if self.augment:
            raise ValueError("stored vision features would freeze the augmentation; turn one of them off")
        store: dict[str, torch.Tensor] = {}
        records = self._image_records()
        known, known_layouts = known or {}, known_layouts or {}
        for p in records:
            if p in known and (self.tiled_cfg is None or p in known_layouts):
                store[p] = known[p]
                if self.tiled_cfg is not None:
                    self.stored_layouts[p] = known_layouts[p]
        paths = [p for p in records if p not in store]
        was_training = vision.training
        vision.eval()
        reused = f" ({len(store)} more stored before)" if store else ""
        print(
            f"frozen encoder: encoding {len(paths)} images once, before the first step{reused}",
            file=sys.stderr,
            flush=True,
        )
        started, shown = time.time(), time.time()
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            images = [self._load_image(p, records[p]) for p in chunk]
            if self.tiled_cfg is not None:  # each image's views: [n_views_i, N, Dv]
                pixels, layouts = prepare_images(images, self.tiled_cfg, self.preprocess)
                feats = vision(pixels).split([lay.n_views for lay in layouts])
                self.stored_layouts.update(zip(chunk, layouts))
            else:
                feats = vision(self.preprocess(images))  # [n, N, Dv]
            store.update((p, f.clone()) for p, f in zip(chunk, feats))
            done = start + len(chunk)
            if time.time() - shown >= 10 and done < len(paths):  # a line every 10 s on a long pass
                left = (time.time() - started) / done * (len(paths) - done)
                print(f"frozen encoder: {done}/{len(paths)} images, ~{left:.0f} s left", file=sys.stderr, flush=True)
                shown = time.time()
        vision.train(was_training)
        self.vision_features = store
        return sum(f.numel() * f.element_size() for f in store.values())


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor | None]:
    """Right-pad to the longest example; images of all examples stacked in batch order."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    pixels = [b["pixel_values"] for b in batch if b["pixel_values"] is not None]
    out = {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": torch.cat(pixels) if pixels else None,
    }
    if any("image_layouts" in b for b in batch):  # tiled images: each one's grid, in batch order
        out["image_layouts"] = [lay for b in batch for lay in b.get("image_layouts", [])]
    if any("vision_features" in b for b in batch):
        feats = [b["vision_features"] for b in batch if b.get("vision_features") is not None]
        out["vision_features"] = torch.cat(feats) if feats else None
    return out
