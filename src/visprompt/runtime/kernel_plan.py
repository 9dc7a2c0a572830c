"""Which code runs a step of M rows on this CPU: the C++ layer kernel or torch ops (oneDNN).

The kernel (`csrc/llama_layer.cpp`) wins where a step is bound by reading the weights and by the
time between torch ops (decoding, short prefills); oneDNN's blocked products win where a step is
compute-bound and the CPU has wider units than the kernel's micro-kernel uses (long prefills; on
AVX-512/AMX machines from a few rows on). Where the crossover lies depends on the CPU, its core
count and the model's shapes, so `FastLM` measures it: a short calibration times the model's own
first layer (a step of M rows after a 64-token prefix, kernel against the torch-ops path) for M in
`LAYER_GRID`, and lm_head for M in `HEAD_GRID`, a few ms per size, then takes the row threshold that
loses least over the grid. The plan is cached on disk (`$XDG_CACHE_HOME/visprompt`, by default
~/.cache/visprompt, `kernel_plan-<key>.json`), keyed by the CPU, the kernel build, the torch
version, the thread count and the model's shapes, so a process calibrates only once per machine
and model.

`VISPROMPT_KERNEL_ROWS=N` fixes the plan instead (reproducible runs): the kernel runs steps and
lm_head products of up to N rows, torch ops the rest; 0 never uses the kernel.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..files import atomic_write_text

ENV = "VISPROMPT_KERNEL_ROWS"
LAYER_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
HEAD_GRID = (1, 2, 4, 8, 16)
PREFIX = 64  # cached positions before the timed step (a decode or follow-up attends to some)
BUDGET_S = 0.004  # timed calls per size and path: about this long, MIN_REPS to MAX_REPS calls
MIN_REPS, MAX_REPS = 3, 5
FORMAT = 1  # of the cached file; a change recalibrates


@dataclass
class KernelPlan:
    """Rows up to which the kernel runs a layer step (`layer_rows`) and lm_head (`head_rows`)."""

    layer_rows: int
    head_rows: int
    source: str  # "calibrated", "cached", ENV, or "no kernel"
    other: str = "oneDNN"  # what runs above the thresholds: "oneDNN" (packed weights) or "torch ops"
    simd: str = ""  # the kernel's micro-kernels: "avx512", "avx2", "scalar"
    layer_ms: list[tuple[int, float, float]] = field(default_factory=list)  # (rows, kernel ms, other ms)
    head_ms: list[tuple[int, float, float]] = field(default_factory=list)
    note: str = ""  # why there is no kernel

    def describe(self, layer_rows: int | None = None, head_rows: int | None = None) -> str:
        """A short line for reports, e.g. "kernel ≤16 rows, oneDNN above; lm_head kernel ≤8 (avx2, calibrated)"."""
        layer = self.layer_rows if layer_rows is None else layer_rows
        head = self.head_rows if head_rows is None else head_rows
        if self.source == "no kernel":
            return f"{self.other} only (no kernel: {self.note})" if self.note else f"{self.other} only (no kernel)"
        if layer <= 0 and head <= 0:
            return f"{self.other} only ({self.source})"
        rows = f"kernel ≤{layer} rows, {self.other} above" if layer > 0 else f"{self.other} for layers"
        return f"{rows}; lm_head kernel ≤{head} ({self.simd or 'kernel'}, {self.source})"

    def table(self) -> str:
        """The calibration's measurements as text (one layer, and lm_head), ms per call."""
        lines = []
        for name, rows in (("layer", self.layer_ms), ("lm_head", self.head_ms)):
            if not rows:
                continue
            lines.append(f"{name + ' rows':>12s} {'kernel ms':>10s} {self.other + ' ms':>12s} {'winner':>8s}")
            for m, k, t in rows:
                lines.append(f"{m:12d} {k:10.3f} {t:12.3f} {'kernel' if k <= t else self.other:>8s}")
        return "\n".join(lines)


def env_rows() -> int | None:
    """VISPROMPT_KERNEL_ROWS as an int, None when unset (or not a non-negative integer: warned)."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    try:
        rows = int(value)
        if rows < 0:
            raise ValueError
    except ValueError:
        warnings.warn(f"visprompt: ignoring {ENV}={value!r} (expected rows >= 0)", stacklevel=3)
        return None
    return rows


def choose_rows(measured: list[tuple[int, float, float]]) -> int:
    """The threshold T (0 or a measured row count) that loses least: steps of up to T rows on the
    kernel, more on the other path, each size's time taken relative to its faster path (ties go
    to the larger T)."""
    best_t, best_cost = 0, float("inf")
    for t in [0] + [m for m, _, _ in measured]:
        cost = sum((k if m <= t else o) / max(min(k, o), 1e-9) for m, k, o in measured)
        if cost <= best_cost + 1e-9:
            best_t, best_cost = t, cost
    return best_t


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "visprompt"


def plan_key(**parts) -> str:
    """16 hex digits over `parts` (CPU, kernel build, torch version, threads, shapes, ...)."""
    text = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan_path(key: str) -> Path:
    return cache_dir() / f"kernel_plan-{key}.json"


_memo: dict[str, KernelPlan] = {}


def load_cached(key: str) -> KernelPlan | None:
    if key in _memo:
        return _memo[key]
    try:
        data = json.loads(plan_path(key).read_text())
        plan = KernelPlan(
            layer_rows=int(data["layer_rows"]),
            head_rows=int(data["head_rows"]),
            source="cached",
            other=str(data.get("other", "oneDNN")),
            simd=str(data.get("simd", "")),
            layer_ms=[tuple(r) for r in data.get("layer_ms", [])],
            head_ms=[tuple(r) for r in data.get("head_ms", [])],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    _memo[key] = plan
    return plan


def save(key: str, plan: KernelPlan, about: dict | None = None) -> None:
    """Write the plan (atomically; a read-only cache only loses the file, never the plan)."""
    _memo[key] = plan
    path = plan_path(key)
    try:
        atomic_write_text(path, json.dumps({**asdict(plan), "about": about or {}}, indent=1, ensure_ascii=False))
    except OSError:
        pass


def time_pair(kernel_fn, other_fn, budget_s: float = BUDGET_S, max_reps: int = MAX_REPS) -> tuple[float, float]:
    """Best-of-n ms of two callables, alternated call by call after one warm-up call each."""
    best = [float("inf"), float("inf")]
    fns = (kernel_fn, other_fn)
    for i, fn in enumerate(fns):  # warm-up: oneDNN primitives, first-touch pages
        t0 = time.perf_counter()
        fn()
        best[i] = time.perf_counter() - t0
    reps = max(MIN_REPS, min(max_reps, int(budget_s / max(max(best), 1e-6))))
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0] * 1e3, best[1] * 1e3


__all__ = ["KernelPlan", "ENV", "LAYER_GRID", "HEAD_GRID", "env_rows", "choose_rows", "plan_key", "plan_path"]
