"""Evaluation: score any Backend's answers on LLaVA-format records."""

from .vqa import VQAReport, evaluate

__all__ = ["VQAReport", "evaluate"]
