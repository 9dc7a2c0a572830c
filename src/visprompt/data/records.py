"""One entry point for every dataset format: records checked one by one, the good ones kept and the
bad ones listed with their id and what is wrong, instead of one bad record stopping the whole load.

Every record is held to the same rules, whatever its format: each image exists and decodes; there
is one `<image>` marker per image, only in questions (a record with images and no marker is bad);
roles alternate user/assistant (an optional system message first) and end with an answer; no answer
is empty. The images are decoded once here, in threads, so that no training step meets an image it
cannot read.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ImageError, one_line
from ..images import load_image  # here, not in the threads: imports in threads can deadlock
from .formats import read_items
from .llava import LlavaRecord, RecordError, image_label, parse_llava_record


@dataclass
class BadRecord:
    """A record left out: its id, the kind of problem (`llava.BAD_KINDS`) and a one-line reason."""

    id: str
    kind: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "kind": self.kind, "reason": self.reason}


@dataclass
class RecordSet:
    """A dataset read by `load_records`.

    Attributes:
        records: the good records, in file order.
        bad: the records left out, in file order.
        format: the format read (never "auto").
        files: the files the records come from.
    """

    records: list[LlavaRecord]
    bad: list[BadRecord] = field(default_factory=list)
    format: str = "llava"
    files: list[Path] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.records) + len(self.bad)

    def bad_counts(self) -> dict[str, int]:
        """Bad records per kind, most frequent first."""
        counts: dict[str, int] = {}
        for b in self.bad:
            counts[b.kind] = counts.get(b.kind, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def load_records(
    path: str | Path, fmt: str = "auto", image_root: str | Path = "", *, check_images: bool = True
) -> RecordSet:
    """Read a dataset in any format (`formats.FORMATS`) and check every record.

    Args:
        path: the dataset: a LLaVA JSON/JSONL file, an imagefolder (or its metadata.jsonl), a COCO
            captions JSON, or WebDataset shards (a folder of .tar files, one .tar, a brace pattern).
        fmt: the format, or "auto" to tell it from the path (`formats.detect_format`).
        image_root: the folder relative image paths start from; "" for the data file's folder.
        check_images: check that every image exists and decodes (off: only the text is checked).

    Returns:
        The good records and the bad ones; shards are streamed once, and checked as they are read.
        A dataset that cannot be read at all (no such file, not JSON, a damaged shard) raises
        `DatasetError`.
    """
    raw = read_items(path, fmt, image_root)
    base = raw.base.resolve()
    checked: list[LlavaRecord | RecordError] = []
    sources: list[str] = []
    for index, (item, source) in enumerate(raw.items):  # the text, as it is read (or streamed)
        sources.append(source)
        if isinstance(item, RecordError):
            checked.append(item)
            continue
        try:
            checked.append(parse_llava_record(item, index, base, source, check_images, strict=True))
        except RecordError as exc:
            checked.append(exc)
    if check_images:
        _check_decoding(checked, sources)
    records = [r for r in checked if isinstance(r, LlavaRecord)]
    bad = [BadRecord(r.record_id, r.kind, str(r)) for r in checked if isinstance(r, RecordError)]
    return RecordSet(records, bad, raw.format, raw.files)


def read_records(
    path: str | Path, fmt: str = "auto", image_root: str | Path = "", *, check_images: bool = True
) -> RecordSet:
    """Read a dataset in any format (`formats.FORMATS`, as `load_records`), leniently and all or
    nothing: what LLaVA's own reader repairs is repaired (images without an `<image>` marker get one
    before the first question, an empty answer is read as one), and the first record that cannot be
    read raises its one-line `RecordError` (a `DatasetError`). The reader outside training
    (`visprompt eval --data`), where leaving a record out would change the score.

    Args:
        path, fmt, image_root: as for `load_records`.
        check_images: refuse image paths that name no file (images are not decoded here).

    Returns:
        A RecordSet with every record and no bad ones.
    """
    raw = read_items(path, fmt, image_root)
    base = raw.base.resolve()
    records = []
    for index, (item, source) in enumerate(raw.items):
        if isinstance(item, RecordError):
            raise item
        records.append(parse_llava_record(item, index, base, source, check_images))
    return RecordSet(records, [], raw.format, raw.files)


def _check_decoding(checked: list[LlavaRecord | RecordError], sources: list[str]) -> None:
    """Decode every distinct image of the good records once, in threads; a record with an image
    that does not decode is replaced, in place, by its `RecordError`."""
    images = list(dict.fromkeys(im for r in checked if isinstance(r, LlavaRecord) for im in r.images))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = dict(zip(images, pool.map(_decode_problem, images, chunksize=64)))
    for index, r in enumerate(checked):
        if isinstance(r, LlavaRecord):
            problem = next((problems[im] for im in r.images if problems[im]), None)
            if problem:
                message = f"{sources[index]}: record {index} (id {r.id!r}): {problem}"
                checked[index] = RecordError(message, "unreadable_image", r.id)


def _decode_problem(image: str | bytes) -> str | None:
    try:
        load_image(image)
    except ImageError as exc:
        return f"image {image_label(image)} cannot be read ({one_line(exc)})"
    return None
