"""What a training run writes as it goes: `metrics.jsonl` (one JSON row per logged step and per
evaluation), the same scalars as TensorBoard event files (`tensorboard/`, when enabled), and
`curves.png`, the loss and evaluation curves drawn from the log."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..files import atomic_write_bytes, atomic_write_text

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"


class RunLog:
    """Rows of one run. `resume_step`: the step a resumed run continues after (TensorBoard drops its
    later events, as `metrics.jsonl` drops its later rows); None for a fresh run."""

    def __init__(self, out: Path, resume_step: int | None, tensorboard: bool = False):
        self.path = out / METRICS_NAME
        if resume_step is None:
            self.path.write_text("")  # a fresh run into the same folder starts a fresh log
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    'tensorboard: true needs the tensorboard package: pip install "visprompt[train]"'
                ) from None
            self.tb = SummaryWriter(
                str(out / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1
            )

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{'eval' if 'eval_loss' in row else 'train'}/{key}", value, row["step"])
            self.tb.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def trim(path: Path, step: int) -> None:
    """Keep the rows up to `step` (those of the run being resumed); drop later rows and a last row
    cut short by a kill, so that each step is logged once."""
    if path.exists():
        rows = [row for row in read_rows(path) if row["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a last line cut short by a kill
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def plot_curves(out: Path) -> Path | None:
    """Draw `curves.png` from `metrics.jsonl`: training loss by step, and the evaluation loss and
    exact match where the run evaluated. None (and nothing written) without matplotlib or rows."""
    rows = read_rows(out / METRICS_NAME)
    train = [
        (r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])
    ]
    evals = [r for r in rows if "eval_loss" in r]
    if not train:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    panels = 2 if evals else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(*zip(*train), label="training loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="evaluation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if evals and any("exact_match" in r for r in evals):
        ax = axes[0][1]
        ax.plot(
            [r["step"] for r in evals if "exact_match" in r],
            [r["exact_match"] for r in evals if "exact_match" in r],
            "o-",
        )
        ax.set_xlabel("step")
        ax.set_ylabel("held-out exact match")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out / CURVES_NAME, buf.getvalue())
    return out / CURVES_NAME
