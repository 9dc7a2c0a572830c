"""From conversations with images to token ids, the same way for training and for generation."""

from __future__ import annotations

from typing import Any

from ..errors import VispromptError
from .backend import Conversation, iter_parts


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
