"""Evaluation: score any Backend's answers on LLaVA-format records."""

from .run import run_evaluation
from .vqa import VQAReport, evaluate

__all__ = ["VQAReport", "evaluate", "run_evaluation"]
