"""A saved model's tokenizer and chat template without transformers: `tokenizers` and jinja2.

The parts of a transformers tokenizer the starter and the decode core use. Imports neither torch nor
transformers, so a process that only writes prompts (the starter answering from its facts) stays light.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class LightTokenizer:
    """The parts of a transformers tokenizer the starter and the decode core use, over `tokenizers`:
    `__call__`, `decode`, `apply_chat_template`, special tokens and `convert_*`."""

    def __init__(self, tok, config: dict[str, Any], chat_template: str | None):
        self._tok = tok
        self.chat_template = chat_template
        self.padding_side = "left"

        def token(key: str) -> str | None:
            value = config.get(key)
            return value.get("content") if isinstance(value, dict) else value

        self.bos_token, self.eos_token = token("bos_token"), token("eos_token")
        self.unk_token, self.pad_token = token("unk_token"), token("pad_token")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> LightTokenizer:
        from tokenizers import Tokenizer

        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), config, template)

    # ---- ids -----------------------------------------------------------------------------------
    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        """id -> AddedToken (`.content`, `.special`), as transformers' tokenizers have it."""
        return self._tok.get_added_tokens_decoder()

    @property
    def backend_tokenizer(self):
        """The `tokenizers.Tokenizer` underneath (normalizer, pre-tokenizer, model)."""
        return self._tok

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def convert_ids_to_tokens(self, index: int) -> str | None:
        return self._tok.id_to_token(index)

    @property
    def eos_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.pad_token) if self.pad_token else None

    @property
    def bos_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.bos_token) if self.bos_token else None

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    # ---- text ----------------------------------------------------------------------------------
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self._tok.encode(text, add_special_tokens=add_special_tokens).ids}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tokenize: bool = True, add_generation_prompt: bool = False
    ):
        """Render the folder's chat template as transformers does (a sandboxed jinja2 environment
        with trim_blocks and lstrip_blocks)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        text = _compiled(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            unk_token=self.unk_token or "",
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


_TEMPLATES: dict[str, Any] = {}


def _compiled(template: str):
    if template not in _TEMPLATES:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        _TEMPLATES[template] = env.from_string(template)
    return _TEMPLATES[template]
