"""Narration in a tone: the same facts about an image, in a chosen emotional register.

A prompt program over the `Backend` contract, so it runs on every backend:

1. the image is described plainly (`Assistant.describe`: on the `starter`, its facts written out);
2. the model rewrites that description in the tone, shown two worked rewrites of that tone first,
   as a text-only request (no image: nothing new can be seen, only the wording changes);
3. the rewrite is kept only if it keeps the facts: every content word of the plain description
   (things, numbers, places, colours) is still there and it adds at most a few words. Otherwise the
   tone's own frame goes around the plain description ("What a happy sight: the photo shows ...!"),
   which changes the register and keeps the facts word for word.

Small models (the starter's SmolLM2-135M) often drop or invent facts when rewriting; step 3 is what
makes the facts stay the same on every backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import VispromptError


@dataclass(frozen=True)
class Tone:
    """One register: how it reads, its frame, and two worked rewrites (plain -> toned)."""

    feel: str
    opener: str
    closer: str
    examples: tuple[tuple[str, str], tuple[str, str]]


_PLAIN = ("The photo shows a dog on the left.", "The photo shows 2 cups of coffee in the centre.")

TONES: dict[str, Tone] = {
    "calm": Tone(
        "quiet, gentle and unhurried",
        "Quiet and still,",
        ".",
        (
            (_PLAIN[0], "Quiet and still, the photo shows a dog resting on the left."),
            (_PLAIN[1], "Quiet and still, the photo shows 2 cups of coffee resting in the centre."),
        ),
    ),
    "joyful": Tone(
        "bright, warm and delighted",
        "What a happy sight:",
        "!",
        (
            (_PLAIN[0], "What a happy sight: the photo shows a dog on the left!"),
            (_PLAIN[1], "What a happy sight: the photo shows 2 cups of coffee right in the centre!"),
        ),
    ),
    "somber": Tone(
        "heavy, hushed and sad",
        "In a heavy silence,",
        ".",
        (
            (_PLAIN[0], "In a heavy silence, the photo shows a dog alone on the left."),
            (_PLAIN[1], "In a heavy silence, the photo shows 2 cups of coffee, alone in the centre."),
        ),
    ),
    "suspenseful": Tone(
        "tense, watchful and uncertain",
        "Something is about to happen:",
        "...",
        (
            (_PLAIN[0], "Something is about to happen: the photo shows a dog on the left, waiting..."),
            (_PLAIN[1], "Something is about to happen: the photo shows 2 cups of coffee in the centre..."),
        ),
    ),
    "whimsical": Tone(
        "playful, light and fanciful",
        "Lo and behold,",
        ", as if by magic!",
        (
            (_PLAIN[0], "Lo and behold, the photo shows a dog on the left, as if by magic!"),
            (_PLAIN[1], "Lo and behold, the photo shows 2 cups of coffee in the centre, having a little party!"),
        ),
    ),
    "warm": Tone(
        "kind, tender and friendly",
        "With a gentle smile,",
        ".",
        (
            (_PLAIN[0], "With a gentle smile, the photo shows a dear dog on the left."),
            (_PLAIN[1], "With a gentle smile, the photo shows 2 cups of coffee in the centre, like old friends."),
        ),
    ),
}

SYSTEM = (
    "You rewrite descriptions of photos in a given tone. Keep every fact exactly: the same things, "
    "numbers, places and colours. Add no new things. Answer with the rewritten description only."
)
MAX_ADDED_WORDS = 10  # a rewrite that adds more than this many words is taken to add facts
_STOPWORDS = frozenset(
    "a an the and or of in on at to is are it its this that with photo image picture shows show "
    "there most likely may be what".split()
)
_WORD = re.compile(r"[A-Za-z0-9%]+")


def tone_of(name: str) -> Tone:
    """The tone called `name`; an unknown name is a one-line VispromptError listing the tones."""
    if name not in TONES:
        raise VispromptError(f"unknown tone {name!r}: choose one of {', '.join(TONES)}")
    return TONES[name]


def rewrite_chat(plain: str, name: str) -> list[dict[str, str]]:
    """The text-only chat that asks for `plain` rewritten in tone `name` (two worked rewrites first)."""
    tone = tone_of(name)
    chat = [{"role": "system", "content": SYSTEM}]
    for before, after in tone.examples:
        chat.append({"role": "user", "content": f"Tone: {name} ({tone.feel}).\nDescription: {before}"})
        chat.append({"role": "assistant", "content": after})
    chat.append({"role": "user", "content": f"Tone: {name} ({tone.feel}).\nDescription: {plain}"})
    return chat


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def keeps_facts(plain: str, toned: str) -> bool:
    """Whether `toned` keeps every content word of `plain`, differs from it, and adds at most
    MAX_ADDED_WORDS words."""
    plain_words, toned_words = _words(plain), _words(toned)
    if not toned_words or toned.strip() == plain.strip():
        return False
    kept = set(toned_words)
    if any(w not in kept for w in plain_words if w not in _STOPWORDS):
        return False
    return len(toned_words) - len(plain_words) <= MAX_ADDED_WORDS


def framed(plain: str, name: str) -> str:
    """The plain description inside the tone's frame: its facts word for word."""
    tone = tone_of(name)
    body = plain.strip().rstrip(".!")
    if body[:1].isupper() and not body[1:2].isupper():
        body = body[0].lower() + body[1:]
    return f"{tone.opener} {body}{tone.closer}"


def in_tone(plain: str, rewrite: str, name: str) -> str:
    """The model's rewrite if it keeps the facts, else the framed plain description."""
    rewrite = rewrite.strip().split("\n")[0].strip()
    return rewrite if keeps_facts(plain, rewrite) else framed(plain, name)
