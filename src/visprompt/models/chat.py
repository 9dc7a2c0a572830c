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

from collections.abc import Iterable
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
    text, images = "", []
    for part in iter_parts(message):
        kind = part.get("type")
        if kind == "text":
            text += part.get("text", "")
        elif kind in ("image", "image_url"):
            src = part.get("image", part.get("url", part.get("path"))) if kind == "image" else part.get("image_url")
            if isinstance(src, dict):
                src = src.get("url")
            images.append(src)
            text += image_token + "\n"
        else:
            raise VispromptError(f"unsupported content part type {kind!r} (use 'text', 'image' or 'image_url')")
    return text.rstrip("\n") if text.endswith(image_token + "\n") else text, images


def to_chat(
    conversation: Conversation, image_token: str, default_system: str = ""
) -> tuple[list[dict[str, str]], list[Any]]:
    """Messages with string content (for a text chat template) and the images in prompt order.

    `default_system` (the model's own, as trained) is used when the conversation brings none.
    """
    chat, images = [], []
    if default_system and not (conversation and conversation[0].get("role") == "system"):
        chat.append({"role": "system", "content": default_system})
    for m in conversation:
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise VispromptError(f"message role must be system, user or assistant, got {role!r}")
        text, imgs = render_content(m, image_token)
        chat.append({"role": role, "content": text})
        images.extend(imgs)
    return chat, images


def encode_chat(tokenizer, chat: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_training_example(tokenizer, chat: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
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
