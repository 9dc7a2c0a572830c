"""The decode core: one object per reply being generated, the same under every backend.

A `DecodeSequence` takes the sampled tokens one at a time and owns every rule about them:

- **stop tokens**: an id in `stop_ids` ends the reply (finish reason "stop"); it counts as a
  completion token (as vLLM and OpenAI count it) but is not part of `token_ids` or the text;
- **stop strings**: the reply ends where the earliest one begins; the text never holds it;
- **length**: `max_new_tokens`, or the model's context (`max_len` tokens of prompt plus reply);
- **text**: built by incremental detokenization (each token's text is fixed once it decodes to
  whole characters), so the text only ever grows and the pieces streamed are never taken back;
- **whitespace**: a reply has no leading or trailing whitespace; the stream holds back a trailing
  run of whitespace until more text follows it;
- **streaming**: `accept` returns the text that is safe to show now (no half UTF-8 character, no
  tail that a stop string may still complete, no trailing whitespace). The pieces it returns, and
  the last piece `finish` returns, join to `result().text` exactly.

An optional `answer_prefix` is text the prompt already began the answer with (the `starter` backend
writes "The photo most likely shows"): it leads the reply, joined to the generated continuation by
one space unless the continuation starts with whitespace or punctuation. Stop strings are searched
in the whole reply, the begun answer included.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .sampling import SamplingParams

FINISH_REASONS = ("stop", "length", "cancelled", "error")
_NO_SPACE_BEFORE = ".,;:!?'"


@dataclass
class GenerationResult:
    """One finished reply.

    Fields:
        text: the reply: cut before any stop string, no leading or trailing whitespace.
        finish_reason: "stop" (a stop token or stop string), "length" (max_new_tokens or the
            model's context), "cancelled" or "error".
        prompt_tokens: tokens in the prompt (image tokens included).
        completion_tokens: tokens generated, the stop token included when one ended the reply.
        token_ids: the generated token ids, without the stop token.
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)


@dataclass
class StreamEvent:
    """One step of a reply as it streams (what a request handle yields and `on_event` receives)."""

    request_id: int
    token_id: int | None  # the token this event adds; None when it adds none (a stop token, a cancellation)
    text: str  # newly safe text ("" when nothing new can be shown yet)
    finished: bool = False
    finish_reason: str | None = None


def find_stop(text: str, stops: Iterable[str], start: int = 0) -> int:
    """Index where the earliest stop string starts in `text` (searching from `start`), or -1."""
    best = -1
    for s in stops:
        if not s:
            continue
        i = text.find(s, start)
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def join_prefix(prefix: str, continuation: str) -> str:
    """A begun answer and what the model wrote after it, with one space between words."""
    if not prefix:
        return continuation
    if not continuation.strip():
        return prefix
    if continuation[:1].isspace() or continuation[:1] in _NO_SPACE_BEFORE:
        return prefix + continuation
    return f"{prefix} {continuation}"


class DecodeSequence:
    """One reply being generated: feed it sampled tokens with `accept` until `finished`."""

    def __init__(
        self,
        tokenizer,
        params: SamplingParams,
        stop_ids: Iterable[int],
        prompt_tokens: int,
        max_len: int | None = None,
        answer_prefix: str = "",
    ):
        self.tokenizer = tokenizer
        self.params = params
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.stops = [s for s in params.stop if s]
        self.prompt_tokens = int(prompt_tokens)
        self.max_len = max_len
        self.answer_prefix = answer_prefix
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.hit_stop_token = False
        self._raw = ""  # the continuation's text so far (grows only)
        self._cut: int | None = None  # where a stop string begins in the joined text
        self._searched = 0  # how much of the joined text has been searched for stop strings
        self._prefix_offset = 0  # incremental detokenization window (as TGI and vLLM do it)
        self._read_offset = 0
        self._emitted = ""  # what the stream has shown

    # -- state ----------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids) + int(self.hit_stop_token)

    @property
    def text(self) -> str:
        """The reply as it stands (cut at a stop string, no leading or trailing whitespace)."""
        return self._visible().strip()

    # -- feeding --------------------------------------------------------------------------------
    def accept(self, token: int) -> str:
        """Take one sampled token; return the text that is now safe to stream ("" if none)."""
        if self.finished:
            raise RuntimeError("the sequence has already finished")
        token = int(token)
        if token in self.stop_ids:
            self.hit_stop_token = True
            return self.finish("stop")
        self.token_ids.append(token)
        self._detokenize()
        if self.stops and self._find_stop():
            return self.finish("stop")
        if len(self.token_ids) >= self.params.max_new_tokens:
            return self.finish("length")
        if self.max_len is not None and self.prompt_tokens + len(self.token_ids) >= self.max_len:
            return self.finish("length")
        return self._take(self._safe_end())

    def finish(self, reason: str) -> str:
        """End the reply (also from outside: "cancelled", "error", "length"); returns the last text piece."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"unknown finish reason {reason!r}")
        if self.finished:
            return ""
        self.finish_reason = reason
        if self._cut is None:
            self._flush()
        if self.stops and self._cut is None:
            self._find_stop()  # a reply that ends on its begun answer alone: stop strings in it still cut
        return self._take(None)

    def result(self) -> GenerationResult:
        if not self.finished:
            raise RuntimeError("the sequence has not finished")
        return GenerationResult(
            text=self.text,
            finish_reason=self.finish_reason,  # type: ignore[arg-type]
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            token_ids=list(self.token_ids),
        )

    # -- text -----------------------------------------------------------------------------------
    def _detokenize(self) -> None:
        """Extend `_raw` by the text of the tokens read since the last whole character."""
        decode = self.tokenizer.decode
        ids = self.token_ids
        prefix_text = decode(ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        new_text = decode(ids[self._prefix_offset :], skip_special_tokens=True)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._raw += new_text[len(prefix_text) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)

    def _flush(self) -> None:
        """At the end: whatever is left undecoded (a character the reply never completed)."""
        if self._read_offset < len(self.token_ids):
            decode = self.tokenizer.decode
            prefix_text = decode(self.token_ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
            new_text = decode(self.token_ids[self._prefix_offset :], skip_special_tokens=True)
            if new_text.startswith(prefix_text):
                self._raw += new_text[len(prefix_text) :]
            self._read_offset = len(self.token_ids)
            if self.stops:
                self._find_stop()

    def _joined(self) -> str:
        """The begun answer and the continuation. It only ever grows at its end (the joining space
        is decided by the continuation's first character), so stop positions in it stay valid."""
        return join_prefix(self.answer_prefix, self._raw)

    def _find_stop(self) -> bool:
        """Search the text not yet searched (and the tail a stop string may have begun in) for a stop
        string; on a match, cut there. Stop strings are searched in the whole reply, the begun answer
        included: a stop string never appears in the text."""
        joined = self._joined()
        if len(joined) <= self._searched and self._searched:
            return False
        hold = max(len(s) for s in self.stops) - 1
        at = find_stop(joined, self.stops, max(0, self._searched - hold))
        self._searched = len(joined)
        if at != -1:
            self._cut = at
        return at != -1

    def _visible(self) -> str:
        joined = self._joined()
        return (joined if self._cut is None else joined[: self._cut]).lstrip()

    def _safe_end(self) -> int:
        """How much of the visible text may be shown while the reply goes on."""
        text = self._visible()
        end = len(text)
        for s in self.stops:  # a tail that a stop string may still complete
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[end - k : end] == s[:k]:
                    end -= k
                    break
        while end and text[end - 1].isspace():
            end -= 1
        if self.answer_prefix and not self._raw.strip():
            end = min(end, len(self.answer_prefix.strip()))  # the join waits for the continuation
        return end

    def _take(self, end: int | None) -> str:
        """The new piece of the stream up to `end` (None: the final text)."""
        text = self.text if end is None else self._visible()[:end]
        if len(text) <= len(self._emitted) or not text.startswith(self._emitted):
            return ""
        delta = text[len(self._emitted) :]
        self._emitted = text
        return delta
