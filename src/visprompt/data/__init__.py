"""Datasets: the generic LLaVA-format reader/writer and the synthetic shapes generator."""

from .llava import LlavaRecord, load_llava_records, parse_llava_records, save_llava_records

__all__ = [
    "LlavaRecord",
    "load_llava_records",
    "parse_llava_records",
    "save_llava_records",
    "generate_shapes_dataset",
]


def __getattr__(name: str):
    # Lazy, so `python -m visprompt.data.shapes` does not import the module twice (runpy warning).
    if name == "generate_shapes_dataset":
        from .shapes import generate_shapes_dataset

        return generate_shapes_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
