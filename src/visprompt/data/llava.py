"""Read and write datasets in the LLaVA conversation format.

A LLaVA file is a JSON list (or JSONL, one record per line) of records like::

    {"id": "0", "image": "images/0.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "a cat"}]}

`image` may be a string, a list of strings (several images) or absent (text-only). Image paths are
relative to the folder holding the JSON file (or to `base_dir`); an image may also be given as its
encoded bytes (records read from WebDataset shards, `shards.ShardImage`). This module is generic: it knows nothing about any
particular dataset, and keeps every unknown key of a record in `LlavaRecord.extra`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DatasetError, one_line
from ..models.chat import IMAGE_TOKEN

# Role names seen in the wild; normalised to LLaVA's own "human" / "gpt".
_HUMAN_ROLES = {"human", "user"}
_GPT_ROLES = {"gpt", "assistant"}
_SYSTEM_ROLES = {"system"}
_CORE_KEYS = {"id", "image", "images", "conversations"}

# What is wrong with a record, for RecordError.kind (counted per kind in a bad-record report).
BAD_KINDS = ("format", "missing_image", "unreadable_image", "placeholders", "roles", "empty_answer")


class RecordError(DatasetError):
    """One record is unusable: `kind` (one of BAD_KINDS) says why, `record_id` names it."""

    def __init__(self, message: str, kind: str, record_id: str):
        super().__init__(message)
        self.kind, self.record_id = kind, record_id


@dataclass
class LlavaRecord:
    """One conversation about zero or more images.

    `turns` are (human, gpt) pairs; the first human turn carries one `<image>` marker per image
    (inserted on load when the file had none, unless read strictly). `images` are absolute paths, or
    an image's encoded bytes (`shards.ShardImage`, named by shard and member).
    """

    id: str
    images: list[str | bytes] = field(default_factory=list)
    turns: list[tuple[str, str]] = field(default_factory=list)
    system: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_llava_records(path: str | os.PathLike, *, check_images: bool = True) -> list[LlavaRecord]:
    """Load a LLaVA JSON list or JSONL file; raise `DatasetError` (one line) on any format problem."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read dataset file ({one_line(exc)})") from None
    items = parse_json_or_jsonl(text, path)
    return parse_llava_records(items, base_dir=path.parent, source=str(path), check_images=check_images)


def parse_llava_records(
    items: Iterable[Any],
    *,
    base_dir: str | os.PathLike = ".",
    source: str = "<memory>",
    check_images: bool = True,
) -> list[LlavaRecord]:
    """Validate already-decoded LLaVA records; `source` names them in error messages."""
    base = Path(base_dir).resolve()
    return [parse_llava_record(item, i, base, source, check_images) for i, item in enumerate(items)]


def save_llava_records(records: Iterable[LlavaRecord], path: str | os.PathLike) -> None:
    """Write records as a JSON list (or JSONL when the name ends in .jsonl).

    Images inside the file's folder are written as relative paths so the dataset folder can be moved.
    """
    path = Path(path)
    base = path.parent.resolve()
    out = [_record_to_json(rec, base) for rec in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in out)
    else:
        text = json_list_text(out)
    path.write_text(text, encoding="utf-8")


def json_list_text(items: Iterable[Any]) -> str:
    """A JSON list with one compact record per line: valid JSON, small, and readable with grep/diff."""
    lines = [json.dumps(item, ensure_ascii=False, separators=(",", ":")) for item in items]
    return "[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n"


# ---------------------------------------------------------------------------------------------------


def parse_json_or_jsonl(text: str, path: Path) -> list[Any]:
    """The records of a JSON list or a JSONL text (`path` names the file in errors)."""
    stripped = text.strip()
    if not stripped:
        raise DatasetError(f"{path}: dataset file is empty")
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as exc:
        # Not one JSON document: read it as JSONL, but only if it looks like one object per line.
        if not stripped.startswith("{"):
            raise DatasetError(f"{path}: not valid JSON ({one_line(exc)})") from None
    else:
        if isinstance(data, list):
            return data
        if isinstance(data, dict):  # a one-line JSONL file
            return [data]
        raise DatasetError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: line {lineno}: not valid JSON ({one_line(exc)})") from None
    return items


def parse_llava_record(
    item: Any, index: int, base: Path, source: str, check_images: bool = True, strict: bool = False
) -> LlavaRecord:
    """One decoded LLaVA record -> LlavaRecord, or `RecordError` (one line, with its kind and id).

    Args:
        item: the record as decoded from JSON (images as paths, or as encoded bytes).
        index: its position in the file: its id when it has none, and its place in messages.
        base: the folder relative image paths start from.
        source: what error messages name as the record's origin (a file, a shard).
        check_images: refuse image paths that name no file.
        strict: also refuse what a lenient reader repairs or lets through: images without any
            `<image>` marker (else inserted before the first question) and empty answers.

    Returns:
        The record, image paths made absolute.
    """
    rec_id = str(item["id"]) if isinstance(item, dict) and isinstance(item.get("id"), (str, int)) else str(index)

    def fail(msg: str, kind: str = "format") -> RecordError:
        where = f"record {index}"
        if isinstance(item, dict) and "id" in item:
            where += f" (id {one_line(item['id'])!r})"
        return RecordError(f"{source}: {where}: {one_line(msg, limit=2000)}", kind, rec_id)

    if not isinstance(item, dict):
        raise fail(f"expected a JSON object, got {type(item).__name__}")

    # --- images
    if "image" in item and "images" in item:
        raise fail("has both 'image' and 'images'")
    raw = item.get("image", item.get("images"))
    if raw is None:
        raw_images: list[Any] = []
    elif isinstance(raw, str):
        raw_images = [raw]
    elif isinstance(raw, list):
        raw_images = raw
    else:
        raise fail(f"'image' must be a string or a list of strings, got {type(raw).__name__}")
    images = []
    for rel in raw_images:
        if isinstance(rel, bytes) and rel:  # an image's encoded bytes, as read from a shard
            images.append(rel)
            continue
        if not isinstance(rel, str) or not rel:
            raise fail(f"image path must be a non-empty string, got {one_line(repr(rel), limit=80)}")
        full = Path(rel) if os.path.isabs(rel) else base / rel
        if check_images and not full.is_file():
            raise fail(f"image file not found: {full}", "missing_image")
        images.append(str(full))

    # --- conversations
    conv = item.get("conversations")
    if conv is None:
        raise fail("missing 'conversations'")
    if not isinstance(conv, list) or not conv:
        raise fail("'conversations' must be a non-empty list")
    system_parts: list[str] = []
    messages: list[tuple[str, str]] = []  # (role, value) after the leading system entries
    for j, entry in enumerate(conv):
        if not isinstance(entry, dict) or not isinstance(entry.get("from"), str) or "value" not in entry:
            raise fail(f"conversation entry {j} must be an object with 'from' and 'value'")
        value = entry["value"]
        if not isinstance(value, str):
            raise fail(f"conversation entry {j}: 'value' must be a string")
        role = entry["from"].lower()
        if role in _SYSTEM_ROLES:
            if messages:
                raise fail(f"conversation entry {j}: 'system' only allowed before the first human turn")
            system_parts.append(value)
        elif role in _HUMAN_ROLES or role in _GPT_ROLES:
            messages.append(("human" if role in _HUMAN_ROLES else "gpt", value))
        else:
            raise fail(f"conversation entry {j}: unknown role {entry['from']!r}", "roles")
    if not messages:
        raise fail("no human/gpt turns in 'conversations'", "roles")
    for k, (role, _) in enumerate(messages):
        expected = "human" if k % 2 == 0 else "gpt"
        if role != expected:
            raise fail(f"turn {k} is {role!r}, expected {expected!r} (turns must alternate human/gpt)", "roles")
    if len(messages) % 2:
        raise fail("last human turn has no gpt answer", "roles")
    turns = [(messages[k][1], messages[k + 1][1]) for k in range(0, len(messages), 2)]

    # --- <image> markers: exactly one per image, only in human turns
    if strict and any(not gpt.strip() for _, gpt in turns):
        raise fail("an empty gpt answer", "empty_answer")
    if any(IMAGE_TOKEN in gpt for _, gpt in turns):
        raise fail(f"{IMAGE_TOKEN} marker in a gpt turn", "placeholders")
    n_markers = sum(human.count(IMAGE_TOKEN) for human, _ in turns)
    if images and n_markers == 0 and not strict:
        # LLaVA's own convention: images without markers go before the first question.
        turns[0] = ((IMAGE_TOKEN + "\n") * len(images) + turns[0][0], turns[0][1])
    elif n_markers != len(images):
        raise fail(f"{n_markers} {IMAGE_TOKEN} marker(s) but {len(images)} image(s)", "placeholders")

    if "id" in item and not isinstance(item["id"], (str, int)):
        raise fail("'id' must be a string or an integer")
    extra = {k: v for k, v in item.items() if k not in _CORE_KEYS}
    return LlavaRecord(
        id=rec_id,
        images=images,
        turns=turns,
        system="\n".join(system_parts) if system_parts else None,
        extra=extra,
    )


def record_conversation(record: LlavaRecord, default_system: str = "") -> list[dict[str, Any]]:
    """The record as a conversation of chat messages (the form `generate` and chat templates take).

    Each human turn becomes a user message whose content lists its text and, where an `<image>` marker
    stood, an image part with the next of the record's images (the newline after a marker is part of
    the marker); each gpt turn becomes an assistant message. The record's system text, else
    `default_system`, opens the conversation as a system message.
    """
    system = record.system or default_system
    conversation: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    images = iter(record.images)
    for human, gpt in record.turns:
        content: list[dict[str, Any]] = []
        for k, piece in enumerate(human.split(IMAGE_TOKEN)):
            if k > 0:
                content.append({"type": "image", "image": next(images)})
                piece = piece.removeprefix("\n")
            if piece:
                content.append({"type": "text", "text": piece})
        conversation.append({"role": "user", "content": content})
        conversation.append({"role": "assistant", "content": gpt})
    return conversation


def _record_to_json(rec: LlavaRecord, base: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rec.id}
    paths = [_relative_if_inside(p, base) for p in rec.images]
    if len(paths) == 1:
        out["image"] = paths[0]
    elif paths:
        out["image"] = paths
    conv = []
    if rec.system is not None:
        conv.append({"from": "system", "value": rec.system})
    for human, gpt in rec.turns:
        conv.append({"from": "human", "value": human})
        conv.append({"from": "gpt", "value": gpt})
    out["conversations"] = conv
    for key, value in rec.extra.items():
        if key not in _CORE_KEYS:
            out[key] = value
    return out


def _relative_if_inside(image: str, base: Path) -> str:
    full = Path(image).resolve()
    try:
        return full.relative_to(base).as_posix()
    except ValueError:
        return str(full)


def image_label(image: str | bytes) -> str:
    """How messages name a record's image: its path, or where its bytes came from."""
    if isinstance(image, str):
        return image
    return getattr(image, "name", None) or f"<{len(image)} bytes of image>"
