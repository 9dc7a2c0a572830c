"""The Python API: one object with the same verbs as the CLI, on any backend.

model = visprompt.load("runs/shapes-tiny")
model.ask("scene.png", "What color is the circle?")
model.describe(["a.jpg", "b.jpg"])              # batched over lists
model.video("clip.mp4").render()                # scenes with mm:ss starts and a summary
model.lesson("cell.jpg", questions=3, level="school")   # explanation + quiz, schema-valid JSON
model.generate([{"role": "user", "content": [{"type": "image", "image": "a.jpg"},
                                             {"type": "text", "text": "Any cats?"}]}], temperature=0.7)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..engine.backend import Backend, GenerationResult, SamplingParams, normalize_conversations
from ..errors import VispromptError
from ..models.chat import check_question, user_turn

DESCRIBE_PROMPTS = {
    "brief": "Describe the image.",
    "detailed": "Describe the image in detail.",
}


def _is_batch(x: Any) -> bool:
    return isinstance(x, (list, tuple))


class Assistant:
    def __init__(self, backend: Backend, defaults: SamplingParams | None = None):
        self.backend = backend
        self.defaults = defaults or SamplingParams()

    @classmethod
    def load(
        cls,
        ref: str = "starter",
        device: str = "cpu",
        one_shot: bool = False,
        base_url: str | None = None,
        api_key: str | None = None,
        **sampling: Any,
    ) -> Assistant:
        """one_shot: this process answers once; base_url, api_key: the server of an `openai:MODEL`
        reference (see `engine.loading.load_backend`)."""
        from ..engine.loading import load_backend

        backend = load_backend(ref, device=device, one_shot=one_shot, base_url=base_url, api_key=api_key)
        return cls(backend, SamplingParams().updated(**sampling))

    @property
    def name(self) -> str:
        return self.backend.name

    def generate_full(self, conversations: Any, **sampling: Any) -> list[GenerationResult]:
        convs, _ = normalize_conversations(conversations)
        return self.backend.generate(convs, self.defaults.updated(**sampling))

    def generate(self, conversations: Any, **sampling: Any) -> str | list[str]:
        """Reply to one conversation (a list of messages) or to a list of conversations."""
        convs, single = normalize_conversations(conversations)
        texts = [r.text for r in self.backend.generate(convs, self.defaults.updated(**sampling))]
        return texts[0] if single else texts

    def ask(self, image: Any, question: str | Sequence[str], **sampling: Any) -> str | list[str]:
        """Answer a question about an image. Lists of images (and of questions) run as one batch. An
        empty (or blank) question is a VispromptError."""
        after = bool(getattr(self.backend, "image_after_text", False))
        questions = [check_question(q) for q in question] if _is_batch(question) else check_question(question)
        if _is_batch(image):
            questions = questions if _is_batch(questions) else [questions] * len(image)
            if len(questions) != len(image):
                raise VispromptError(f"{len(image)} images but {len(questions)} questions")
            return self.generate([[user_turn([im], q, after)] for im, q in zip(image, questions)], **sampling)
        if _is_batch(questions):
            return self.generate([[user_turn([image], q, after)] for q in questions], **sampling)
        return self.generate([user_turn([image], questions, after)], **sampling)

    def describe(self, image: Any, style: str = "brief", tone: str | None = None, **sampling: Any) -> str | list[str]:
        """Describe an image (or a list of them, as one batch). tone: the same facts in an emotional
        register (`tasks.tone.TONES`: calm, joyful, somber, ...); an unknown tone is a VispromptError."""
        from .tone import in_tone, rewrite_chat, tone_of

        if style not in DESCRIBE_PROMPTS:
            raise VispromptError(f"style must be one of {', '.join(DESCRIBE_PROMPTS)}, got {style!r}")
        if tone is not None:
            tone_of(tone)  # before any work
        plain = self.ask(image, DESCRIBE_PROMPTS[style], **sampling)
        if tone is None:
            return plain
        plains = plain if _is_batch(plain) else [plain]
        rewrites = self.generate([rewrite_chat(p, tone) for p in plains], **sampling)
        toned = [in_tone(p, r, tone) for p, r in zip(plains, rewrites)]
        return toned if _is_batch(plain) else toned[0]

    def story(self, images: Any = (), turns: int | None = None, state: Any = None, **sampling: Any):
        """Tell a story from pictures: one paragraph per image (then, up to `turns`, paragraphs without
        one). state: a `StoryState` (or the path of a saved one) to go on with. Returns the `Story`:
        its `.paragraphs`, `.state` (`.save(path)`), and `.turn(image, direction)` for more."""
        from .story import Story, StoryState

        if isinstance(state, (str, bytes)) or hasattr(state, "__fspath__"):
            state = StoryState.load(state)
        story = Story(self, state, **sampling)
        images = list(images) if _is_batch(images) else [images]
        if images or turns:
            story.tell(images, turns)
        return story

    def video(self, path: Any, max_frames: int = 8, **sampling: Any):
        """A `tasks.video.VideoSummary` of a video file: its scenes (start, end, description) and a
        summary. At most `max_frames` keyframes are described, in one batch."""
        from .video import summarize_video

        after = bool(getattr(self.backend, "image_after_text", False))
        return summarize_video(self.backend, path, max_frames, self.defaults.updated(**sampling), after)

    def lesson(self, image: Any, questions: int = 3, level: str = "school", **sampling: Any) -> dict[str, Any]:
        """A lesson about an image for `level` (child, school, university): {"level", "explanation",
        "questions": [{"question", "choices", "answer", "why"}]}, valid against the packaged
        lesson schema (`tasks.lesson`); `max_new_tokens` defaults to 2048 here."""
        from .lesson import DEFAULT_MAX_NEW_TOKENS, make_lesson

        if sampling.get("max_new_tokens") is None:
            sampling["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        after = bool(getattr(self.backend, "image_after_text", False))
        return make_lesson(self.backend, image, questions, level, self.defaults.updated(**sampling), after)
