"""Conversations with images: their messages, and their rendering to token ids (the same for training
and for generation).

A *conversation* is a list of OpenAI/transformers-style messages:

    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                  {"type": "text", "text": "What is this?"}]}]

`content` is a string or a list of parts. An image part is `{"type": "image", "image": SRC}` where
SRC is anything `visprompt.images.load_image` takes (path, bytes, data: URL, PIL image), or the
OpenAI form `{"type": "image_url", "image_url": {"url": SRC}}`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from ..errors import VispromptError

# The image placeholder: LLaVA's marker in data files, and the default placeholder token of own models.
IMAGE_TOKEN = "<image>"

Message = dict[str, Any]
Conversation = list[Message]


def image_sources(message: Message) -> list[Any]:
    """The image sources of one message, in order."""
    content = message.get("content")
    if isinstance(content, str) or content is None:
        return []
    out = []
    for part in content:
        kind = part.get("type")
        if kind == "image":
            out.append(part.get("image", part.get("url", part.get("path"))))
        elif kind == "image_url":
            url = part.get("image_url")
            out.append(url.get("url") if isinstance(url, dict) else url)
    return out


def message_text(message: Message) -> str:
    """The text of one message (parts joined), without images."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def normalize_conversations(conversations: Any) -> tuple[list[Conversation], bool]:
    """Accept one conversation or a list of them; return (list of conversations, was_single)."""
    if isinstance(conversations, dict):
        return [[conversations]], True
    conversations = list(conversations)
    if conversations and isinstance(conversations[0], dict):
        return [conversations], True
    return [list(c) for c in conversations], False


def user_turn(images: Sequence[Any], text: str, image_after_text: bool = False) -> dict[str, Any]:
    """A user message; the images go after the text (as "text\\n<image>") for models trained that way."""
    parts = [{"type": "image", "image": im} for im in images]
    if image_after_text and parts:
        return {"role": "user", "content": [{"type": "text", "text": text + "\n"}, *parts]}
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def check_question(question: Any) -> str:
    """A question as given, if it is text with something in it; else a one-line VispromptError."""
    if not isinstance(question, str):
        raise VispromptError(f"a question must be text, got {type(question).__name__}")
    if not question.strip():
        raise VispromptError("the question is empty: ask something about the image")
    return question


def iter_parts(message: Message) -> Iterable[dict[str, Any]]:
    """Content parts of a message in order; a plain string becomes one text part."""
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content


def render_content(message: dict[str, Any], image_token: str) -> tuple[str, list[Any]]:
    """A message's content as text with one `image_token` per image (LLaVA style: "<image>\\ntext")."""
    text, _, images = _render_content(message, image_token)
    return text, images


def _render_content(message: dict[str, Any], image_token: str) -> tuple[str, list[tuple[int, int]], list[Any]]:
    """render_content, plus the (start, end) character span of each real image's `image_token`."""
    text, spans, images = "", [], []
    for part in iter_parts(message):
        kind = part.get("type")
        if kind == "text":
            text += part.get("text", "")
        elif kind in ("image", "image_url"):
            src = part.get("image", part.get("url", part.get("path"))) if kind == "image" else part.get("image_url")
            if isinstance(src, dict):
                src = src.get("url")
            images.append(src)
            spans.append((len(text), len(text) + len(image_token)))
            text += image_token + "\n"
        else:
            raise VispromptError(f"unsupported content part type {kind!r} (use 'text', 'image' or 'image_url')")
    return text.rstrip("\n") if text.endswith(image_token + "\n") else text, spans, images


def to_chat(
    conversation: Conversation, image_token: str, default_system: str = ""
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages with string content (for a text chat template) and the images in prompt order.

    A message with images also gets `image_spans`: the (start, end) of each real image's `image_token`
    in its content. Only those become image slots (`encode_chat`); the same string typed in the text
    stays text. `default_system` (the model's own, as trained) is used when the conversation brings none.
    """
    chat, images = [], []
    if default_system and not (conversation and conversation[0].get("role") == "system"):
        chat.append({"role": "system", "content": default_system})
    for m in conversation:
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise VispromptError(f"message role must be system, user or assistant, got {role!r}")
        text, spans, imgs = _render_content(m, image_token)
        chat.append({"role": role, "content": text, **({"image_spans": spans} if spans else {})})
        images.extend(imgs)
    return chat, images


# ---------------------------------------------------------------------------------------------------
# Encoding: the template's control tokens and real image slots are tokens; message text is text
# ---------------------------------------------------------------------------------------------------

# Private-use code points wrapped around a control token typed in a message's text, so that encoding
# tells it from the template's own. They are dropped from message text first, so text cannot forge them.
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"


def control_tokens(tokenizer) -> tuple[str, ...]:
    """The strings a tokenizer turns into control tokens wherever they appear in text: its added tokens
    (special ones, and the others unless they are whitespace), longest first."""
    tokens = {
        t.content
        for t in tokenizer.added_tokens_decoder.values()
        if t.content and (t.special or not t.content.isspace())
    }
    return tuple(sorted(tokens, key=lambda t: (-len(t), t)))


@lru_cache(maxsize=64)
def control_token_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    """A regex matching any of `tokens` (longest first, so a token wins over the tokens inside it)."""
    return re.compile("|".join(map(re.escape, tokens)) or "(?!)")  # (?!) never matches


@lru_cache(maxsize=64)
def _marked_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    # a marked token (captured), or a lone marker (a template that cut a marked token apart)
    inner = control_token_pattern(tokens).pattern
    return re.compile(f"{_MARK_START}({inner}){_MARK_END}|[{_MARK_START}{_MARK_END}]")


def _mark(text: str, pattern: re.Pattern) -> str:
    """Message text with every control token in it wrapped in the private markers."""
    text = text.replace(_MARK_START, "").replace(_MARK_END, "")
    return pattern.sub(lambda m: _MARK_START + m.group(0) + _MARK_END, text)


def _marked_content(message: dict[str, Any], pattern: re.Pattern) -> str:
    """The content with its text marked and its real image slots (`image_spans`) left as tokens."""
    content = message.get("content") or ""
    out, at = [], 0
    for start, end in message.get("image_spans", ()):
        out += [_mark(content[at:start], pattern), content[start:end]]
        at = end
    out.append(_mark(content[at:], pattern))
    return "".join(out)


# Put inside a control token typed in text that can only pass through a string API (a transformers
# processor expands image tokens in the prompt string before it tokenizes it): the token is no longer
# there to match, and the text reads the same.
ZERO_WIDTH_SPACE = "\u200b"


def escape_control_tokens(text: str, pattern: re.Pattern) -> str:
    """`text` with a zero-width space after the first character of every control token in it."""
    return pattern.sub(lambda m: m.group(0)[0] + ZERO_WIDTH_SPACE + m.group(0)[1:], text)


def plain_text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` read as plain text: no added token (special or not) is matched in it.

    A fast tokenizer runs its own normalizer, pre-tokenizer and model, which match no added tokens;
    its `split_special_tokens` switch would flip a flag shared by every thread using the tokenizer
    (and still match added tokens that are not special). Others take `split_special_tokens=True`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    pieces = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
    return [t.id for piece in pieces for t in backend.model.tokenize(piece)]


def _encode_piece(tokenizer, piece: str, as_text: bool) -> list[int]:
    """Ids of a piece from the middle of a prompt. It is encoded after a newline, which is then taken
    off again, so that a SentencePiece tokenizer does not add the word-start it adds to a whole text."""
    encode = (lambda t: plain_text_ids(tokenizer, t)) if as_text else (lambda t: _ids(tokenizer, t))
    newline = _ids(tokenizer, "\n")
    ids = encode("\n" + piece)
    return ids[len(newline) :] if ids[: len(newline)] == newline else encode(piece)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(tokenizer, chat: list[dict[str, Any]], add_generation_prompt: bool, suffix: str = "") -> list[int]:
    """Token ids of a chat rendered with the tokenizer's chat template, then `suffix` (template text,
    such as a begun answer).

    The template's own control tokens and each real image slot (a message's `image_spans`) are
    tokens; everything in the messages' text is text: a control token typed in any message (system,
    user or assistant) encodes as its characters, so it can open no turn and fill no image slot. A
    chat whose text holds no control token encodes exactly as its rendered string does.
    """
    tokens = control_tokens(tokenizer)
    marked = [{"role": m["role"], "content": _marked_content(m, control_token_pattern(tokens))} for m in chat]
    rendered = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=add_generation_prompt)
    # [text, marked token or None (a lone marker), text, ...]
    pieces = _marked_pattern(tokens).split(rendered + suffix)
    ids = _ids(tokenizer, pieces[0])
    for i, piece in enumerate(pieces[1:], start=1):
        if not piece:
            continue
        as_text = i % 2 == 1
        piece_ids = _encode_piece(tokenizer, piece, as_text)
        if as_text and tokenizer.convert_tokens_to_ids(piece) in piece_ids:
            raise VispromptError(f"this tokenizer cannot encode {piece!r} as plain text")
        ids += piece_ids
    return ids


def encode_training_example(tokenizer, chat: list[dict[str, Any]]) -> tuple[list[int], list[bool]]:
    """Token ids of a whole chat, and a mask that is True on assistant-reply tokens (the loss tokens).

    Each assistant reply's span is found by rendering the chat up to it with and without the reply,
    which works for any template whose renderings of a chat's prefixes are prefixes of each other.
    """
    ids = encode_chat(tokenizer, chat, add_generation_prompt=False)
    mask = [False] * len(ids)
    for i, m in enumerate(chat):
        if m["role"] != "assistant":
            continue
        before = encode_chat(tokenizer, chat[:i], add_generation_prompt=True)
        # The whole chat is already rendered when this reply is its last message (the usual case).
        upto = ids if i == len(chat) - 1 else encode_chat(tokenizer, chat[: i + 1], add_generation_prompt=False)
        if ids[: len(upto)] != upto or upto[: len(before)] != before:
            raise VispromptError("the chat template does not render prefixes consistently; cannot mask the loss")
        for j in range(len(before), len(upto)):
            mask[j] = True
    return ids, mask
