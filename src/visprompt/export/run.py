"""`visprompt export`: a saved visprompt model folder -> the asked format."""

from __future__ import annotations

import os
from pathlib import Path

from ..models.vision_language_model import VisionLanguageModel
from .checks import ExportError

FORMATS = ("llava", "gguf")


def load_exportable(ref: str | os.PathLike | VisionLanguageModel) -> VisionLanguageModel:
    """The model to export: a VisionLanguageModel as is, or one loaded from a visprompt folder."""
    if isinstance(ref, VisionLanguageModel):
        return ref.eval()
    from ..models.hub import resolve_model_path

    path = Path(resolve_model_path(str(ref)))
    if not (path / "config.json").is_file() or '"visprompt"' not in (path / "config.json").read_text():
        raise ExportError(f"{ref} is not a visprompt model folder: only visprompt's own models export")
    return VisionLanguageModel.from_pretrained(path)


def export_model(
    ref: str | os.PathLike | VisionLanguageModel, fmt: str, output: str | os.PathLike, quant: str = "f16"
) -> list[Path]:
    """Export a model. Returns the files (gguf) or the folder (llava) written.

    Args:
        ref: a visprompt model folder (or hub id), or a VisionLanguageModel.
        fmt: "llava" (a transformers checkpoint folder) or "gguf" (llama.cpp/Ollama files).
        output: the folder to write.
        quant: gguf only: "f16", "q8_0" or "q4_k" for the language model's matrices.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; formats are {', '.join(FORMATS)}")
    model = load_exportable(ref)
    if fmt == "llava":
        from .llava import export_llava

        return [export_llava(model, output)]
    from .gguf_files import export_gguf

    return export_gguf(model, output, quant)
