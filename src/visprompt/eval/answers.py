"""answers.jsonl: the evaluation's answers, one JSON object per line, appended as they come.

Each line is written by one `write` on a file opened for appending and the file is synced after
every batch, so a killed run leaves whole lines and at most one cut last line; reading drops that
cut line (and `AnswerLog` cuts it off the file before appending), so `--resume` asks only the
questions without an answer and never asks one again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ANSWERS_NAME = "answers.jsonl"


def read_answers(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Item id -> its answer line, from a (possibly cut) answers file; {} when there is none."""
    path = Path(path)
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_bytes().split(b"\n"):
        try:
            row = json.loads(line)
        except ValueError:  # the cut last line of a killed run (or an empty one)
            continue
        if isinstance(row, dict) and "id" in row:
            out[str(row["id"])] = row
    return out


class AnswerLog:
    """Appends answer lines to `path` (created, or kept and cut to its last whole line)."""

    def __init__(self, path: str | os.PathLike, fresh: bool):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                os.truncate(self.path, keep)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Write each row as one line (one `write` each), then sync the file."""
        for row in rows:
            os.write(self._fd, (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AnswerLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
