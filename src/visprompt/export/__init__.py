"""Export a visprompt model to the formats serving engines load: a transformers LLaVA checkpoint
(transformers, vLLM, SGLang) and GGUF files for llama.cpp and Ollama."""

from .checks import ExportError
from .run import FORMATS, export_model

__all__ = ["FORMATS", "ExportError", "export_model"]
