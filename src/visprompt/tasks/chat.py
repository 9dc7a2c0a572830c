"""A conversation with a model about images, kept turn by turn (`visprompt chat` is a thin loop over it).

    chat = Chat(visprompt.load("starter"))
    chat.add_image("cat.jpg")                   # goes with the next message
    handle = chat.send("What is this?")         # a RequestHandle: iterate it for the text as it comes,
    for piece in handle: print(piece, end="")   # or cancel() it
    chat.finish(handle)                         # the reply joins the conversation
    chat.save("talk.json")                      # images by content hash in talk.images/, beside it
    chat = Chat.load("talk.json", assistant)

Any backend: the whole conversation goes to the model each turn (backends with a prefix cache reuse
the earlier turns' work).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine.backend import GenerationResult, Message, image_sources
from ..errors import VispromptError, one_line
from ..files import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from .assistant import Assistant

FORMAT = "visprompt-chat/1"


def images_folder(path: str | Path) -> Path:
    """Where a saved conversation's images live: `talk.images/` beside `talk.json`."""
    path = Path(path)
    return path.with_name(path.stem + ".images")


def store_image(source: Any, folder: Path) -> str:
    """Write an image source's bytes into `folder` as `<sha256>.<format>` (once); returns the file name.
    A PIL image is stored as PNG; other sources keep their encoded bytes."""
    from PIL import Image

    from ..images import load_image, read_image_bytes

    if isinstance(source, Image.Image):
        buf = io.BytesIO()
        load_image(source).save(buf, "PNG")
        data, ext = buf.getvalue(), "png"
    else:
        data = read_image_bytes(source)
        with Image.open(io.BytesIO(data)) as img:
            ext = (img.format or "img").lower()
    name = f"{hashlib.sha256(data).hexdigest()}.{ext}"
    target = folder / name
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
    return name


class Chat:
    """A conversation on an `Assistant`: messages so far, images waiting for the next message.

    Args:
        assistant: the model.
        messages: a conversation to go on with.
        sampling: sampling options for every reply (max_new_tokens, temperature, ...).
    """

    def __init__(self, assistant: Assistant, messages: list[Message] | None = None, **sampling: Any):
        self.assistant = assistant
        self.messages: list[Message] = list(messages or [])
        self.pending_images: list[Any] = []
        self.params = assistant.defaults.updated(**sampling)
        self._sent: Message | None = None

    def add_image(self, source: Any) -> None:
        """Add an image to the next message (checked now: a bad image is a one-line ImageError)."""
        from ..images import load_image

        load_image(source)
        if isinstance(source, str) and not source.startswith("data:"):
            source = str(Path(source).expanduser().resolve())
        self.pending_images.append(source)

    def send(self, text: str):
        """Send a message (with the waiting images); returns the reply's handle (iterate, cancel, result)."""
        if self._sent is not None:
            raise VispromptError("the last reply has not finished: finish(handle) first")
        if not text.strip():
            raise VispromptError("the message is empty")
        parts = [{"type": "image", "image": im} for im in self.pending_images]
        message = {"role": "user", "content": [*parts, {"type": "text", "text": text}]}
        handle = self.assistant.backend.submit([*self.messages, message], self.params)
        self._sent = message
        return handle

    def finish(self, handle) -> GenerationResult:
        """Wait for the reply and add the turn to the conversation. A cancelled reply keeps what was
        written before it stopped (a reply stopped before any text leaves the conversation as it was,
        its images still waiting)."""
        sent, self._sent = self._sent, None
        try:
            result = handle.result()
        except BaseException:
            handle.cancel()
            raise
        if sent is not None and (result.text or result.finish_reason != "cancelled"):
            self.messages += [sent, {"role": "assistant", "content": result.text}]
            self.pending_images = []
        return result

    def say(self, text: str) -> str:
        """Send a message and return the whole reply."""
        return self.finish(self.send(text)).text

    def reset(self) -> None:
        """Forget the conversation and the waiting images."""
        self.messages = []
        self.pending_images = []

    # -- saving ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the conversation as JSON; its images go by content hash into `images_folder(path)`."""
        path = Path(path)
        folder = images_folder(path)
        stored: dict[int, str] = {}

        def ref(source: Any) -> str:
            if id(source) not in stored:
                stored[id(source)] = f"{folder.name}/{store_image(source, folder)}"
            return stored[id(source)]

        messages = []
        for m in self.messages:
            content = m.get("content")
            if isinstance(content, list):
                content = [
                    {"type": "image", "image": ref(src)} if src is not None else p
                    for p, src in ((p, _part_image(p)) for p in content)
                ]
            messages.append({"role": m.get("role"), "content": content})
        data = {"format": FORMAT, "messages": messages, "pending_images": [ref(s) for s in self.pending_images]}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, path: str | Path, assistant: Assistant, **sampling: Any) -> Chat:
        """A saved conversation, to go on with."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"no {FORMAT!r} format field")
            base = path.parent

            def local(name: str) -> str:
                return str(base / name)

            messages = []
            for m in data["messages"]:
                content = m["content"]
                if isinstance(content, list):
                    content = [
                        {"type": "image", "image": local(p["image"])} if p.get("type") == "image" else p
                        for p in content
                    ]
                messages.append({"role": m["role"], "content": content})
            chat = cls(assistant, messages, **sampling)
            chat.pending_images = [local(s) for s in data.get("pending_images", [])]
        except OSError as exc:
            raise VispromptError(f"cannot read the conversation {path}: {one_line(exc.strerror or exc)}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise VispromptError(f"{path} is not a saved conversation: {one_line(exc)}") from None
        return chat


def _part_image(part: dict[str, Any]) -> Any:
    """The image source of one content part, or None for text."""
    sources = image_sources({"content": [part]})
    return sources[0] if sources else None
