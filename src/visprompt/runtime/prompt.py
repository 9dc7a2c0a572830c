"""A request's prompt as the runtime sees it (no torch import: backends that answer without a model
build prompts in processes that never load torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class Prompt:
    """One request's prompt as the runtime sees it.

    Fields:
        ids: token ids, image placeholders expanded (one id per image token).
        image_embeds: [n_images, tokens_per_image, D] features for the placeholders, in order, or a
            list of [n_tokens_i, D] (tiled images take different numbers of tokens).
        image_keys: content fingerprints of the images (the prefix cache tells images apart by them;
            a prompt with images but no keys is never cached).
        inputs: model-specific inputs a decoder may need besides the ids (a processor's output).
        answer_prefix: text the prompt already began the answer with (see `DecodeSequence`).
        answer_complete: the answer_prefix is the whole answer (a backend that knows the answer
            without the model, e.g. a count the starter's detector gives): the scheduler ends the
            reply at once, as if the model's first token were its stop token, without decoding.
    """

    ids: list[int]
    image_embeds: torch.Tensor | list[torch.Tensor] | None = None
    image_keys: tuple[str, ...] = ()
    inputs: dict[str, Any] | None = None
    answer_prefix: str = ""
    answer_complete: bool = False
    _embeds: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def image_lengths(self) -> list[int] | None:
        """Placeholder tokens per image, in order (None without image embeddings)."""
        return None if self.image_embeds is None else [len(e) for e in self.image_embeds]

    @property
    def cacheable(self) -> bool:
        return self.image_embeds is None or bool(self.image_keys)
