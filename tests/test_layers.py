"""The package's layers never import upward: images -> models -> runtime -> engine -> tasks -> serve
-> cli; train, eval and export beside (train builds and trains models, eval scores backends, export
writes models in other projects' formats). Only the CLI imports serve."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "visprompt"

# package -> the visprompt packages it must not import
FORBIDDEN = {
    "images": {"models", "runtime", "engine", "tasks", "serve", "cli", "train", "eval"},
    "models": {"runtime", "engine", "tasks", "serve", "cli", "train", "eval"},
    "runtime": {"engine", "tasks", "serve", "cli", "train", "eval"},
    "engine": {"tasks", "serve", "cli", "train", "eval"},
    "tasks": {"serve", "cli", "train", "eval"},
    "serve": {"cli", "train", "eval", "data"},
    "train": {"engine", "tasks", "serve", "cli"},
    "eval": {"tasks", "serve", "cli", "train"},
    "data": {"runtime", "engine", "tasks", "serve", "cli", "train", "eval"},
    "export": {"tasks", "serve", "cli", "train", "eval"},
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_layer_imports_a_higher_one(package):
    bad = {}
    for path in sorted((SRC / package).rglob("*.py")):
        depth = len(path.relative_to(SRC / package).parts) - 1  # modules in sub-packages (engine/backends)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > depth + 1 and node.module:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("visprompt."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("visprompt."))
        if hit := found & FORBIDDEN[package]:
            bad[str(path.relative_to(SRC))] = sorted(hit)
    assert not bad, f"upward imports: {bad}"
