"""What the `starter` knows about an image, as facts, and the questions the facts answer directly.

Pure Python over plain values (no torch, no models): the starter backend fills a `SceneFacts` from
its parts (the detector's boxes, the classifier's labels, colours and simple statistics of the
pixels), and this module

- writes the facts as the lines its writer LM is given (`SceneFacts.to_text`);
- names the main subject the description begins with (`SceneFacts.subject`);
- answers count, presence, colour, position and kind questions from the facts alone
  (`answer_from_facts`; None when the facts cannot answer and the LM should);
- measures the pixel statistics the facts use: dominant colours (`dominant_colours`) and whether an
  image is a photo, a drawing or a diagram (`image_kind`).

Confidence is said in words: a detection under `SURE_DETECTION` is "probably" there, a classifier
whose top label is under `CONFIDENT` is "unsure".
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass, field

CONFIDENT = 0.25  # classifier top-1 probability from which it counts as fairly sure
SURE_DETECTION = 0.5  # detector score from which an object is stated without "probably"

# ---------------------------------------------------------------------------------------------------
# Colours and image statistics
# ---------------------------------------------------------------------------------------------------


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


def region_colour(
    image, box: tuple[float, float, float, float], inner: float = 0.6, min_share: float = 0.4
) -> str | None:
    """The dominant colour of the middle `inner` part of a box (x0, y0, x1, y1) of `image` (an
    object's own colour more than its background's), or None when no colour covers min_share of it
    (the astronaut's box is red flag, black sky and a white suit: no colour of its own)."""
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * (1 - inner) / 2, (y1 - y0) * (1 - inner) / 2
    left, top = round(x0 + mx), round(y0 + my)
    crop = image.crop((left, top, max(round(x1 - mx), left + 1), max(round(y1 - my), top + 1)))
    name, share = dominant_colours(crop, k=1, min_share=0.0)[0]
    return name if share >= min_share else None


def image_kind(image) -> str:
    """ "photo", "drawing" or "diagram", from a 128 px wide copy sampled without smoothing.

    A drawing (a cartoon, a silhouette, flat shapes) is made of flat areas: most neighbouring pixels
    are exactly equal (half or more; the packaged photos have at most 26%, drawings saved as JPEG
    still 77% or more). A diagram is a flat image that is mostly white with at least three colours
    (axes, bars, text); a black shape on white stays a drawing."""
    import numpy as np
    from PIL import Image

    rgb = image.convert("RGB")
    small = rgb.resize((128, max(1, round(128 * rgb.height / max(1, rgb.width)))), Image.NEAREST)
    px = np.asarray(small, dtype=np.int32)  # [H, W, 3]
    if px.shape[1] < 2:
        return "photo"
    flat = float(np.mean(np.abs(np.diff(px, axis=1)).max(axis=2) == 0))
    if flat < 0.5:
        return "photo"
    flat_px = px.reshape(-1, 3)
    white = float(np.mean(flat_px.min(axis=1) > 225))
    coarse = (flat_px[:, 0] >> 5) * 64 + (flat_px[:, 1] >> 5) * 8 + (flat_px[:, 2] >> 5)
    colours = int(np.sum(np.bincount(coarse, minlength=512) >= 0.002 * len(coarse)))
    return "diagram" if white >= 0.6 and colours >= 3 else "drawing"


# ---------------------------------------------------------------------------------------------------
# Words
# ---------------------------------------------------------------------------------------------------

_IRREGULAR_PLURALS = {
    "person": "people",
    "mouse": "mice",
    "knife": "knives",
    "sheep": "sheep",
    "skis": "skis",
    "scissors": "scissors",
}
# words a question may use -> COCO label
SYNONYMS = {
    **{
        w: "person"
        for w in "people persons man men woman women human humans kid kids child children boy boys girl girls guy guys lady ladies astronaut astronauts player players somebody someone".split()
    },
    **{w: "cat" for w in "cats kitten kittens kitty".split()},
    **{w: "dog" for w in "dogs puppy puppies".split()},
    **{w: "cup" for w in "cups mug mugs coffee".split()},
    **{w: "motorcycle" for w in "motorcycles motorbike motorbikes".split()},
    **{w: "bicycle" for w in "bicycles bike bikes".split()},
    **{w: "car" for w in "cars".split()},
    **{w: "couch" for w in "couches sofa sofas".split()},
    **{w: "tv" for w in "tvs television televisions monitor".split()},
    **{w: "airplane" for w in "airplanes plane planes aeroplane aeroplanes".split()},
    **{w: "dining table" for w in "table tables".split()},
    **{w: "cell phone" for w in "phone phones".split()},
    **{w: "potted plant" for w in "plant plants".split()},
}
KINDS = {"photo", "photograph", "picture", "drawing", "sketch", "cartoon", "diagram", "chart", "painting"}
_KIND_OF = {
    "photograph": "photo",
    "picture": "photo",
    "sketch": "drawing",
    "cartoon": "drawing",
    "chart": "diagram",
    "painting": "drawing",
}


def plural(label: str, n: int = 2) -> str:
    if n == 1:
        return label
    head, _, last = label.rpartition(" ")
    if last in _IRREGULAR_PLURALS:
        last = _IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "sh", "ch", "x")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def article(word: str) -> str:
    return f"an {word}" if word[:1].lower() in "aeiou" else f"a {word}"


def counted(label: str, n: int) -> str:
    """ "a cat", "3 people"."""
    return article(label) if n == 1 else f"{n} {plural(label, n)}"


def and_list(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def coco_label(word: str, labels: set[str] | None = None) -> str | None:
    """The COCO label a noun of a question means ("people" -> "person", "cats" -> "cat"), among
    `labels` (all the detector knows) or None."""
    word = word.lower().strip()
    if word in SYNONYMS:
        return SYNONYMS[word]
    known = labels if labels is not None else set()
    if word in known:
        return word
    for singular in (
        word[:-3] + "y" if word.endswith("ies") else None,
        word[:-2] if word.endswith("es") else None,
        word[:-1] if word.endswith("s") else None,
    ):
        if singular and singular in known:
            return singular
    return None


# ---------------------------------------------------------------------------------------------------
# Facts
# ---------------------------------------------------------------------------------------------------


@dataclass
class SeenObject:
    """A detected object: COCO label, detector score, box (x0, y0, x1, y1) in pixels, its colour."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    colour: str | None = None

    @property
    def sure(self) -> bool:
        return self.score >= SURE_DETECTION


def reconcile(
    objects: list[SeenObject], kind: str | None, p: float, size: tuple[int, int], min_share: float = 0.25
) -> list[SeenObject]:
    """When the classifier is fairly sure its top label is one of COCO's kinds (`kind`, probability
    `p`) and the detector found none of it, the detector's largest box, if the detector is unsure of
    it and it covers min_share of the image, is that kind (chelsea saved as JPEG: "dog 0.41" on the
    cat the classifier calls a tabby cat at 55%)."""
    if kind is None or p < CONFIDENT or any(o.label == kind for o in objects) or not objects:
        return objects
    big = max(objects, key=lambda o: _area(o.box))
    if big.sure or _area(big.box) < min_share * size[0] * size[1]:
        return objects
    return [SeenObject(kind, o.score, o.box, o.colour) if o is big else o for o in objects]


@dataclass
class SceneFacts:
    """What the starter's parts saw in one image."""

    size: tuple[int, int]  # width, height
    objects: list[SeenObject] = field(default_factory=list)  # most confident first
    labels: list[tuple[str, float]] = field(default_factory=list)  # classifier (plain name, probability)
    colours: list[tuple[str, float]] = field(default_factory=list)  # (colour word, share of pixels)
    centre_colour: str | None = None  # the dominant colour of the image's middle
    kind: str = "photo"  # photo | drawing | diagram
    # the classifier's top label names the same thing as this COCO label (an espresso is a cup)
    label_matches: str | None = None
    known_labels: frozenset[str] = frozenset()  # every label the detector can report

    # ---- derived ---------------------------------------------------------------------------------
    @property
    def confident(self) -> bool:
        """The classifier is fairly sure of its top label."""
        return bool(self.labels) and self.labels[0][1] >= CONFIDENT

    def shown_labels(self) -> list[tuple[str, float]]:
        """The classifier labels worth telling: the top one, plus others >= 2% and >= a fifth of it."""
        if not self.labels:
            return []
        top = self.labels[0][1]
        out: list[tuple[str, float]] = []
        for i, (name, p) in enumerate(self.labels):
            if (i == 0 or (p >= 0.02 and p >= 0.2 * top)) and name not in (n for n, _ in out):
                out.append((name, p))
        return out

    def groups(self) -> list[tuple[str, list[SeenObject]]]:
        """Objects grouped by label, the group covering the most area first."""
        by: dict[str, list[SeenObject]] = {}
        for o in self.objects:
            by.setdefault(o.label, []).append(o)
        return sorted(by.items(), key=lambda kv: -sum(_area(o.box) for o in kv[1]))

    def count(self, label: str) -> tuple[int, int]:
        """(objects of `label`, of which the detector is sure)."""
        found = [o for o in self.objects if o.label == label]
        return len(found), sum(o.sure for o in found)

    def size_word(self, o: SeenObject) -> str:
        share = _area(o.box) / max(1.0, float(self.size[0] * self.size[1]))
        return "large" if share >= 0.3 else ("small" if share < 0.05 else "medium-sized")

    def place(self, o: SeenObject) -> str:
        """ "on the left", "in the centre", "at the top right", ..."""
        w, h = self.size
        cx, cy = (o.box[0] + o.box[2]) / 2 / max(1, w), (o.box[1] + o.box[3]) / 2 / max(1, h)
        horiz = "left" if cx < 0.35 else ("right" if cx > 0.65 else "")
        vert = "top" if cy < 0.3 else ("bottom" if cy > 0.7 else "")
        if not horiz and not vert:
            return "in the centre"
        if horiz and vert:
            return f"at the {vert} {horiz}"
        return f"on the {horiz}" if horiz else f"at the {vert}"

    def relations(self, limit: int = 3) -> list[str]:
        """ "the cup is in front of the dining table", "the person is next to the cat": between the
        most prominent objects (one of each label, up to three labels)."""
        main = [objs[0] for _, objs in self.groups()[:3]]
        out = []
        for i, a in enumerate(main):
            for b in main[i + 1 :]:
                small, big = (a, b) if _area(a.box) <= _area(b.box) else (b, a)
                inside = _inter(small.box, big.box) / max(1.0, _area(small.box))
                if inside > 0.6:
                    out.append(f"the {small.label} is in front of the {big.label}")
                elif inside < 0.2 and _vertical_overlap(a.box, b.box) > 0.3:
                    left, right = (a, b) if a.box[0] <= b.box[0] else (b, a)
                    out.append(f"the {left.label} is next to the {right.label} (left of it)")
        return out[:limit]

    def subject(self) -> str | None:
        """The main subject in words ("a cup of espresso", "3 people", "a person and a tripod"), or
        None when no part is sure of anything."""
        parts, _, _ = self._subject_parts()
        return and_list(parts) if parts else None

    def _subject_parts(self) -> tuple[list[str], set[str], bool]:
        """(the subject's parts, the detected labels they name, whether they name the classifier's top label)."""
        # what the detector is sure of, and what the classifier's top label confirms; a detection that
        # is neither names the subject only when the classifier is unsure too
        groups = [
            (label, objs) for label, objs in self.groups() if any(o.sure for o in objs) or label == self.label_matches
        ]
        if not groups and not self.confident:
            groups = self.groups()[:1]
        top = self.labels[0] if self.labels else None
        parts, used, names_top = [], set(), False
        for label, objs in groups[:2]:
            name = label
            if top and self.label_matches == label and top[1] >= 0.5 and len(objs) == 1:
                name, names_top = top[0], True  # the classifier's more specific name ("cup of espresso")
            parts.append(counted(name, len(objs)))
            used.add(label)
        if top and self.confident and self.label_matches is None and len(parts) < 2:
            if top[0] not in used:
                parts.append(article(top[0]))
                names_top = True
        return parts, used, names_top

    def sentence(self) -> str:
        """A one-sentence description from the facts: the subject and, for one object, where it is
        ("The photo shows a cup of espresso in the centre."), or the top guesses when no part is
        sure ("It is unclear what the photo shows; it may be a wok or a frying pan.")."""
        return self._sentences()[0]

    def paragraph(self) -> str:
        """A detailed description written out from the facts alone: the subject and where it is, the
        other objects, how they stand to each other, what the classifier says, the colours, and
        what is unsure."""
        return " ".join(self._sentences())

    def _sentences(self) -> list[str]:
        kind = self.kind
        groups = self.groups()
        parts, named, names_top = self._subject_parts()
        if parts:
            first = f"The {kind} shows {and_list(parts)}"
            main = [objs for label, objs in groups if label in named]
            if len(parts) == 1 and main and len(main[0]) == 1:
                first += f" {self.place(main[0][0])}"
            sentences = [first + "."]
        else:
            guesses = [article(n) for n, _ in self.shown_labels()[:2]]
            sentences = [
                f"It is unclear what the {kind} shows" + (f"; it may be {' or '.join(guesses)}." if guesses else ".")
            ]
        for label, objs in groups:
            sure = any(o.sure for o in objs)
            if len(objs) > 1:
                places = and_list([self.place(o) for o in sorted(objs, key=lambda o: o.box[0])])
                if label in named:
                    sentences.append(f"The {plural(label)} are {places}.")
                else:
                    sentences.append(f"There are {'' if sure else 'probably '}{len(objs)} {plural(label)}: {places}.")
            elif label in named and not sure:
                sentences.append(f"The detector is not sure it is {article(label)}.")
            elif label not in named:
                maybe = "" if sure else "probably "
                sentences.append(f"There is {maybe}also {article(label)} {self.place(objs[0])}.")
        for rel in self.relations():
            sentences.append(rel[0].upper() + rel[1:] + ".")
        shown = self.shown_labels()[:3]
        if parts and self.confident:
            others = shown[1:] if names_top else shown
            if others:
                sentences.append(
                    "The classifier also considers " + " or ".join(f"{article(n)} ({p:.0%})" for n, p in others) + "."
                )
        elif parts and shown:
            sentences.append(
                "The classifier is unsure: perhaps "
                + " or ".join(f"{article(n)} ({p:.0%})" for n, p in shown[:2])
                + "."
            )
        for label, objs in groups[:2]:
            if len(objs) == 1 and objs[0].colour:
                sentences.append(f"The {label} is mostly {objs[0].colour}.")
        if self.colours:
            sentences.append(f"The main colours are {and_list([n for n, _ in self.colours])}.")
        return sentences

    def to_text(self) -> str:
        """The facts as lines for the writer LM."""
        lines = []
        groups = self.groups()
        if groups:
            items = []
            for label, objs in groups:
                where = and_list(sorted({self.place(o) for o in objs}, key=lambda p: ("left" not in p, "right" in p)))
                maybe = "" if any(o.sure for o in objs) else "probably "
                desc = f"{maybe}{counted(label, len(objs))} ({self.size_word(objs[0])}, {where}"
                if objs[0].colour:
                    desc += f", {objs[0].colour}"
                items.append(desc + ")")
            lines.append("Objects: " + "; ".join(items) + ".")
            rel = self.relations()
            if rel:
                lines.append("Positions: " + "; ".join(rel) + ".")
        else:
            lines.append("Objects: none found.")
        shown = self.shown_labels()[:3]
        if shown:
            guesses = ", ".join(f"{n} ({p:.0%})" for n, p in shown)
            lines.append(f"Classifier: {guesses}" + ("." if self.confident else " - unsure."))
        if self.colours:
            lines.append("Colours: " + ", ".join(n for n, _ in self.colours) + ".")
        lines.append(f"Kind: {self.kind}.")
        return "\n".join(lines)


def _area(b) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def _inter(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _vertical_overlap(a, b) -> float:
    """Vertical overlap of two boxes over the shorter one's height."""
    h = min(a[3] - a[1], b[3] - b[1])
    return max(0.0, min(a[3], b[3]) - max(a[1], b[1])) / h if h > 0 else 0.0


# ---------------------------------------------------------------------------------------------------
# Questions the facts answer
# ---------------------------------------------------------------------------------------------------

_NOUN = r"([a-z][a-z -]*?)"
_TAIL = r"(?:\s+(?:are|is|do|does|can|could|were|in|on|at|here|there|visible|have|has)\b.*)?$"
_COUNT_RE = re.compile(r"\bhow many " + _NOUN + _TAIL)
_PRESENCE_RE = re.compile(
    r"^(?:(?:is|are) there|(?:do|can|could) you see|(?:do|does) (?:it|this|the (?:image|photo|picture)) (?:show|contain|have))"
    r" (?:any |an |a |some )?"
    + _NOUN
    + _TAIL
    + r"|^(?:is|are) (?:this|it|that|these|those|the (?:image|photo|picture)) (?:an? |any |some )"
    + _NOUN
    + _TAIL
)
_COLOUR_RE = re.compile(r"^what colou?rs? (?:is|are|does|do) (?:the |this |that |these |those )?" + _NOUN + _TAIL)
_MAIN_COLOURS_RE = re.compile(r"\b(?:main|dominant) colou?rs?\b|^what colou?rs? (?:are|is) (?:in|there)\b")
_WHERE_RE = re.compile(r"^where (?:is|are) (?:the |a |an )?" + _NOUN + _TAIL)
_VAGUE = {"anything", "something", "nothing", "everything", "thing", "things", "it", "this", "that", "there"}
_IT = {"it", "this", "that", "they", "these", "those"}
_WHOLE = {"image", "photo", "picture", "background", "scene"}


def _lookup(noun: str, facts: SceneFacts) -> str | None:
    """The COCO label `noun` names (the whole phrase, then its last word)."""
    if not noun:
        return None
    known = set(facts.known_labels) | {o.label for o in facts.objects}
    return coco_label(noun, known) or coco_label(noun.split()[-1], known)


def answer_from_facts(question: str, facts: SceneFacts) -> str | None:
    """An answer to a count, presence, colour, position or kind question from the facts alone, or
    None when the facts cannot answer it (the LM then answers with the facts in its prompt)."""
    q = re.sub(r"\s+", " ", question.lower()).strip().rstrip("?.! ")
    if m := _COUNT_RE.search(q):
        return _count_answer(m.group(1), facts)
    if _MAIN_COLOURS_RE.search(q):
        return _colour_answer("image", facts)
    if m := _COLOUR_RE.search(q):
        return _colour_answer(m.group(1), facts)
    if m := _WHERE_RE.search(q):
        return _where_answer(m.group(1), facts)
    if m := _PRESENCE_RE.search(q):
        return _presence_answer(next(g for g in m.groups() if g), facts)
    return None


def _count_answer(noun: str, facts: SceneFacts) -> str | None:
    label = _lookup(noun, facts)
    if label is None:
        return None  # not a kind the detector knows: the LM answers from the facts
    n, sure = facts.count(label)
    if n == 0:
        return f"I see no {plural(label)}."
    hedge = "" if sure == n else "probably "
    return f"There {'is' if n == 1 else 'are'} {hedge}{'one ' + label if n == 1 else counted(label, n)}."


def _presence_answer(noun: str, facts: SceneFacts) -> str | None:
    words = noun.split()
    if not words or len(words) > 3 or words[0] in _VAGUE:
        return None
    if words[-1] in KINDS:
        kind = _KIND_OF.get(words[-1], words[-1])
        return f"Yes, it is a {facts.kind}." if kind == facts.kind else f"No, it looks like a {facts.kind}."
    label = _lookup(noun, facts)
    if label is not None:
        n, sure = facts.count(label)
        if n == 0:
            return f"No, I see no {plural(label)}."
        first = next(o for o in facts.objects if o.label == label)
        hedge = "" if sure else "probably "
        return f"Yes, there {'is' if n == 1 else 'are'} {hedge}{counted(label, n)} ({facts.place(first)})."
    named = [n for n, _ in facts.shown_labels() if words[-1] in n.lower().split() or noun in n.lower()]
    if named:
        return f"Yes, probably: it looks like {article(named[0])}."
    subject = facts.subject()
    if subject:
        return f"No, I see no {noun}; the image shows {subject}."
    if facts.labels:
        top, p = facts.labels[0]
        return f"Probably not, but I am unsure what the image shows (perhaps {article(top)}, {p:.0%})."
    return None


def _colour_answer(noun: str, facts: SceneFacts) -> str | None:
    main = and_list([n for n, _ in facts.colours])
    if noun in _IT:
        colour = facts.centre_colour or (facts.colours[0][0] if facts.colours else None)
        return f"It is mostly {colour}." if colour else None
    if noun in _WHOLE or not noun:
        return f"The main colours are {main}." if main else None
    label = _lookup(noun, facts)
    if label is not None:
        objs = [o for o in facts.objects if o.label == label]
        if not objs:
            return f"I see no {label}; the image's main colours are {main}."
        colours = sorted({o.colour for o in objs if o.colour})
        if colours:
            return f"The {plural(label, len(objs))} {'is' if len(objs) == 1 else 'are'} mostly {and_list(colours)}."
        return f"The {label} has no one clear colour; the image's main colours are {main}."
    # Not something the detector names: most likely the photo's subject, usually in its middle --
    # unless the detector is sure the subject is something else.
    if facts.centre_colour:
        if any(o.sure for o in facts.objects):
            return f"I cannot tell which part is the {noun}; the middle of the image is {facts.centre_colour}."
        return f"The {noun} looks {facts.centre_colour}."
    return f"The main colours are {main}." if main else None


def _where_answer(noun: str, facts: SceneFacts) -> str | None:
    label = _lookup(noun, facts)
    if label is None:
        return None
    objs = [o for o in facts.objects if o.label == label]
    if not objs:
        return f"I see no {label}."
    if len(objs) == 1:
        return f"The {label} is {facts.place(objs[0])} of the image."
    places = [facts.place(o) for o in sorted(objs, key=lambda o: o.box[0])]
    return f"There are {len(objs)} {plural(label)}: " + and_list(places) + "."
