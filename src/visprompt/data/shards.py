"""WebDataset tar shards -> LLaVA-shaped records, read as a stream (nothing is unpacked to disk).

A sample is the tar members sharing a key (`000042.jpg`, `000042.json`): its images are the members
named `jpg`, `jpeg`, `png` or `webp`, then numbered ones (`0.jpg`, `1.png`, ... for several images,
in number order); its text is a `json` member (a conversation list, or an object with
`conversations`, a caption or a question and answer, as in an imagefolder's metadata rows) or a
`txt` member (a caption). The sample's `__key__` is the record's id. Images stay encoded, as
`ShardImage` bytes named after their shard and member.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DatasetError, one_line
from .llava import RecordError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_NUMBERED = re.compile(r"^(\d+)\.(" + "|".join(IMAGE_EXTENSIONS) + r")$")


class ShardImage(bytes):
    """An image's encoded bytes, read from a shard; `name` ("SHARD:KEY.EXT") says where it came from."""

    name: str

    def __new__(cls, data: bytes, name: str) -> ShardImage:
        obj = super().__new__(cls, data)
        obj.name = name
        return obj

    def __reduce__(self):
        return ShardImage, (bytes(self), self.name)

    def __repr__(self) -> str:
        return f"ShardImage({self.name!r}, {len(self)} bytes)"


def shard_urls(path: str) -> list[str]:
    """The shard files of `path`: a folder's `*.tar` files (sorted), one `.tar` file, or a brace
    pattern (`data/train-{000..009}.tar`); a `DatasetError` names the first that does not exist."""
    import webdataset as wds

    if Path(path).is_dir():
        urls = sorted(str(p) for p in Path(path).glob("*.tar"))
        if not urls:
            raise DatasetError(f"{path}: no .tar shards in this folder")
        return urls
    urls = wds.shardlists.expand_urls(path)
    for url in urls:
        if not Path(url).is_file():
            raise DatasetError(f"{url}: shard not found")
    return urls


def sample_images(sample: dict[str, Any]) -> list[tuple[str, bytes]]:
    """(extension, encoded bytes) of a sample's images: an unnumbered one first, then by number."""
    plain = [(ext, sample[ext]) for ext in IMAGE_EXTENSIONS if ext in sample]
    numbered = sorted((int(m.group(1)), ext) for ext in sample if (m := _NUMBERED.match(ext)))
    return plain + [(ext, sample[ext]) for _, ext in numbered]


def read_shard_samples(path: str) -> Iterator[tuple[dict[str, Any] | RecordError, str]]:
    """Stream the shards of `path`, sample by sample, as (LLaVA-shaped item, source) pairs.

    Args:
        path: a folder of `.tar` shards, one shard, or a brace pattern of shards.

    Returns:
        An iterator of pairs: the item holds what the sample says, unchecked
        (`formats.item_from_row` builds it); a sample whose text cannot be decoded comes as a
        `RecordError` instead, for the caller to report under its key. `source` is "SHARD:KEY".
        A shard that is not a readable tar file raises `DatasetError`.
    """
    import webdataset as wds

    from .formats import item_from_row

    for url in shard_urls(path):
        try:
            for sample in wds.tarfile_samples([{"url": url}]):
                key = sample["__key__"]
                source = f"{url}:{key}"
                images = [ShardImage(data, f"{url}:{key}.{ext}") for ext, data in sample_images(sample)]
                try:
                    row = _sample_text(sample)
                except ValueError as exc:  # UnicodeDecodeError and json's errors included
                    yield RecordError(f"{source}: {one_line(exc)}", "format", key), source
                    continue
                yield item_from_row(row, images, default_id=key), source
        except DatasetError:
            raise
        except Exception as exc:  # tarfile and webdataset raise several kinds for a damaged shard
            raise DatasetError(f"{url}: not a readable tar shard ({one_line(exc)})") from None


def _sample_text(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample's text as an imagefolder-style row: its `json` (a conversation list becomes
    `conversations`), else its `txt` as a caption; `id` defaults to the key."""
    if "json" in sample:
        data = json.loads(sample["json"].decode("utf-8"))
        row = {"conversations": data} if isinstance(data, list) else data
        if not isinstance(row, dict):
            raise ValueError(f"json member must be an object or a list, got {type(data).__name__}")
        return row
    if "txt" in sample:
        return {"caption": sample["txt"].decode("utf-8").strip()}
    raise ValueError(f"no json or txt member (members: {', '.join(sorted(k for k in sample if k[:2] != '__'))})")
