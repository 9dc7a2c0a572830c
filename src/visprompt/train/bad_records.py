"""Bad training records, said before training starts: one summary line on stderr, the first ids
with their reasons, and every one in OUTPUT/bad_records.json; then skipped, or the run refused
(`on_bad_record: fail`, a one-line `DatasetError`: exit code 2)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..data.records import RecordSet
from ..errors import DatasetError
from ..files import atomic_write_text

BAD_RECORDS_NAME = "bad_records.json"
SHOWN = 20  # ids listed on stderr; the file has them all


def report_bad_records(splits: dict[str, tuple[str, RecordSet]], out: Path, on_bad: str, main: bool = True) -> None:
    """Say which records are bad and what happens to them.

    Args:
        splits: split name ("train", "eval") -> (the data path, its RecordSet).
        out: the run folder: `bad_records.json` is written there when a record is bad (and a stale
            one from an earlier run removed when none is).
        on_bad: "skip" (train on the rest) or "fail" (raise).
        main: whether this process prints and writes (the main one of several).

    Raises:
        DatasetError: with `on_bad == "fail"` and a bad record, naming the count and the first ids;
            or when every training record is bad.
    """
    bad = {split: rs for split, (_, rs) in splits.items() if rs.bad}
    path = out / BAD_RECORDS_NAME
    if not bad:
        if main and path.exists():
            path.unlink()
        return
    n = sum(len(rs.bad) for rs in bad.values())
    ids = [b.id for rs in bad.values() for b in rs.bad]
    first = ", ".join(ids[:SHOWN]) + (f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else "")
    if main:
        report = {
            split: {
                "data": data,
                "format": rs.format,
                "records": rs.total,
                "bad": len(rs.bad),
                "by_kind": rs.bad_counts(),
                "bad_records": [b.to_dict() for b in rs.bad],
            }
            for split, (data, rs) in splits.items()
        }
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        parts = [
            f"{split} {len(rs.bad)} of {rs.total} ({', '.join(f'{k} {v}' for k, v in rs.bad_counts().items())})"
            for split, rs in bad.items()
        ]
        action = "refusing to train (on_bad_record: fail)" if on_bad == "fail" else "skipped"
        print(f"bad records: {'; '.join(parts)}, {action}; all in {path}", file=sys.stderr)
        for split, rs in bad.items():
            for b in rs.bad[:SHOWN]:
                print(f"  {split} {b.id!r}: {b.kind}: {b.reason}", file=sys.stderr)
        sys.stderr.flush()
    if on_bad == "fail":
        raise DatasetError(f"{n} bad record(s) (on_bad_record: fail): first ids {first}; see {path}")
    if "train" in bad and not bad["train"].records:
        data, rs = splits["train"]
        raise DatasetError(f"{data}: all {rs.total} records are bad, nothing to train on; see {path}")
