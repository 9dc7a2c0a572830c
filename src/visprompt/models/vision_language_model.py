"""VisionLanguageModel: vision encoder -> connector -> language model, with prefix fusion.

Prefix fusion (LLaVA, nanoVLM): the prompt holds `tokens_per_image` placeholder tokens per image;
their input embeddings are overwritten by the connector's outputs, so the LM reads image tokens
through its ordinary self-attention.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ModelNotFoundError
from .config import VLMConfig
from .language_model import build_language_model, language_model_from_config, lm_config_dict
from .modality_projector import ModalityProjector
from .tokenizer import prepare_tokenizer, train_tokenizer
from .vision_encoder import VisionEncoder

WEIGHTS_NAME = "model.safetensors"
PARTS = ("vision", "connector", "lm")


@dataclass
class VLMOutput:
    logits: torch.Tensor  # [B, T, V] (or [B, k, V] with logits_to_keep=k)
    loss: torch.Tensor | None = None
    past_key_values: Any = None


def _skip_init():
    """Skip random init when every weight is about to be loaded from a checkpoint."""
    try:
        from transformers.initialization import no_init_weights

        return no_init_weights()
    except ImportError:  # older transformers
        return contextlib.nullcontext()


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: VLMConfig, vision: VisionEncoder, connector: ModalityProjector, lm: nn.Module, tokenizer):
        super().__init__()
        if cfg.fusion != "prefix":
            raise ConfigError(f"fusion {cfg.fusion!r} is not available yet; use fusion: prefix")
        self.cfg = cfg
        self.vision = vision
        self.connector = connector
        self.lm = lm
        self.tokenizer = tokenizer
        # transformers 5.2x renamed past_key_values -> cache; accept either version.
        self._cache_arg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: VLMConfig, texts: Iterable[str] | None = None) -> "VisionLanguageModel":
        """Build every part from its source in cfg. A scratch LM trains its tokenizer on `texts`."""
        tokenizer = None
        if cfg.lm_source == "scratch":
            if texts is None:
                raise ConfigError("a scratch language model needs training text for its tokenizer")
            tokenizer = train_tokenizer(texts, cfg.tokenizer_vocab_size, cfg.image_token)
        lm, tokenizer = build_language_model(cfg, tokenizer)
        tokenizer = prepare_tokenizer(tokenizer, cfg.image_token)
        if lm.get_input_embeddings().num_embeddings < len(tokenizer):
            lm.resize_token_embeddings(len(tokenizer))
        cfg.lm_config = lm_config_dict(lm)
        cfg.image_token_id = tokenizer.convert_tokens_to_ids(cfg.image_token)

        vision = VisionEncoder.build(cfg)
        lm_dim = lm.get_input_embeddings().embedding_dim
        connector = ModalityProjector(vision.hidden_size, lm_dim, cfg.connector_hidden_size, cfg.connector_pixel_shuffle, cfg.connector_dropout)
        with torch.no_grad():  # one dry run tells how many tokens an image becomes
            dummy = torch.zeros(1, 3, cfg.image_size, cfg.image_size)
            cfg.tokens_per_image = connector(vision.eval()(dummy)).shape[1]
        return cls(cfg, vision, connector, lm, tokenizer)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "VisionLanguageModel":
        from safetensors.torch import load_model

        folder = Path(folder)
        if not (folder / WEIGHTS_NAME).is_file():
            raise ModelNotFoundError(f"{folder} has no {WEIGHTS_NAME}: not a saved visprompt model")
        cfg = VLMConfig.load(folder)
        tokenizer = _load_tokenizer(folder)
        with _skip_init():
            vision = VisionEncoder.from_config(cfg)
            connector = ModalityProjector(vision.hidden_size, cfg.lm_config["hidden_size"], cfg.connector_hidden_size, cfg.connector_pixel_shuffle, cfg.connector_dropout)
            lm = language_model_from_config(cfg.lm_config)
        model = cls(cfg, vision, connector, lm, tokenizer)
        # safetensors stores a tied tensor once under one of its names: tie first, so loading that
        # name fills both; any other missing weight is an error.
        model.lm.tie_weights()
        missing, unexpected = load_model(model, str(folder / WEIGHTS_NAME), strict=False, device=str(device))
        tied = {n for n in missing if n.startswith("lm.") and _is_tied(model, n)}
        if unexpected or set(missing) - tied:
            raise ModelNotFoundError(f"{folder}/{WEIGHTS_NAME} does not match its config.json (missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
        return model.to(device).eval()

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.cfg.save(folder)
        save_model(self, str(folder / WEIGHTS_NAME))  # handles tied embeddings
        self.tokenizer.save_pretrained(folder)

    # -- freezing --------------------------------------------------------------------------------
    def part(self, name: str) -> nn.Module:
        if name not in PARTS:
            raise ConfigError(f"unknown model part {name!r}; parts are {', '.join(PARTS)}")
        return getattr(self, name)

    def trainable_parameters(self) -> dict[str, int]:
        return {p: sum(t.numel() for t in self.part(p).parameters() if t.requires_grad) for p in PARTS}

    # -- forward ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [n_images, 3, H, W] -> image embeddings [n_images, tokens_per_image, D_lm]
        return self.connector(self.vision(pixel_values))

    def expand_image_placeholders(self, ids: list[int]) -> list[int]:
        """Each image placeholder id becomes tokens_per_image copies of itself."""
        out: list[int] = []
        for t in ids:
            out.extend([t] * self.cfg.tokens_per_image if t == self.cfg.image_token_id else [t])
        return out

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids: [B, T]; image_embeds: [n_images, tokens_per_image, D] in prompt order -> [B, T, D]
        embeds = self.lm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.cfg.image_token_id  # [B, T]
        n_slots = int(is_image.sum())
        if image_embeds is None:
            if n_slots:
                raise ValueError("the prompt has image placeholders but no images were given")
            return embeds
        flat = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)  # [n_images * N, D]
        if flat.shape[0] != n_slots:
            raise ValueError(f"{n_slots} image placeholder tokens but {flat.shape[0]} image tokens")
        return embeds.masked_scatter(is_image.unsqueeze(-1), flat)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> VLMOutput:
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_images(pixel_values)
        embeds = self.embed(input_ids, image_embeds)  # [B, T, D]
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **{self._cache_arg: past_key_values},
        )
        loss = None
        if labels is not None:
            # Next-token loss: position t predicts token t+1; -100 marks tokens with no loss.
            logits = out.logits[:, :-1].float()  # [B, T-1, V]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        cache = out.get(self._cache_arg) if use_cache else None
        return VLMOutput(out.logits, loss, cache)


def _is_tied(model: nn.Module, name: str) -> bool:
    """True when parameter `name` shares storage with another parameter (tied embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and any(p is target for n, p in params.items() if n != name)


def _load_tokenizer(folder: Path):
    """AutoTokenizer without its warning about config.json's model_type (ours is 'visprompt')."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(folder)
    finally:
        logging.set_verbosity(level)
