"""Score a backend on LLaVA-format question/answer records: every reply turn is one question.

`evaluate` (also `visprompt.eval.evaluate`) scores exact match for the trainer's periodic
evaluation; `visprompt eval` (run.py) adds the answers log, resume, more metrics and reports. Both ask
their questions through `generate_in_batches`, the one loop.

Each turn is asked with the gold conversation before it (teacher forcing), so a record with five
turns gives five independent scores.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.llava import LlavaRecord, record_conversation
from ..data.records import read_records
from ..engine.backend import Backend, SamplingParams
from ..engine.backends.own import OwnVLMBackend
from .metrics import exact_match


@dataclass
class VQAReport:
    exact_match: float
    total: int
    by_kind: dict[str, float] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)  # first few mistakes, for the log

    def to_dict(self) -> dict[str, Any]:
        return {
            "exact_match": self.exact_match,
            "total": self.total,
            "by_kind": self.by_kind,
            "mistakes": self.examples,
        }


def record_turn_conversations(record: LlavaRecord) -> list[tuple[list[dict], str]]:
    """(conversation up to turn i's question, gold answer) for every turn of a record."""
    conversation = record_conversation(record)
    return [
        (conversation[: i + 1], conversation[i + 1]["content"])
        for i, message in enumerate(conversation)
        if message["role"] == "user"
    ]


def generate_in_batches(backend: Backend, conversations: Sequence[list[dict]], batch_size: int, params: SamplingParams):
    """Yield (start index, results) for consecutive batches of `conversations` (the evaluation loop
    `evaluate` and `run_evaluation` share)."""
    for start in range(0, len(conversations), batch_size):
        yield start, backend.generate(list(conversations[start : start + batch_size]), params)


def evaluate(
    backend: Backend | torch.nn.Module,
    records: Sequence[LlavaRecord] | str | os.PathLike,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 48,
    max_records: int = 0,
    keep_mistakes: int = 5,
) -> VQAReport:
    """Score a backend's answers on LLaVA-format records (normalised exact match).

    Args:
        backend: anything with the Backend protocol's `generate(conversations, SamplingParams)`, or a
            visprompt `VisionLanguageModel` (evaluated on its own backend, `OwnVLMBackend`).
        records: LLaVA records, or the path of a dataset in any format training reads.
        batch_size: conversations per `generate` call.
        max_new_tokens: the longest answer generated (greedy decoding).
        max_records: score only the first this many records (0: all).
        keep_mistakes: how many wrong answers the report quotes.

    Returns:
        A VQAReport: exact match over every turn, per question kind when the records name kinds
        (`extra["kinds"]`), and the first mistakes.
    """
    if isinstance(backend, torch.nn.Module):  # a model, not a backend
        backend = OwnVLMBackend(backend)
    if isinstance(records, (str, os.PathLike)):
        records = read_records(records).records
    if max_records:
        records = records[:max_records]
    items = []
    for rec in records:
        kinds = rec.extra.get("kinds") or []
        for i, (conv, gold) in enumerate(record_turn_conversations(rec)):
            items.append((conv, gold, kinds[i] if i < len(kinds) else "all"))
    params = SamplingParams(max_new_tokens=max_new_tokens)
    hits: dict[str, list[bool]] = defaultdict(list)
    mistakes = []
    for start, results in generate_in_batches(backend, [c for c, _, _ in items], batch_size, params):
        for (conv, gold, kind), res in zip(items[start : start + batch_size], results):
            ok = exact_match(res.text, gold)
            hits[kind].append(ok)
            if not ok and len(mistakes) < keep_mistakes:
                # The text parts of the last user turn, wherever the image sits among them.
                question = " ".join(part["text"] for part in conv[-1]["content"] if part.get("text")).strip()
                mistakes.append({"question": question, "gold": gold, "predicted": res.text})
    flat = [h for v in hits.values() for h in v]
    return VQAReport(
        exact_match=sum(flat) / max(1, len(flat)),
        total=len(flat),
        by_kind={k: sum(v) / len(v) for k, v in sorted(hits.items())} if len(hits) > 1 else {},
        examples=mistakes,
    )
