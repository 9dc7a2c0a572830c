"""The evaluation's reports: report.json (everything), report.md (overall scores, the breakdown and
the worst examples) and report.html (the worst examples with thumbnails, answers and references).
Every file is written atomically; all text in the HTML is escaped."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from ..files import atomic_write_text

THUMBNAIL_PX = 96
_ORDER = ("items", "exact_match", "vqa_accuracy", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def _metrics(task_scores: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, task_scores[k]) for k in _ORDER if k in task_scores]


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_report(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation of {report['model']}", "", f"Data: `{report['data']}`, {report['items']} questions.", ""]
    for task, scores in report["tasks"].items():
        metrics = _metrics(scores)
        lines += [f"## {task}", "", "| " + " | ".join(k for k, _ in metrics) + " |"]
        lines += ["|" + "---|" * len(metrics), "| " + " | ".join(_fmt(v) for _, v in metrics) + " |", ""]
        if "tokenizer" in scores:
            lines += [f"Captions tokenized by the {scores['tokenizer']}.", ""]
    if report.get("by"):
        lines += [f"## By {report['by']}", ""]
        for task in report["tasks"]:
            rows = [(g, s[task]) for g, s in report["groups"].items() if task in s]
            if not rows:
                continue
            names = [k for k, _ in _metrics(rows[0][1])]
            lines += [f"| {report['by']} ({task}) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            lines += ["| " + " | ".join([group] + [_fmt(s[k]) for k in names]) + " |" for group, s in rows]
            lines.append("")
    lines += ["## Worst examples", "", "| id | question | answer | references | score |", "|---|---|---|---|---|"]
    for ex in report["worst"]:
        cells = [
            ex["id"],
            ex["question"],
            ex["answer"],
            " / ".join(ex["references"][:5]),
            f"{ex['metric']} {ex['score']:.3f}",
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    lines += ["", "Thumbnails of these: report.html.", ""]
    return "\n".join(lines)


def thumbnail_data_url(path: str | None, size: int = THUMBNAIL_PX) -> str | None:
    """A small PNG of the image as a data: URL (None when there is no readable image)."""
    if not path:
        return None
    try:
        from ..images import load_image

        image = load_image(path)
    except Exception:  # noqa: BLE001 - a report shows what it can; a missing image is not fatal
        return None
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def html_report(report: dict[str, Any], images: dict[str, str | None]) -> str:
    e = html.escape
    rows = []
    for ex in report["worst"]:
        url = thumbnail_data_url(images.get(ex["id"]))
        img = f'<img src="{url}" alt="">' if url else ""
        refs = "".join(f"<li>{e(r)}</li>" for r in ex["references"])
        rows.append(
            f"<tr><td>{img}</td><td>{e(ex['id'])}</td><td>{e(ex['question'])}</td><td>{e(ex['answer'])}</td>"
            f"<td><ul>{refs}</ul></td><td>{e(ex['metric'])} {ex['score']:.3f}</td></tr>"
        )
    summary = "".join(
        f"<h2>{e(task)}</h2><p>" + ", ".join(f"{e(k)} {e(_fmt(v))}" for k, v in _metrics(s)) + "</p>"
        for task, s in report["tasks"].items()
    )
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        f"<title>Evaluation of {e(report['model'])}</title>"
        "<style>body{font-family:sans-serif}td{vertical-align:top;padding:4px;border-bottom:1px solid #ddd}"
        "img{max-width:96px;max-height:96px}</style></head><body>"
        f"<h1>Evaluation of {e(report['model'])}</h1><p>Data: {e(report['data'])}, {report['items']} questions.</p>"
        f"{summary}<h2>Worst examples</h2><table><tr><th></th><th>id</th><th>question</th><th>answer</th>"
        f"<th>references</th><th>score</th></tr>{''.join(rows)}</table></body></html>\n"
    )


def write_reports(folder: str | Path, report: dict[str, Any], images: dict[str, str | None]) -> None:
    """report.json, report.md and report.html in `folder` (each written atomically)."""
    folder = Path(folder)
    atomic_write_text(folder / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(folder / "report.md", markdown_report(report))
    atomic_write_text(folder / "report.html", html_report(report, images))
