"""The Python API: one object with the same verbs as the CLI, on any backend.

model = visprompt.load("runs/shapes-tiny")
model.ask("scene.png", "What color is the circle?")
model.describe(["a.jpg", "b.jpg"])              # batched over lists
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
    def load(cls, ref: str = "starter", device: str = "cpu", one_shot: bool = False, **sampling: Any) -> Assistant:
        """one_shot: this process answers once (see `engine.loading.load_backend`)."""
        from ..engine.loading import load_backend

        return cls(load_backend(ref, device=device, one_shot=one_shot), SamplingParams().updated(**sampling))

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

    def describe(self, image: Any, style: str = "brief", **sampling: Any) -> str | list[str]:
        if style not in DESCRIBE_PROMPTS:
            raise VispromptError(f"style must be one of {', '.join(DESCRIBE_PROMPTS)}, got {style!r}")
        return self.ask(image, DESCRIBE_PROMPTS[style], **sampling)

    def explain(self, image: Any, question: str, token: str | None = None, method: str = "mean", **kwargs: Any):
        """Where the model looked: the greedy answer (as `ask` gives it) and each answer token's (or
        `token`'s) text -> image attention mapped onto the image grid; `method` "mean" or "rollout".
        Returns a `visprompt.eval.attention.Explanation`; see `visprompt.eval.attention.explain`."""
        from ..eval.attention import explain

        return explain(self.backend, image, question, token=token, method=method, **kwargs)
