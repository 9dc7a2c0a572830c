"""The decode core (runtime/sequence.py) on a byte-level tokenizer: one token per UTF-8 byte."""

from __future__ import annotations

import pytest

from visprompt.runtime.sampling import SamplingParams
from visprompt.runtime.sequence import DecodeSequence, find_stop, join_prefix

EOS = 256


class ByteTokenizer:
    """Token i < 256 is byte i; 256 is EOS (special, decodes to nothing)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def run(text: str, stop=(), max_new_tokens: int = 1000, answer_prefix: str = "", then_eos: bool = False):
    tok = ByteTokenizer()
    seq = DecodeSequence(
        tok, SamplingParams(max_new_tokens=max_new_tokens, stop=list(stop)), [EOS], 5, None, answer_prefix
    )
    deltas = []
    for t in tok.encode(text) + ([EOS] if then_eos else []):
        if seq.finished:
            break
        deltas.append(seq.accept(t))
    if not seq.finished:
        deltas.append(seq.finish("length"))
    return seq, deltas


@pytest.mark.parametrize(
    "text", ["plain ascii reply", "héllo wörld — ünïcode ✓ 你好", "  padded  \n", "emoji 🙂🙂 at the end 🙂"]
)
def test_stream_pieces_join_to_the_text_and_never_hold_half_a_character(text):
    seq, deltas = run(text, then_eos=True)
    assert "".join(deltas) == seq.result().text == text.strip()
    assert not any("\ufffd" in d for d in deltas)
    assert seq.finish_reason == "stop"


def test_stop_token_is_counted_but_not_kept():
    seq, _ = run("abc", then_eos=True)
    res = seq.result()
    assert res.token_ids == list(b"abc") and res.completion_tokens == 4 and res.text == "abc"


@pytest.mark.parametrize("stop", ["END", "é!", "🙂x"])
def test_a_stop_string_split_over_tokens_is_never_streamed(stop):
    text = f"before {stop} after"
    seq, deltas = run(text, stop=["zzz", stop])
    streamed = "".join(deltas)
    assert seq.finish_reason == "stop"
    assert streamed == seq.result().text == "before"


def test_the_tail_a_stop_string_may_complete_is_held_back_then_released():
    seq, deltas = run("an ENd and more", stop=["END"])
    assert seq.finish_reason == "length"
    assert "".join(deltas) == seq.result().text == "an ENd and more"


def test_max_new_tokens_ends_with_length():
    seq, deltas = run("abcdef", max_new_tokens=3)
    assert seq.result().text == "abc" and seq.finish_reason == "length" and seq.completion_tokens == 3
    assert "".join(deltas) == "abc"


def test_answer_prefix_leads_the_reply_with_one_space():
    seq, deltas = run("tabby cat", answer_prefix="The photo shows", then_eos=True)
    assert seq.result().text == "".join(deltas) == "The photo shows tabby cat"
    seq, deltas = run(", a cat.", answer_prefix="The photo shows", then_eos=True)
    assert seq.result().text == "".join(deltas) == "The photo shows, a cat."


def test_a_stop_string_in_the_answer_prefix_cuts_the_reply_there():
    seq, deltas = run("more text", answer_prefix="It is unsure, but maybe", stop=["but"])
    assert seq.finish_reason == "stop" and seq.completion_tokens == 1
    assert seq.result().text == "".join(deltas) == "It is unsure,"


def test_a_stop_string_across_the_prefix_join_is_found():
    seq, deltas = run("cat sat", answer_prefix="a big", stop=["big cat"])
    assert seq.result().text == "".join(deltas) == "a"


def test_helpers():
    assert find_stop("abcabc", ["ca", "bc"]) == 1
    assert find_stop("abc", ["", "zz"]) == -1
    assert join_prefix("A", "") == "A" and join_prefix("A", "b") == "A b" and join_prefix("A", " b") == "A b"
