"""Dataset formats -> LLaVA-shaped items (`{"id", "image", "conversations"}` dicts), which
`records.load_records` checks and turns into `LlavaRecord`s, the same for every format.

- `llava`: a LLaVA JSON list or JSONL file (`llava.py`).
- `imagefolder`: a folder with `metadata.jsonl` (Hugging Face datasets' convention): one row per
  record, `file_name` (a path, or a list of paths, relative to the folder) and its text: a
  `conversations` column, or `question` and `answer`, or a caption (`caption` or `text`).
- `coco`: COCO captions JSON (`images` with `id` and `file_name`, `annotations` with `image_id` and
  `caption`): one caption record per annotation, the annotation's `id` as the record's id.
- `webdataset`: tar shards, streamed (`shards.py`).

A caption becomes one turn: `CAPTION_PROMPT` asks, the caption answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DatasetError, one_line
from ..models.chat import IMAGE_TOKEN
from .llava import RecordError, parse_json_or_jsonl

FORMATS = ("auto", "llava", "imagefolder", "coco", "webdataset")
CAPTION_PROMPT = f"{IMAGE_TOKEN}\nDescribe the image briefly."
METADATA_NAME = "metadata.jsonl"
_CAPTION_COLUMNS = ("caption", "text")


@dataclass
class RawItems:
    """A dataset's records as LLaVA-shaped items, not yet checked.

    Attributes:
        format: the format they were read in (never "auto").
        items: (item, source) pairs in file order; an item that could not even be read comes as a
            `RecordError`. Streamed for shards, a list otherwise.
        base: the folder relative image paths start from.
        files: the files the records come from (hashed into the run's data fingerprint).
    """

    format: str
    items: Iterable[tuple[dict[str, Any] | RecordError, str]]
    base: Path
    files: list[Path] = field(default_factory=list)


def detect_format(path: str | Path) -> str:
    """The format of `path`, from its name and, for a JSON file, its shape: a folder with
    `metadata.jsonl` is an imagefolder; a folder of `.tar` files, a `.tar` file or a brace pattern
    is WebDataset; a JSON object with `images` and `annotations` is COCO; rows with `file_name` are
    imagefolder metadata; any other JSON/JSONL is LLaVA."""
    p = Path(path)
    if p.is_dir():
        if (p / METADATA_NAME).is_file():
            return "imagefolder"
        if any(p.glob("*.tar")):
            return "webdataset"
        raise DatasetError(f"{path}: a folder without {METADATA_NAME} or .tar shards: not a dataset")
    if p.suffix == ".tar" or "{" in p.name:
        return "webdataset"
    return _json_format(_read_json(p), p)


def read_items(path: str | Path, fmt: str = "auto", image_root: str | Path = "") -> RawItems:
    """Read a dataset in format `fmt` ("auto": `detect_format`) as LLaVA-shaped items.

    Args:
        path: the dataset: a file, a folder or a shard pattern.
        fmt: one of FORMATS.
        image_root: the folder relative image paths start from; "" for the data file's folder.

    Returns:
        RawItems, with the format found.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"data_format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    p = Path(path)
    if fmt == "auto":
        fmt = detect_format(p)
    if fmt == "webdataset":
        from .shards import read_shard_samples, shard_urls

        files = [Path(u) for u in shard_urls(str(path))]
        return RawItems("webdataset", read_shard_samples(str(path)), Path("."), files)
    if fmt == "imagefolder" and p.is_dir():
        p = p / METADATA_NAME
    data = _read_json(p)
    base = Path(image_root) if image_root else p.parent
    found = _json_format(data, p)
    if found == "coco" and fmt != "coco":
        raise DatasetError(f"{p}: a COCO captions file, not {fmt}: set data_format to coco (or auto)")
    if fmt == "coco":
        if found != "coco":
            raise DatasetError(f"{p}: not a COCO captions file (a JSON object with 'images' and 'annotations')")
        return RawItems("coco", list(_coco_items(data, str(p))), base, [p])
    if fmt == "imagefolder":
        return RawItems("imagefolder", list(_imagefolder_items(data, str(p))), base, [p])
    return RawItems("llava", [(row, str(p)) for row in data], base, [p])


def item_from_row(row: dict[str, Any], images: list[Any], default_id: str) -> dict[str, Any] | RecordError:
    """A LLaVA-shaped item from a row of text columns and its images (imagefolder metadata, a
    shard's json): `conversations` (LLaVA's from/value or chat role/content messages), else
    `question` and `answer`, else a caption (`caption` or `text`). Other columns are kept."""
    if not isinstance(row, dict):
        msg = f"record {default_id}: expected a JSON object, got {type(row).__name__}"
        return RecordError(msg, "format", default_id)
    rid = str(row.get("id", default_id))
    rest = {k: v for k, v in row.items() if k not in ("conversations", "question", "answer", *_CAPTION_COLUMNS)}
    item: dict[str, Any] = {**rest, "id": row.get("id", default_id), "image": images}
    if "conversations" in row:
        item["conversations"] = _llava_conversation(row["conversations"])
    elif "question" in row or "answer" in row:
        q, a = row.get("question", ""), row.get("answer", "")
        question = q if not images or IMAGE_TOKEN in str(q) else IMAGE_TOKEN * len(images) + f"\n{q}"
        item["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": a}]
    else:
        caption = next((row[c] for c in _CAPTION_COLUMNS if c in row), None)
        if caption is None:
            cols = ", ".join(sorted(map(str, row))) or "none"
            return RecordError(
                f"record {rid}: no text: wanted conversations, question/answer, caption or text (columns: {cols})",
                "format",
                rid,
            )
        if not images:
            return RecordError(f"record {rid}: a caption without an image", "missing_image", rid)
        prompt = IMAGE_TOKEN * (len(images) - 1) + CAPTION_PROMPT
        item["conversations"] = [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption}]
    return item


# ---------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    """A COCO captions object, or the rows of a JSON list / JSONL file."""
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read dataset file ({one_line(exc)})") from None
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSONL
        if isinstance(data, dict) and "images" in data and "annotations" in data:
            return data
    return parse_json_or_jsonl(text, path)


def _json_format(data: Any, path: Path) -> str:
    if isinstance(data, dict):
        return "coco"
    first = next((row for row in data if isinstance(row, dict)), {})
    if path.name == METADATA_NAME or ("file_name" in first and "image" not in first):
        return "imagefolder"
    return "llava"


def _imagefolder_items(rows: list[Any], source: str) -> Iterator[tuple[dict[str, Any] | RecordError, str]]:
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            yield RecordError(f"{source}: row {i}: expected a JSON object", "format", str(i)), source
            continue
        names = row.get("file_name", [])
        images = names if isinstance(names, list) else [names]
        cols = {k: v for k, v in row.items() if k != "file_name"}
        yield item_from_row(cols, images, default_id=str(i)), source


def _coco_items(data: dict[str, Any], source: str) -> Iterator[tuple[dict[str, Any] | RecordError, str]]:
    files = {img.get("id"): img.get("file_name") for img in data.get("images") or [] if isinstance(img, dict)}
    for i, ann in enumerate(data.get("annotations") or []):
        rid = str(ann.get("id", i)) if isinstance(ann, dict) else str(i)
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            yield RecordError(f"{source}: annotation {rid}: wanted image_id and caption", "format", rid), source
            continue
        name = files.get(ann["image_id"])
        if not name:
            msg = f"{source}: annotation {rid}: image_id {ann['image_id']!r} is not in 'images'"
            yield RecordError(msg, "missing_image", rid), source
            continue
        row = {"id": ann.get("id", i), "caption": ann["caption"], "image_id": ann["image_id"]}
        yield item_from_row(row, [name], default_id=rid), source


def _llava_conversation(conv: Any) -> Any:
    """Chat messages (`role`/`content`, content a string or a list of text and image parts) as
    LLaVA entries (`from`/`value`, an image part as an `<image>` marker); LLaVA entries unchanged."""
    if not isinstance(conv, list):
        return conv  # parse_llava_record refuses it
    out = []
    for entry in conv:
        if isinstance(entry, dict) and "role" in entry and "from" not in entry:
            content = entry.get("content")
            if isinstance(content, list):
                content = "".join(
                    IMAGE_TOKEN + "\n" if isinstance(p, dict) and p.get("type") == "image" else _part_text(p)
                    for p in content
                )
            entry = {"from": entry["role"], "value": content}
        out.append(entry)
    return out


def _part_text(part: Any) -> str:
    return str(part.get("text", "")) if isinstance(part, dict) else str(part)
