"""Scores of answered items: per item (exact match, VQA accuracy, caption metrics) and per set.

Exact match compares with the gold reply (the record's own answer) after `normalize_answer`; VQA
accuracy uses every reference (vqa_accuracy.py); caption metrics score the captions of a set
together (CIDEr-D's document frequencies come from the set). Each task's primary score orders the
report's worst examples: VQA accuracy for answers, CIDEr-D for captions.
"""

from __future__ import annotations

from typing import Any

from .captions import CaptionScores, TokenizedCaptions, score_captions, tokenize_captions
from .items import EvalItem
from .metrics import exact_match
from .vqa_accuracy import vqa_accuracy

PRIMARY = {"vqa": "vqa_accuracy", "caption": "CIDEr-D"}


def tokenized_captions(
    items: list[EvalItem], answers: dict[str, str], use_java: bool | None = None
) -> TokenizedCaptions | None:
    """The caption items' predictions and references, tokenized once (None without caption items)."""
    captions = [it for it in items if it.task == "caption"]
    if not captions:
        return None
    predictions = {it.id: answers[it.id] for it in captions}
    return tokenize_captions(predictions, {it.id: it.references for it in captions}, use_java)


def item_scores(
    items: list[EvalItem], answers: dict[str, str], captions: CaptionScores | None
) -> dict[str, dict[str, float]]:
    """Item id -> metric -> score; `captions` holds the caption items' scores (computed together)."""
    scores = {
        it.id: {
            "exact_match": float(exact_match(answers[it.id], it.references[0])),
            "vqa_accuracy": vqa_accuracy(answers[it.id], it.references),
        }
        for it in items
    }
    if captions is not None:
        for metric, per_item in captions.per_item.items():
            for item_id, value in per_item.items():
                scores[item_id][metric] = value
    return scores


def set_scores(
    items: list[EvalItem],
    scores: dict[str, dict[str, float]],
    captions: TokenizedCaptions | None,
    scored: CaptionScores | None = None,
) -> dict[str, Any]:
    """Task -> metrics over `items`: mean exact match and VQA accuracy for answers; corpus BLEU-4,
    ROUGE-L, CIDEr-D for captions, and METEOR when `scored` (the whole set's caption scores, computed
    once) is given: a subset's METEOR would start its Java scorer again."""
    out: dict[str, Any] = {}
    for task in ("vqa", "caption"):
        chosen = [it for it in items if it.task == task]
        if not chosen:
            continue
        n = len(chosen)
        if task == "vqa":
            out[task] = {
                "items": n,
                "exact_match": sum(scores[it.id]["exact_match"] for it in chosen) / n,
                "vqa_accuracy": sum(scores[it.id]["vqa_accuracy"] for it in chosen) / n,
            }
        else:
            result = scored or score_captions(captions, [it.id for it in chosen], meteor=False)
            out[task] = {"items": n, **result.corpus, "tokenizer": result.tokenizer}
    return out
