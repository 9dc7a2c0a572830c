"""The questions of an evaluation: one item per reply turn of each LLaVA record, with its references,
its task (short answers or captions) and the group it is reported under.

Record fields read (besides LLaVA's own): `answers` (VQAv2's ten annotator answers, strings or
{"answer": ...}) or `references` (several human captions, as COCO's five) for a one-turn record;
`task` ("vqa" or "caption"; otherwise captions are told by their length: references of four words
or more on average); and the `--by` field, a value per record or a list with one per turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data.llava import LlavaRecord
from .vqa import record_turn_conversations

TASKS = ("vqa", "caption")
DEFAULT_BY = ("question_type", "kinds")  # the first one the records carry is the default breakdown


@dataclass
class EvalItem:
    id: str  # "<record id>#<turn>"
    conversation: list[dict[str, Any]]  # up to the turn's question (gold answers before it)
    question: str
    references: list[str]  # the gold reply first
    task: str  # "vqa" | "caption"
    group: str  # the breakdown value ("all" without one)
    image: str | None  # the record's first image, for the report's thumbnail


def default_by(records: list[LlavaRecord]) -> str | None:
    for name in DEFAULT_BY:
        if any(name in r.extra for r in records):
            return name
    return None


def _references(record: LlavaRecord, gold: str, n_turns: int) -> list[str]:
    extra = record.extra.get("answers") or record.extra.get("references")
    if n_turns != 1 or not isinstance(extra, list) or not extra:
        return [gold]
    refs = [a.get("answer", "") if isinstance(a, dict) else str(a) for a in extra]
    return refs if gold in refs else [gold, *refs]


def _task(record: LlavaRecord, refs: list[str]) -> str:
    task = record.extra.get("task")
    if task in TASKS:
        return task
    words = sum(len(r.split()) for r in refs) / len(refs)
    return "caption" if words >= 4 else "vqa"


def _group(record: LlavaRecord, by: str | None, turn: int, n_turns: int) -> str:
    if by is None:
        return "all"
    value = record.extra.get(by)
    if isinstance(value, list) and len(value) == n_turns:
        value = value[turn]
    return "-" if value is None else str(value)


def eval_items(records: list[LlavaRecord], by: str | None) -> list[EvalItem]:
    """Every reply turn of every record as an EvalItem, in order."""
    items = []
    for record in records:
        turns = record_turn_conversations(record)
        for i, (conversation, gold) in enumerate(turns):
            refs = _references(record, gold, len(turns))
            question = " ".join(p["text"] for p in conversation[-1]["content"] if p.get("text")).strip()
            items.append(
                EvalItem(
                    id=f"{record.id}#{i}",
                    conversation=conversation,
                    question=question,
                    references=refs,
                    task=_task(record, refs),
                    group=_group(record, by, i, len(turns)),
                    image=record.images[0] if record.images else None,
                )
            )
    return items
