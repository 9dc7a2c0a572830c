"""Turn a model reference (local folder or hub id) into a local folder, with one clear error.

A hub id is looked up in the local Hugging Face cache; `visprompt pull` (or `allow_download=True`,
or VISPROMPT_ALLOW_DOWNLOAD=1) fetches it. Loading never reaches for the network by surprise: on an
offline machine the hub client retries for tens of seconds before failing, so a missing model gives
one line that says what to do, at once, instead of a network traceback after a wait.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ModelNotFoundError, one_line

# Files a model folder needs; skips duplicate weight formats (pytorch_model.bin, onnx, gguf, ...).
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "tokenizer*", "*.md"]


def looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def _looks_like_path(ref: str) -> bool:
    return (
        ref.startswith((".", "/", "~"))
        or os.sep in ref.strip("/").replace("/", "", 1)
        or (os.altsep is not None and os.altsep in ref)
        or ref.count("/") > 1
    )


def _not_cached(ref: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model '{ref}' is not in the local cache and the hub cannot be reached; "
        f"run `visprompt pull {ref}` on a connected machine, or pass a local folder"
    )


def _env_allows_download() -> bool:
    return os.environ.get("VISPROMPT_ALLOW_DOWNLOAD", "0") in ("1", "true", "True")


def resolve_model_path(
    ref: str | os.PathLike,
    *,
    allow_download: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
) -> Path:
    """A local folder for `ref`: the folder itself, the cached snapshot of a hub id, or a fresh download.

    `allow_download=None` follows VISPROMPT_ALLOW_DOWNLOAD; HF_HUB_OFFLINE=1 always forbids it.
    Raises ModelNotFoundError (one line, no chained traceback) when the folder does not exist or the
    hub id is not cached (and downloading is off or fails).
    """
    text = os.fspath(ref)
    folder = Path(text).expanduser()
    try:
        if folder.is_dir():
            return folder
        if folder.exists():
            raise ModelNotFoundError(f"model '{text}' is a file, not a model folder")
    except OSError as e:  # a name too long, a folder not readable
        raise ModelNotFoundError(
            f"model path {one_line(text, 200)!r} cannot be read: {e.strerror or one_line(e)}"
        ) from None
    if _looks_like_path(text):
        raise ModelNotFoundError(_no_such_folder(folder, text))
    if not looks_like_hub_id(text):
        raise ModelNotFoundError(f"model '{text}' is neither a local folder nor a hub id (org/name)")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    kwargs = {"allow_patterns": MODEL_FILE_PATTERNS, "cache_dir": cache_dir, "revision": revision}
    try:
        return Path(snapshot_download(text, local_files_only=True, **kwargs))
    except HFValidationError:
        raise ModelNotFoundError(f"model '{text}' is neither a folder nor a valid hub id") from None
    except Exception:  # noqa: BLE001 - not in the cache (the hub client raises several kinds)
        pass
    if folder.parent.is_dir() and folder.parent != Path("."):
        # "runs/nothere" with a local runs/ folder: a mistyped folder, not a hub id to pull
        raise ModelNotFoundError(_no_such_folder(folder, text))
    if allow_download is None:
        allow_download = _env_allows_download()
    if allow_download and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        try:
            return Path(snapshot_download(text, etag_timeout=5, **kwargs))
        except Exception:  # noqa: BLE001 - offline, unknown repo, gated: all mean "not available here"
            pass
    raise _not_cached(text) from None


_quiet_lock = threading.Lock()
_quiet_users = 0
_saved_bars: tuple[bool, bool] = (True, True)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No progress bars from transformers or huggingface_hub ("Loading weights ...") while the block
    runs, so loading a model through the Python API prints nothing; also a decorator.

    Both libraries keep the switch in a process global: the first block in saves it and the last one
    out restores it, so concurrent loads neither wait for each other nor restore each other's state.
    """
    global _quiet_users, _saved_bars
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    with _quiet_lock:
        if _quiet_users == 0:
            _saved_bars = (hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled())
            hf_logging.disable_progress_bar()  # and huggingface_hub's
        _quiet_users += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_users -= 1
            if _quiet_users == 0:
                transformers_bars, hub_bars = _saved_bars
                if transformers_bars:
                    hf_logging.enable_progress_bar()  # and huggingface_hub's
                if hub_bars != (not hub_utils.are_progress_bars_disabled()):
                    hub_utils.enable_progress_bars() if hub_bars else hub_utils.disable_progress_bars()


def _no_such_folder(folder: Path, text: str) -> str:
    """ "no such folder 'runs/nothere': the model folder does not exist (did you mean runs/shapes-tiny?)"."""
    import difflib

    try:
        siblings = sorted(p.name for p in folder.parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        siblings = []
    message = f"no such folder '{text}': the model folder does not exist"
    close = difflib.get_close_matches(folder.name, siblings, n=1, cutoff=0.5)
    if close:
        message += f" (did you mean {folder.parent / close[0]}?)"
    elif siblings:
        shown = ", ".join(siblings[:5]) + (", ..." if len(siblings) > 5 else "")
        message += f" ({folder.parent}/ holds {shown})"
    return message


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
