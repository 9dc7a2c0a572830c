"""`python -m visprompt.train RECIPE [--set key=value ...] [--output DIR] [--resume]`: the training
entry point for `torchrun`, the same run as `visprompt train`:

    torchrun --nproc-per-node 2 -m visprompt.train recipes/shapes-tiny.yaml --output runs/ddp
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import VispromptError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m visprompt.train", description="Train a model from a recipe.")
    ap.add_argument("recipe", help="recipe YAML (model:, train:, stages:)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key=value (repeatable)")
    ap.add_argument("--output", "-o", help="output folder (train.output_dir)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    args = ap.parse_args(argv)
    from .config import load_recipe
    from .distributed import setup, teardown
    from .trainer import Trainer

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"train.output_dir={args.output}")
    if args.resume:
        overrides.append("train.resume=true")
    d = setup()
    try:
        summary = Trainer(load_recipe(args.recipe, overrides)).train()
    except VispromptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        teardown()
    if d.main:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
