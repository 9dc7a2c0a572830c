"""Backend for visprompt's own VisionLanguageModel folders."""

from __future__ import annotations

from pathlib import Path

import torch

from ...images import ImagePreprocessor, load_image
from ...models.tokenizer import stop_token_ids
from ...models.vision_language_model import VisionLanguageModel
from ..backend import Conversation, GenerationResult, SamplingParams
from ..generation import generate_ids
from ..prompting import encode_chat, to_chat


class OwnVLMBackend:
    def __init__(self, model: VisionLanguageModel, name: str = "visprompt"):
        self.model = model.eval()
        self.name = name
        cfg = model.cfg
        self.preprocess = ImagePreprocessor(cfg.image_size, cfg.image_mean, cfg.image_std, cfg.image_resize_mode)
        self.stop_ids = stop_token_ids(model.tokenizer)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu") -> "OwnVLMBackend":
        return cls(VisionLanguageModel.from_pretrained(folder, device=device), name=str(folder))

    def encode_prompts(self, conversations: list[Conversation]) -> tuple[list[list[int]], torch.Tensor | None]:
        """Token ids per conversation (image placeholders expanded) and all image embeddings in order."""
        model, tok = self.model, self.model.tokenizer
        prompts, images = [], []
        for conv in conversations:
            chat, srcs = to_chat(conv, model.cfg.image_token)
            prompts.append(model.expand_image_placeholders(encode_chat(tok, chat, add_generation_prompt=True)))
            images.extend(load_image(s) for s in srcs)
        if not images:
            return prompts, None
        with torch.inference_mode():
            pixels = self.preprocess(images).to(model.device)  # [n_images, 3, H, W]
            embeds = model.encode_images(pixels)  # [n_images, N, D]
        return prompts, embeds

    def generate(self, conversations: list[Conversation], params: SamplingParams, use_cache: bool = True) -> list[GenerationResult]:
        if not conversations:
            return []
        prompts, embeds = self.encode_prompts(conversations)
        return generate_ids(self.model, prompts, embeds, params, self.stop_ids, self.model.tokenizer, use_cache=use_cache)
