"""A story told from pictures: each image continues the plot.

A prompt program over the `Backend` contract, so it runs on every backend. Each turn:

1. the new image is described plainly (`Assistant.describe`; on the `starter`, its facts);
2. its main subject, if new to the story, becomes a character with a name (`Mara, a tabby cat`);
3. the model writes the next paragraph from a text-only prompt that holds the running state: the
   characters with their names, the setting, the last paragraphs of the plot, the new picture's
   description and the user's direction ("make it funnier", "end it").

The state (`StoryState`: characters, setting, plot so far, scene descriptions, ended) is all the
prompt is built from, and it is JSON: saved after a turn and resumed, it gives the same next turn
as going on without saving (under greedy decoding).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import VispromptError, one_line
from ..files import atomic_write_text

if TYPE_CHECKING:
    from .assistant import Assistant

NAMES = ("Mara", "Tobin", "Ilse", "Juno", "Orrin", "Pip", "Wren", "Cass")
MAX_CHARACTERS = len(NAMES)
PLOT_SHOWN = 2  # paragraphs of the plot so far fed back into the prompt
SYSTEM = (
    "You are a storyteller. You tell one story, a short paragraph at a time; each paragraph follows "
    "a new picture. Call the characters by their names. Write 2 or 3 clear sentences."
)
_ENDING = re.compile(r"\b(end|ending|finish|conclude|wrap (it )?up)\b", re.IGNORECASE)
_SUBJECT = re.compile(
    r"\b(?:shows?|showing|depicts?|may be|of)\s+"
    r"((?:an?|the|one|two|three|four|five|\d+)\s+[A-Za-z][A-Za-z' -]*?)"
    r"(?=\s+(?:in|on|at|with|and|or|near|beside|under|over|behind|next|sitting|standing|lying|holding|wearing)\b"
    r"|[.,;!?]|$)",
    re.IGNORECASE,
)
_SENTENCE = re.compile(r"[^.!?]+[.!?]+[\"')\]]*")


@dataclass
class Character:
    """Someone (or something) in the story: its name and what it is ("a tabby cat")."""

    name: str
    what: str


@dataclass
class StoryState:
    """Everything a story's next turn is written from.

    Fields:
        characters: named characters, in the order they appeared.
        setting: where the story takes place (the first picture's description).
        plot: the paragraphs written so far.
        scenes: the description of each turn's picture ("" for a turn without one).
        ended: whether the story has been ended.
    """

    characters: list[Character] = field(default_factory=list)
    setting: str = ""
    plot: list[str] = field(default_factory=list)
    scenes: list[str] = field(default_factory=list)
    ended: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> StoryState:
        try:
            data = json.loads(text)
            return cls(
                characters=[Character(str(c["name"]), str(c["what"])) for c in data.get("characters", [])],
                setting=str(data.get("setting", "")),
                plot=[str(p) for p in data.get("plot", [])],
                scenes=[str(s) for s in data.get("scenes", [])],
                ended=bool(data.get("ended", False)),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise VispromptError(f"not a saved story: {one_line(exc)}") from None

    def save(self, path: str | Path) -> None:
        """Write the state as JSON (atomically: a crash leaves the old file)."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> StoryState:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise VispromptError(f"cannot read the story {path}: {one_line(exc.strerror or exc)}") from None
        return cls.from_json(text)


def main_subject(scene: str) -> str | None:
    """The main subject a plain description names ("The photo shows a tabby cat in the centre." ->
    "a tabby cat"), or None."""
    m = _SUBJECT.search(scene)
    if not m:
        return None
    words = m.group(1).split()
    return " ".join(words[:6]) if len(words) > 1 else None


def wants_ending(direction: str | None) -> bool:
    """Whether the user's direction asks to end the story ("end it", "finish the story")."""
    return bool(direction and _ENDING.search(direction))


def _same_thing(a: str, b: str) -> bool:
    strip = re.compile(r"^(an?|the|one)\s+", re.IGNORECASE)
    return strip.sub("", a.lower()).strip() == strip.sub("", b.lower()).strip()


def add_character(state: StoryState, subject: str | None) -> Character | None:
    """Name the subject, if it is new to the story (and the cast is not full); returns it, or None."""
    if not subject or any(_same_thing(c.what, subject) for c in state.characters):
        return None
    if len(state.characters) >= MAX_CHARACTERS:
        return None
    character = Character(NAMES[len(state.characters)], subject)
    state.characters.append(character)
    return character


# Two worked turns: the small models follow an example far better than an instruction.
_EXAMPLES = (
    (
        "Characters: Leo (a dog).\nPicture: The photo shows Leo, a dog, on the left.\n"
        "Write the opening paragraph of the story, about Leo.",
        "Leo the dog woke early and trotted to the left side of the garden. Something new was in the air "
        "today. He wagged his tail and set off to find it.",
    ),
    (
        "Characters: Leo (a dog); Nell (a bicycle).\nStory so far: Leo the dog woke early and trotted to "
        "the left side of the garden.\nPicture: The photo shows Nell, a bicycle, in the centre.\n"
        "Direction: make it funnier.\nWrite the next paragraph of the story, about Nell.",
        "In the middle of the lane stood Nell, a bicycle with a squeaky bell. Leo barked at the bell, and "
        "the bell squeaked back. They argued all the way down the hill.",
    ),
)


def named_scene(scene: str, state: StoryState) -> str:
    """The picture's description with its subject called by the character's name ("The photo shows
    Tobin, a tabby cat, in the centre.")."""
    for c in state.characters:
        at = scene.lower().find(c.what.lower())
        if at != -1:
            return f"{scene[:at]}{c.name}, {scene[at : at + len(c.what)]},{scene[at + len(c.what) :]}".replace(
                ",.", "."
            )
    return scene


def story_chat(state: StoryState, scene: str, direction: str | None, ending: bool) -> list[dict[str, str]]:
    """The text-only chat that asks for the next paragraph, from the state and this turn's input."""
    lines = []
    here = [c.name for c in state.characters if scene and c.what.lower() in scene.lower()]
    about = f", about {' and '.join(here)}" if here else ""
    if state.characters:
        lines.append("Characters: " + "; ".join(f"{c.name} ({c.what})" for c in state.characters) + ".")
    if state.plot:
        lines.append("Story so far: " + " ".join(state.plot[-PLOT_SHOWN:]))
    elif state.setting and not scene:
        lines.append(f"Setting: {state.setting}")
    if scene:
        lines.append(f"Picture: {named_scene(scene, state)}")
    if direction:
        lines.append(f"Direction: {direction.strip()}.".replace("..", "."))
    if ending:
        lines.append(f"Write the last paragraph of the story{about}: end it.")
    elif state.plot:
        lines.append(f"Write the next paragraph of the story{about}.")
    else:
        lines.append(f"Write the opening paragraph of the story{about}.")
    chat = [{"role": "system", "content": SYSTEM}]
    for request, paragraph in _EXAMPLES:
        chat += [{"role": "user", "content": request}, {"role": "assistant", "content": paragraph}]
    return [*chat, {"role": "user", "content": "\n".join(lines)}]


def tidy(text: str, plot: list[str] = ()) -> str:
    """A paragraph as shown: one line, whole sentences only, no sentence said twice (in it, or in the
    plot so far, which small models copy), unless that leaves nothing."""
    text = " ".join(text.split())
    sentences = [s.strip() for s in _SENTENCE.findall(text)]
    if not sentences:
        return text
    said = {s.strip().lower() for p in plot for s in _SENTENCE.findall(p)}
    out: list[str] = []
    for s in sentences:
        if s.lower() not in said:
            out.append(s)
            said.add(s.lower())
    return " ".join(out) or sentences[0]


class Story:
    """A story being told on an `Assistant`: `turn(image, direction)` writes the next paragraph.

    Args:
        assistant: the model.
        state: a saved story to go on with (default: a new one).
        max_new_tokens: the longest paragraph, in tokens.
        sampling: further sampling options (temperature, seed, ...).
    """

    def __init__(
        self, assistant: Assistant, state: StoryState | None = None, max_new_tokens: int = 110, **sampling: Any
    ):
        self.assistant = assistant
        self.state = state or StoryState()
        self.sampling = {"max_new_tokens": max_new_tokens, **sampling}

    @property
    def paragraphs(self) -> list[str]:
        return list(self.state.plot)

    def turn(self, image: Any = None, direction: str | None = None) -> str:
        """Write the next paragraph: about `image` (if given), following `direction` (if given).

        Returns:
            The paragraph (also appended to `state.plot`).
        """
        state = self.state
        if state.ended:
            raise VispromptError("the story has ended: start a new one")
        if image is None and not state.plot:
            raise VispromptError("a story begins with a picture")
        scene = ""
        if image is not None:
            scene = str(self.assistant.describe(image, max_new_tokens=self.sampling["max_new_tokens"])).strip()
            add_character(state, main_subject(scene))
            if not state.setting:
                state.setting = scene
        ending = wants_ending(direction)
        chat = story_chat(state, scene, direction, ending)
        params = {**self.sampling, "stop": ["\n\n", *self.sampling.get("stop", [])]}
        text = tidy(str(self.assistant.generate(chat, **params)), state.plot)
        state.plot.append(text)
        state.scenes.append(scene)
        state.ended = ending
        return text

    def tell(self, images: list[Any], turns: int | None = None) -> list[str]:
        """One turn per image (then turns without a picture, up to `turns`); returns the new paragraphs."""
        turns = len(images) if turns is None else turns
        if turns < 1:
            raise VispromptError(f"turns must be >= 1, got {turns}")
        out = []
        for i in range(turns):
            out.append(self.turn(images[i] if i < len(images) else None, None if i < len(images) else "go on"))
        return out
