"""How long the first thing a user runs takes: `visprompt describe photo.jpg` in a fresh process, on
the offline `starter`, and where that time goes.

    flock /tmp/visprompt-cpu.lock python bench/startup.py                  # markdown on stdout
    flock /tmp/visprompt-cpu.lock python bench/startup.py --docs docs/starter.md   # and into the doc

Measures, after one untimed run that fills the caches (the GGUF conversion, the classifier's ONNX
export):

1. wall time of `python -m visprompt.cli.main describe IMAGE` in a fresh process, median of --runs;
2. a breakdown of one fresh process by phase (imports, loading each part, seeing, writing), with
   timestamps taken around the same calls the command makes;
3. the modules that take longest to import (`python -X importtime`, cumulative);
4. a repeated question on the same image in one Python process (`Assistant.ask`), median of --runs.

Run it on a quiet machine: the figures are wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}

PHASES = r"""
import json, sys, time
t0 = time.perf_counter(); marks = {}
def mark(name): marks[name] = time.perf_counter() - t0
import visprompt.cli.main; mark("import the CLI")
from visprompt.engine.backends.starter import StarterBackend; mark("import the starter")
b = StarterBackend(pack_weights=False)
_ = b.detector; mark("load the detector (OpenCV, YOLOv4-tiny)")
_ = b.encoder; mark("load the classifier (EfficientNet-Lite0, ONNX in OpenCV)")
_ = b.tokenizer; mark("load the tokenizer (SmolLM2-135M's, tokenizers + jinja2)")
facts = b.see([sys.argv[1]]); mark("see: detector and classifier together, colours")
from visprompt.tasks.assistant import Assistant
text = Assistant(b).describe(sys.argv[1]); mark("write the description (from the facts: no LM runs)")
heavy = ("torch", "transformers", "torch.utils.cpp_extension", "huggingface_hub")
print(json.dumps({"marks": marks, "text": text, "heavy": sorted(m for m in heavy if m in sys.modules)}))
"""

REPEAT = r"""
import json, statistics, sys, time
import visprompt
a = visprompt.load()
a.ask(sys.argv[1], "What is in the middle?")
out = {}
for q in ("How many people are there?", "What animal is this?"):
    times = []
    for _ in range(int(sys.argv[2])):
        t = time.perf_counter(); a.ask(sys.argv[1], q); times.append(time.perf_counter() - t)
    out[q] = statistics.median(times)
print(json.dumps(out))
"""


def run(cmd: list[str]) -> tuple[float, str, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return wall, proc.stdout, proc.stderr


def import_times(image: str, top: int) -> list[tuple[str, float]]:
    """The slowest top-level imports of one fresh `describe`."""
    _, _, err = run([sys.executable, "-X", "importtime", "-m", "visprompt.cli.main", "describe", image])
    rows = []
    for line in err.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(2)) <= 2:  # top-level and first-level imports only
            rows.append((m.group(3), int(m.group(1)) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", default="examples/coffee.jpg")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--docs", type=Path, help="write the tables between the bench:startup markers of this file")
    args = ap.parse_args()
    describe = [sys.executable, "-m", "visprompt.cli.main", "describe", args.image]
    run(describe)  # fills the caches; not timed
    walls = []
    for _ in range(args.runs):
        wall, out, _ = run(describe)
        walls.append(wall)
    _, out, _ = run([sys.executable, "-c", PHASES, args.image])
    phases = json.loads(out.strip().splitlines()[-1])
    _, out, _ = run([sys.executable, "-c", REPEAT, args.image, str(args.runs)])
    repeat = json.loads(out.strip().splitlines()[-1])

    lines = [
        f"`visprompt describe {args.image}` in a fresh process: **{statistics.median(walls):.2f} s** "
        f'(median of {args.runs}; runs {", ".join(f"{w:.2f}" for w in walls)}), answer: "{phases["text"]}".',
        "",
        "Where one fresh process spends it (seconds since start, each phase's own time):",
        "",
        "| phase | at | takes |",
        "|---|---|---|",
    ]
    before = 0.0
    for name, at in phases["marks"].items():
        lines.append(f"| {name} | {at:.2f} | {at - before:.2f} |")
        before = at
    lines += [
        "",
        "Slowest imports (`python -X importtime`, cumulative seconds; neither torch nor transformers is imported"
        " on this path" + (f": found {', '.join(phases['heavy'])}!" if phases["heavy"] else "") + "):",
        "",
        "| module | s |",
        "|---|---|",
        *(f"| {name} | {s:.2f} |" for name, s in import_times(args.image, 8)),
        "",
        f"A repeated question on the same image in one Python process (`Assistant.ask`, median of {args.runs}):",
        "",
        "| question | s |",
        "|---|---|",
        *(f"| {q} | {s:.2f} |" for q, s in repeat.items()),
    ]
    text = "\n".join(lines)
    print(text)
    if args.docs:
        doc = args.docs.read_text()
        pattern = re.compile(r"(<!-- bench:startup -->).*?(<!-- /bench:startup -->)", re.S)
        if not pattern.search(doc):
            raise SystemExit(f"{args.docs} has no bench:startup markers")
        args.docs.write_text(pattern.sub(lambda m: m.group(1) + "\n" + text + "\n" + m.group(2), doc))


if __name__ == "__main__":
    main()
