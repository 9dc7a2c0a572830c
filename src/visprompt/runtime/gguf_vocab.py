"""A byte-level BPE tokenizer (GPT-2 style, as visprompt trains and as Qwen2, SmolLM2 and Llama 3
use) written into a GGUF file's `tokenizer.ggml.*` fields, so llama.cpp and Ollama tokenize text
exactly as transformers does.

llama.cpp does not run the tokenizer's pre-tokenizer from tokenizer.json; it picks a built-in one
by name (`tokenizer.ggml.pre`). The name is read off the pre-tokenizer's structure here; a
tokenizer whose pre-tokenizer is not one of the known ones is refused rather than written with a
pre-tokenizer that would split text differently.
"""

from __future__ import annotations

import json

from ..errors import VispromptError

# Qwen2's split pattern (also its tokenizer.json's Split regex), llama.cpp's "qwen2" pre-tokenizer.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT_PRE = {QWEN2_PATTERN: "qwen2", LLAMA3_PATTERN: "llama-bpe"}


def bpe_pre_name(pre_tokenizer: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json `pre_tokenizer`, or None when it is not a known one."""
    if not pre_tokenizer:
        return None
    kind = pre_tokenizer.get("type")
    if kind == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return "gpt-2"  # the GPT-2 split regex inside ByteLevel
    if kind != "Sequence":
        return None
    steps = pre_tokenizer.get("pretokenizers") or []
    types = [s.get("type") for s in steps]
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # one digit per token, then GPT-2's regex
    if types == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return _SPLIT_PRE.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def add_bpe_vocab(writer, tokenizer, n_vocab: int) -> None:
    """Write `tokenizer`'s vocabulary, merges, special tokens and chat template into a GGUFWriter.

    Args:
        writer: a `gguf.GGUFWriter` whose header is not written yet.
        tokenizer: a transformers fast tokenizer with a byte-level BPE model.
        n_vocab: rows of the model's embedding matrix (>= the tokenizer's size; extra rows become
            unused padding tokens, as llama.cpp's converter writes them).
    """
    import gguf

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data.get("model") or {}
    pre = bpe_pre_name(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None:
        raise VispromptError(
            "GGUF export writes byte-level BPE tokenizers with a GPT-2, Qwen2, SmolLM2 or Llama 3 pre-tokenizer; "
            f"this one is {model.get('type')} with {json.dumps(data.get('pre_tokenizer'))[:80]}"
        )
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in model["vocab"].items():
        if i < n_vocab:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in data.get("added_tokens") or []:
        if added["id"] < n_vocab:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if len(tokenizer) > n_vocab:
        raise VispromptError(f"the tokenizer has {len(tokenizer)} tokens but the model only {n_vocab} embeddings")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for name, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if getattr(tokenizer, name, None) is not None:
            add(int(getattr(tokenizer, name)))
    writer.add_add_bos_token(False)  # visprompt encodes chats without added special tokens
    writer.add_add_eos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
