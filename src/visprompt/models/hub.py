"""Turn a model reference (local folder or hub id) into a local folder, with one clear error.

A hub id is looked up in the local Hugging Face cache; `visprompt pull` (or `allow_download=True`,
or VISPROMPT_ALLOW_DOWNLOAD=1) fetches it. Loading never reaches for the network by surprise: on an
offline machine the hub client retries for tens of seconds before failing, so a missing model gives
one line that says what to do, at once, instead of a network traceback after a wait.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelNotFoundError

# Files a model folder needs; skips duplicate weight formats (pytorch_model.bin, onnx, gguf, ...).
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "tokenizer*", "*.md"]


def looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def resolve_model_path(ref: str | os.PathLike, *, allow_download: bool | None = None) -> Path:
    """A local folder for `ref`: the folder itself, the cached snapshot, or a fresh download."""
    path = Path(os.path.expanduser(str(ref)))
    if path.is_dir():
        return path
    ref = str(ref)
    if not looks_like_hub_id(ref):
        raise ModelNotFoundError(f"model '{ref}' is neither a local folder nor a hub id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, allow_patterns=MODEL_FILE_PATTERNS, local_files_only=True))
    except Exception:
        pass
    if allow_download is None:
        allow_download = os.environ.get("VISPROMPT_ALLOW_DOWNLOAD", "0") in ("1", "true", "True")
    if allow_download and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        try:
            return Path(snapshot_download(ref, allow_patterns=MODEL_FILE_PATTERNS, etag_timeout=5))
        except Exception:
            pass
    raise ModelNotFoundError(
        f"model '{ref}' is not in the local cache and the hub cannot be reached; "
        f"run `visprompt pull {ref}` on a connected machine, or pass a local folder"
    )


def pull(ref: str) -> Path:
    """Download a hub model into the local cache (for `visprompt pull`)."""
    from huggingface_hub import snapshot_download

    if not looks_like_hub_id(ref):
        raise ModelNotFoundError(f"'{ref}' is not a hub id (org/name)")
    try:
        return Path(snapshot_download(ref, allow_patterns=MODEL_FILE_PATTERNS, etag_timeout=10))
    except Exception as e:  # the hub library raises many kinds; the user needs one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelNotFoundError(f"could not download '{ref}' from the hub: {reason}") from None
