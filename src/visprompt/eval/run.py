"""`visprompt eval`: answer every question of a split through a backend, in batches, log the answers
as they come (answers.jsonl, resumable), score them and write the reports."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.llava import LlavaRecord
from ..data.records import read_records
from ..engine.backend import Backend, SamplingParams
from ..engine.backends.own import OwnVLMBackend
from ..errors import VispromptError
from ..files import atomic_write_text
from .answers import ANSWERS_NAME, AnswerLog, read_answers
from .items import EvalItem, default_by, eval_items
from .progress import EvalProgress
from .report import write_reports
from .scoring import PRIMARY, item_scores, set_scores, tokenized_captions
from .vqa import generate_in_batches

RUN_NAME = "run.json"  # what the answers in a folder were made with; --resume checks it
WORST = 20  # examples the reports quote


def _check_run(folder: Path, run: dict[str, Any], resume: bool) -> None:
    path = folder / RUN_NAME
    if not resume:
        atomic_write_text(path, json.dumps(run, indent=2) + "\n")
        return
    if not (folder / ANSWERS_NAME).is_file():
        raise VispromptError(f"nothing to resume in {folder}: it has no {ANSWERS_NAME}")
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        before = None
    if before is not None and before != run:
        changed = sorted(k for k in run if before.get(k) != run[k])
        raise VispromptError(f"{folder} holds answers of another run ({', '.join(changed)} changed): drop --resume")


def run_evaluation(
    backend: Backend | torch.nn.Module,
    data: str | os.PathLike | Sequence[LlavaRecord],
    *,
    output: str | os.PathLike | None = None,
    resume: bool = False,
    by: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    max_records: int = 0,
    model_name: str = "",
    progress: bool | None = None,
    use_java: bool | None = None,
    data_format: str = "auto",
    image_root: str = "",
) -> dict[str, Any]:
    """Answer, score and report a split.

    Args:
        backend: any Backend, or a visprompt VisionLanguageModel.
        data: a dataset in any format training reads (`data_format`), or its records.
        output: the folder for answers.jsonl, run.json and the reports (None: nothing written).
        resume: keep the folder's answers and ask only the questions without one.
        by: the record field to break the scores down by (default: question_type, else kinds).
        batch_size: questions per `generate` call.
        max_new_tokens: the longest answer (greedy decoding).
        max_records: only the first this many records (0: all).
        model_name: how the report names the model.
        progress: show a progress bar (None: on a terminal).
        use_java: caption tokenization and METEOR through Java (None: when Java is found).
        data_format: the format of `data` (`data.formats.FORMATS`; auto: told from the path).
        image_root: relative image paths start here ("" = the data file's folder).

    Returns:
        The report (as written to report.json).
    """
    if isinstance(backend, torch.nn.Module):
        backend = OwnVLMBackend(backend)
    if resume and output is None:
        raise VispromptError("--resume needs --output (the folder holding the answers so far)")
    records = eval_records(data, data_format, image_root) if isinstance(data, (str, os.PathLike)) else list(data)
    if max_records:
        records = records[:max_records]
    by = by or default_by(records)
    items = eval_items(records, by)
    name = model_name or getattr(backend, "name", "model")
    run = {"model": name, "data": str(data) if isinstance(data, (str, os.PathLike)) else "<records>"}
    run.update(max_records=max_records, max_new_tokens=max_new_tokens)
    run.update({k: v for k, v in (("data_format", data_format), ("image_root", image_root)) if v not in ("auto", "")})
    answers: dict[str, str] = {}
    log = None
    if output is not None:
        folder = Path(output)
        folder.mkdir(parents=True, exist_ok=True)
        _check_run(folder, run, resume)
        if resume:
            answers = {k: row["answer"] for k, row in read_answers(folder / ANSWERS_NAME).items()}
        log = AnswerLog(folder / ANSWERS_NAME, fresh=not resume)
    todo = [it for it in items if it.id not in answers]
    bar = EvalProgress(len(items), len(items) - len(todo), progress)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    try:
        for start, results in generate_in_batches(backend, [it.conversation for it in todo], batch_size, params):
            batch = todo[start : start + batch_size]
            rows = [_row(it, res.text) for it, res in zip(batch, results)]
            if log is not None:
                log.append(rows)
            answers.update((row["id"], row["answer"]) for row in rows)
            bar.advance(len(batch))
    finally:
        bar.close()
        if log is not None:
            log.close()
    report = build_report(items, answers, run, by, asked=len(todo), use_java=use_java)
    if output is not None:
        write_reports(output, report, {it.id: it.image for it in items})
    return report


def eval_records(path: str | os.PathLike, data_format: str = "auto", image_root: str = "") -> list[LlavaRecord]:
    """The records of a dataset in any format training reads (`data.records.read_records`). COCO
    captions come one record per annotation; here the captions of one image become one record with
    every caption as a reference (as COCO's caption evaluation scores an image against all five)."""
    found = read_records(path, data_format, image_root)
    if found.format != "coco":
        return found.records
    by_image: dict[Any, list[LlavaRecord]] = {}
    for rec in found.records:
        by_image.setdefault(rec.extra.get("image_id"), []).append(rec)
    grouped = []
    for image_id, recs in by_image.items():
        first = recs[0]
        extra = {**first.extra, "references": [r.turns[0][1] for r in recs], "task": "caption"}
        grouped.append(LlavaRecord(str(image_id), first.images, first.turns, first.system, extra))
    return grouped


def _row(item: EvalItem, answer: str) -> dict[str, Any]:
    return {"id": item.id, "question": item.question, "answer": answer, "references": item.references}


def build_report(
    items: list[EvalItem],
    answers: dict[str, str],
    run: dict[str, Any],
    by: str | None,
    asked: int = 0,
    use_java: bool | None = None,
) -> dict[str, Any]:
    """Scores overall, per task and per group, and the worst examples."""
    from .captions import score_captions

    captions = tokenized_captions(items, answers, use_java)
    scored = score_captions(captions) if captions is not None else None
    scores = item_scores(items, answers, scored)
    groups: dict[str, list[EvalItem]] = {}
    for it in items:
        groups.setdefault(it.group, []).append(it)
    worst = sorted(items, key=lambda it: (scores[it.id][PRIMARY[it.task]], it.id))[:WORST]
    tasks = set_scores(items, scores, captions, scored)
    return {
        **run,
        "items": len(items),
        "asked": asked,
        "exact_match": sum(s["exact_match"] for s in scores.values()) / max(1, len(items)),
        "tasks": tasks,
        "by": by,
        "groups": {g: set_scores(its, scores, captions) for g, its in sorted(groups.items())} if by else {},
        "worst": [
            {
                "id": it.id,
                "question": it.question,
                "answer": answers[it.id],
                "references": it.references,
                "metric": PRIMARY[it.task],
                "score": scores[it.id][PRIMARY[it.task]],
            }
            for it in worst
        ],
    }
