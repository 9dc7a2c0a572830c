"""Model references -> backends: a visprompt folder, an HF VLM (folder or hub id), `starter`, or
`openai:MODEL` (a model behind an OpenAI-compatible server at `base_url`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError, ModelNotFoundError, one_line
from ..models.hub import resolve_model_path
from .backend import Backend

STARTER = "starter"


def load_backend(
    ref: str = STARTER,
    device: str = "cpu",
    one_shot: bool = False,
    base_url: str | None = None,
    api_key: str | None = None,
) -> Backend:
    """one_shot: the process answers once and ends (`visprompt describe`): load for the first answer
    rather than for many (the starter skips the decode-friendly copies of its LM's weights, which
    take longer to make than one short answer gains from them). base_url and api_key: the server of
    an `openai:MODEL` reference (default `$OPENAI_BASE_URL`, `$OPENAI_API_KEY`); it is reached once
    here, so a missing server is an error before any work."""
    from .backends.remote import PREFIX

    if ref.startswith(PREFIX):
        from .backends.remote import RemoteBackend

        remote = RemoteBackend(ref[len(PREFIX) :], base_url=base_url, api_key=api_key)
        remote.check()
        return remote
    if base_url is not None:
        raise ConfigError(f"--base-url is for remote models (--model openai:MODEL), not {ref!r}")
    if ref == STARTER:
        from .backends.starter import StarterBackend

        return StarterBackend(device=device, pack_weights=False if one_shot else None)
    path = resolve_model_path(ref)
    try:
        config = json.loads(Path(path, "config.json").read_text(encoding="utf-8"))
    except OSError:
        raise ModelNotFoundError(f"{ref} has no readable config.json: not a model folder") from None
    except ValueError as e:  # not JSON, or not UTF-8
        raise ConfigError(f"{Path(path, 'config.json')} is not valid JSON: {one_line(e)}") from None
    if not isinstance(config, dict):
        raise ConfigError(
            f"{Path(path, 'config.json')} is not a model config: a JSON {type(config).__name__}, not an object"
        )
    if config.get("model_type") == "visprompt":
        from .backends.own import OwnVLMBackend

        backend = OwnVLMBackend.from_pretrained(path, device=device)
        backend.name = str(ref)
        return backend
    from .backends.hf_vlm import HFVLMBackend, is_hf_vlm_folder

    if is_hf_vlm_folder(path):
        return HFVLMBackend.from_pretrained(str(path), device=device)
    raise ModelNotFoundError(
        f"{ref} is a {config.get('model_type', 'unknown')!r} model, not a vision-language model visprompt can run"
    )
