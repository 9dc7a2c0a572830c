"""`visprompt export --format gguf`: the files llama.cpp and Ollama run a LLaVA-style model from.

- `model-<quant>.gguf`: the language model with its tokenizer and chat template
  (runtime/quantized.py's writer, the one the quantized decoder uses);
- `mmproj-f16.gguf`: the vision tower and projector for llama.cpp's multimodal library (mmproj.py);
- `Modelfile`: `ollama create NAME -f Modelfile` in the folder imports both.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..files import staged_folder
from ..models.tokenizer import CHATML_TEMPLATE, stop_token_ids
from ..runtime.quantized import QuantizedUnavailable, gguf_unsupported_reason, llama_cpp_available, write_gguf
from .checks import ExportError, require_llava_compatible
from .mmproj import write_mmproj

GGUF_QUANTS = ("f16", "q8_0", "q4_k")
MMPROJ_NAME = "mmproj-f16.gguf"

# Ollama's Go-template form of ChatML (what visprompt's own tokenizers use).
_OLLAMA_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def modelfile(model, lm_file: str, mmproj_file: str) -> str:
    """An Ollama Modelfile for the two files: greedy decoding, the model's stop tokens, its system
    prompt, and its chat template when that is ChatML (otherwise Ollama reads the GGUF's own)."""
    tok = model.tokenizer
    lines = [
        "# ollama create NAME -f Modelfile  (in this folder)",
        f"FROM ./{lm_file}",
        f"FROM ./{mmproj_file}",
    ]
    if _is_chatml(tok):
        lines.append(f'TEMPLATE """{_OLLAMA_CHATML}"""')
    if model.cfg.system_prompt:
        lines.append(f'SYSTEM """{model.cfg.system_prompt}"""')
    for tid in stop_token_ids(tok):
        lines.append(f"PARAMETER stop {_quote(tok.convert_ids_to_tokens(tid))}")
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_chatml(tokenizer) -> bool:
    """True when the tokenizer's template renders a probe chat exactly as ChatML does."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    probe = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ]
    try:
        ours = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - any template that cannot render the probe is not ChatML
        return False
    chatml = ImmutableSandboxedEnvironment().from_string(CHATML_TEMPLATE)
    return ours == chatml.render(messages=probe, add_generation_prompt=True)


def export_gguf(model, output: str | Path, quant: str = "f16") -> list[Path]:
    """Write the language model, the mmproj and a Modelfile into `output` (atomically).

    Args:
        model: a VisionLanguageModel that a LLaVA export can express (checks.py).
        output: the folder to write.
        quant: the language model's matrices: "f16", "q8_0" (the gguf package writes both) or
            "q4_k" (llama.cpp's quantizer, from llama-cpp-python). The mmproj stays F16.

    Returns:
        The three files, as they lie in `output`.
    """
    if quant not in GGUF_QUANTS:
        raise ExportError(f"--quant must be one of {', '.join(GGUF_QUANTS)}, got {quant!r}")
    if importlib.util.find_spec("gguf") is None:
        raise ExportError("GGUF export needs the gguf package: pip install 'visprompt[export]'")
    require_llava_compatible(model)
    reason = gguf_unsupported_reason(model.lm)
    if reason is not None:
        raise ExportError(f"cannot write the language model as GGUF: {reason}")
    if quant == "q4_k" and not llama_cpp_available():
        raise ExportError(
            "q4_k is made by llama.cpp's quantizer: pip install llama-cpp-python (f16 and q8_0 need only gguf)"
        )
    lm_file = f"model-{quant}.gguf"
    with staged_folder(output) as tmp:
        try:
            write_gguf(model.lm, tmp / lm_file, quant, name="visprompt", tokenizer=model.tokenizer)
        except QuantizedUnavailable as e:
            raise ExportError(str(e)) from None
        write_mmproj(model, tmp / MMPROJ_NAME)
        (tmp / "Modelfile").write_text(modelfile(model, lm_file, MMPROJ_NAME), encoding="utf-8")
    return [Path(output) / name for name in (lm_file, MMPROJ_NAME, "Modelfile")]
