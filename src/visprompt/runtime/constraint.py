"""Constrained decoding: a JSON Schema as a mask over each next token (llguidance).

A request whose `SamplingParams.json_schema` is set gets a `JsonSchemaConstraint` from the
scheduler (runtime/scheduler.py, the one place every local backend samples). Before each token is
chosen, `mask` sets the logits of every token that would break the schema to -inf; after a token is
accepted, `advance` moves the grammar on; `done` says the object is complete (the reply then ends,
finish reason "stop"). Greedy and sampled requests alike only ever produce text that parses and
validates, as long as the schema's longest instance fits the token budget (bound strings with
`maxLength`; tasks/lesson.py sizes its schema that way).

The grammar is llguidance's (the library behind vLLM's, SGLang's and llama.cpp's structured output;
docs/applications.md has the measurements that chose it). Whitespace between JSON tokens is fixed
("," and ":" with no spaces): the model spends no tokens on layout. Tokenizers are anything with a
`backend_tokenizer` (a Hugging Face `tokenizers.Tokenizer`): the own BPE, HF LM and VLM tokenizers
and the starter's; each is converted once (about a second for a 49k vocabulary) and cached.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import VispromptError, one_line

_LOCK = threading.Lock()
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {stop ids: LLTokenizer}
_BITS = torch.arange(32, dtype=torch.int32)


def _llguidance():
    try:
        import llguidance  # (not llguidance.torch: it imports torch._dynamo, seconds at first use)
    except ImportError as exc:
        raise VispromptError(
            f"JSON-constrained generation needs llguidance (pip install 'visprompt[lesson]'): {exc}"
        ) from None
    return llguidance


def _ll_tokenizer(tokenizer, stop_ids: tuple[int, ...]):
    """The tokenizer as llguidance's LLTokenizer (cached per tokenizer object and stop ids)."""
    llg = _llguidance()
    with _LOCK:
        try:
            per = _TOKENIZERS.setdefault(tokenizer, {})
        except TypeError:  # not weakly referenceable: no cache
            per = {}
        if stop_ids not in per:
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise VispromptError(
                    f"JSON-constrained generation needs a fast tokenizer, not {type(tokenizer).__name__}"
                )
            backend = copy.copy(backend)
            backend.no_padding()
            backend.no_truncation()
            n_vocab = backend.get_vocab_size(with_added_tokens=True)
            per[stop_ids] = llg.LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=list(stop_ids))
        return per[stop_ids]


class JsonSchemaConstraint:
    """Masks a request's next-token logits so its reply is JSON valid against `schema`.

    Args:
        schema: a JSON Schema (dict).
        tokenizer: the model's tokenizer (see the module's notes).
        stop_ids: the model's stop tokens: allowed (only) once the object is complete.
    """

    def __init__(self, schema: dict[str, Any], tokenizer, stop_ids: Iterable[int]):
        llg = _llguidance()
        self.stop_ids = tuple(sorted(int(t) for t in stop_ids))
        self._tok = _ll_tokenizer(tokenizer, self.stop_ids)
        schema = {**schema, "x-guidance": {"whitespace_flexible": False, **schema.get("x-guidance", {})}}
        grammar = llg.LLMatcher.grammar_from_json_schema(schema)
        self._matcher = llg.LLMatcher(self._tok, grammar)
        if self._matcher.is_error():
            raise VispromptError(
                f"the JSON schema cannot be used for generation: {one_line(self._matcher.get_error())}"
            )

    @property
    def done(self) -> bool:
        """Whether the JSON value is complete (nothing but a stop token may follow)."""
        return self._matcher.is_stopped()

    def allowed(self) -> torch.Tensor:
        """[V] bool: the tokens that keep the reply valid (V: the tokenizer's vocabulary)."""
        words = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)  # [ceil(V / 32)]
        bits = (words.unsqueeze(-1) >> _BITS) & 1  # [ceil(V / 32), 32]
        return bits.flatten()[: self._tok.vocab_size].bool()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V'] -> [V'] with every token that would break the schema at -inf. Columns past the
        tokenizer's vocabulary (a model's padded embedding rows) are never allowed."""
        allowed = self.allowed()
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        n = min(len(allowed), logits.shape[-1])
        keep[:n] = allowed[:n]
        return logits.masked_fill(~keep.to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        """Move the grammar past an accepted token (a stop token ends it)."""
        if int(token) in self.stop_ids:
            return
        if not self._matcher.consume_token(int(token)):
            raise RuntimeError(f"token {token} breaks the JSON schema: {one_line(self._matcher.get_error())}")


def check_json_schema(schema: Any) -> dict[str, Any]:
    """`schema` if llguidance can generate from it (checked without a tokenizer, in milliseconds);
    otherwise a one-line VispromptError that says why."""
    if not isinstance(schema, dict):
        raise VispromptError(f"a JSON schema must be an object, got {type(schema).__name__}")
    llg = _llguidance()
    try:
        failed, messages = llg.LLMatcher.validate_grammar_with_warnings(llg.LLMatcher.grammar_from_json_schema(schema))
    except Exception as exc:  # noqa: BLE001 - the library's own errors, made one line
        failed, messages = True, [str(exc)]
    if failed:
        raise VispromptError(f"the JSON schema cannot be used for generation: {one_line('; '.join(messages))}")
    return schema


def json_constraint(schema: dict[str, Any] | None, tokenizer, stop_ids: Iterable[int]) -> JsonSchemaConstraint | None:
    """The constraint for a request's `json_schema` (None when it has none)."""
    return None if schema is None else JsonSchemaConstraint(schema, tokenizer, stop_ids)
