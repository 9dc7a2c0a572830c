"""VisionLanguageModel: vision encoder -> connector -> language model, with one of three fusions.

Prefix fusion (LLaVA, nanoVLM): the prompt holds `tokens_per_image` placeholder tokens per image;
their input embeddings are overwritten by the connector's outputs, so the LM reads image tokens
through its ordinary self-attention.

Cross-attention fusion (Flamingo, models/cross_attention.py): ONE placeholder per image marks where it
sits; gated cross-attention blocks in front of the decoder layers read the image features.

Mixture fusion (models/mixture.py): one prefix-fusion branch per image, mixed per token; the forward
returns the mixture's log-probabilities as logits.

Whatever the fusion, `forward` takes the same arguments and returns logits and an opaque cache to
pass back, so one decode core (runtime/sequence.py, through runtime/decoder.py's ReferenceDecoder) serves all three. The fusion's own weights
(`fusion.*`) belong to the "connector" part for freezing and learning rates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ModelLoadError, ModelNotFoundError, one_line
from .config import BuiltConfig, VLMConfig
from .cross_attention import CrossAttentionFusion
from .language_model import build_language_model, language_model_from_config, lm_config_dict, text_dims
from .lm_head import HeadInput, head_rows, keep_mask
from .mixture import MixtureFusion
from .modality_projector import ModalityProjector
from .tokenizer import prepare_tokenizer, train_tokenizer
from .vision_encoder import VisionEncoder

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"  # written last: a folder without it is an incomplete save
PARTS = ("vision", "connector", "lm")


@dataclass
class VLMOutput:
    logits: torch.Tensor  # [B, T, V] (or [B, k, V] with logits_to_keep=k)
    loss: torch.Tensor | None = None
    past_key_values: Any = None
    mixture_weights: torch.Tensor | None = None  # [B, T, J] a_ij of mixture fusion with several images


def skip_init():
    """Skip random init when every weight is about to be loaded from a checkpoint."""
    try:
        from transformers.initialization import no_init_weights

        return no_init_weights()
    except ImportError:  # older transformers
        return contextlib.nullcontext()


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: VLMConfig, vision: VisionEncoder, connector: ModalityProjector, lm: nn.Module, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.vision = vision
        self.connector = connector
        self.lm = lm
        self.tokenizer = tokenizer
        # transformers 5.2x renamed past_key_values -> cache; accept either version.
        self._cache_arg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        self.fusion = _build_fusion(cfg, lm)  # None for prefix fusion

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: VLMConfig, texts: Iterable[str] | None = None) -> VisionLanguageModel:
        """Build every part from its source in cfg. A scratch LM trains its tokenizer on `texts`.

        `cfg` is left as given: the model keeps a filled copy as `model.cfg`, with the image settings
        resolved (the encoder's own where cfg leaves them at 0 / ()) and `built` worked out.
        """
        tokenizer = None
        if cfg.lm_source == "scratch":
            if texts is None:
                raise ConfigError("a scratch language model needs training text for its tokenizer")
            tokenizer = train_tokenizer(texts, cfg.tokenizer_vocab_size, cfg.image_token)
        lm, tokenizer = build_language_model(cfg, tokenizer)
        tokenizer = prepare_tokenizer(tokenizer, cfg.image_token)
        if lm.get_input_embeddings().num_embeddings < len(tokenizer):
            lm.resize_token_embeddings(len(tokenizer))

        vision, image = VisionEncoder.build(cfg)
        lm_dim = _image_token_dim(cfg, lm)
        text_rms = float(lm.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt())
        with torch.no_grad():  # one dry run tells how many patch tokens an image becomes
            num_patches = vision.eval()(torch.zeros(1, 3, image.size, image.size)).shape[1]
        connector = ModalityProjector(
            vision.hidden_size,
            lm_dim,
            cfg.connector_hidden_size,
            cfg.connector_pixel_shuffle,
            cfg.connector_dropout,
            output_scale=text_rms * cfg.connector_output_gain,
            num_patches=num_patches,
            input_norm=cfg.connector_input_norm,
            kind=cfg.connector_type,
            tile_separator=cfg.image_tiling == "anyres",
        )
        n_tokens = connector.output_tokens(num_patches)
        if cfg.fusion == "cross_attention":
            # one placeholder marks the image's place; the blocks read its features
            tokens_per_image, feature_tokens = 1, cfg.resampler_latents or n_tokens
        else:
            tokens_per_image = feature_tokens = n_tokens
        built = BuiltConfig(
            vision_config=vision.config_dict(),
            vision_num_patches=num_patches,
            image_feature_tokens=feature_tokens,
            lm_config=lm_config_dict(lm),
            image_token_id=tokenizer.convert_tokens_to_ids(cfg.image_token),
            tokens_per_image=tokens_per_image,
        )
        filled = dataclasses.replace(
            cfg, image_size=image.size, image_mean=tuple(image.mean), image_std=tuple(image.std), built=built
        )
        return cls(filled, vision, connector, lm, tokenizer)

    @classmethod
    def from_config(cls, cfg: VLMConfig, tokenizer, folder: Path | None = None) -> VisionLanguageModel:
        """The model a filled config (one `build` returned, or a saved config.json) describes, with
        uninitialised weights: for loading weights into it. `folder`: where the config was read from,
        named when its values do not describe a model (a one-line ConfigError)."""
        try:
            with skip_init():
                vision = VisionEncoder.from_config(cfg)
                lm = language_model_from_config(cfg.lm_config)
                connector = ModalityProjector(
                    vision.hidden_size,
                    _image_token_dim(cfg, lm),
                    cfg.connector_hidden_size,
                    cfg.connector_pixel_shuffle,
                    cfg.connector_dropout,
                    num_patches=cfg.vision_num_patches,
                    input_norm=cfg.connector_input_norm,
                    kind=cfg.connector_type,
                    tile_separator=cfg.image_tiling == "anyres",
                )
            model = cls(cfg, vision, connector, lm, tokenizer)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:  # what a config of wrong values raises
            where = folder / CONFIG_NAME if folder is not None else "the config"
            raise ConfigError(f"{where} does not describe a model: {one_line(exc)}") from None
        model.lm.tie_weights()  # tied embeddings (the LM config says) share one tensor, as when built
        return model

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> VisionLanguageModel:
        """Rebuild a saved model offline. A folder that cannot be loaded (a config.json that is not a
        model config, truncated weights, weights of other shapes, a broken tokenizer) is a one-line
        ConfigError or ModelLoadError naming the file; a folder without config.json is an incomplete
        save."""
        from safetensors.torch import load_model

        folder = Path(folder)
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise ModelNotFoundError(f"{folder} has no {WEIGHTS_NAME}: not a saved visprompt model")
        if not (folder / CONFIG_NAME).is_file():
            raise ModelNotFoundError(f"{folder} has no {CONFIG_NAME}: an incomplete save, or not a visprompt model")
        model = cls.from_config(VLMConfig.load(folder), load_tokenizer(folder), folder)
        # safetensors stores a tied tensor once under one of its names: tied (above), loading that
        # name fills both; any other missing weight is an error.
        _check_weight_shapes(model, weights)
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
        tied = {n for n in missing if n.startswith("lm.") and _is_tied(model, n)}
        if unexpected or set(missing) - tied:
            raise ModelLoadError(
                f"{weights} does not match its config.json (missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
        return model.to(device).eval()

    def save_pretrained(self, folder: str | Path, extra_files: dict[str, str] | None = None) -> None:
        """Write config.json, model.safetensors and the tokenizer into `folder`, atomically: a kill
        at any moment leaves the previous save (or nothing), never a mix (see `visprompt.files`).
        LoRA adapters are merged into plain weights: the folder loads as a plain model.

        extra_files: name -> text of files saved with the model in the same step (a model card,
        a training summary), so they always describe the weights beside them.
        """
        from ..files import staged_folder

        with staged_folder(folder, commit_file=CONFIG_NAME) as tmp:
            self._write(tmp)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")

    def _write(self, folder: Path) -> None:
        from safetensors.torch import save_file, save_model

        from .lora import has_lora, merged_state_dict

        self.cfg.save(folder)
        if has_lora(self):
            save_file(merged_state_dict(self), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            save_model(self, str(folder / WEIGHTS_NAME))  # handles tied embeddings
        self.tokenizer.save_pretrained(folder)

    # -- freezing --------------------------------------------------------------------------------
    def part(self, name: str) -> nn.Module:
        """The modules of one part; the fusion's own weights (cross-attention blocks, resampler,
        mixture scorer) count as "connector", so freezing and per-part LRs cover them."""
        if name not in PARTS:
            raise ConfigError(f"unknown model part {name!r}; parts are {', '.join(PARTS)}")
        if name == "connector" and self.fusion is not None:
            return nn.ModuleList([self.connector, self.fusion])
        return getattr(self, name)

    def trainable_parameters(self) -> dict[str, int]:
        return {p: sum(t.numel() for t in self.part(p).parameters() if t.requires_grad) for p in PARTS}

    # -- forward ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_images(
        self, pixel_values: torch.Tensor, image_layouts: list | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """Images -> the embeddings the fusion reads (encoder, connector, and the resampler if any).

        Args:
            pixel_values: [n_views, 3, H, W] normalised views (H = W = cfg.image_size): one per
                image, or with `image_layouts` each image's views (models/image_inputs.py).
            image_layouts: one ImageLayout per image (`prepare_images`), for tiled images.

        Returns:
            [n_images, image_feature_tokens, D] image embeddings; D is the LM's token-embedding width
            (prefix, mixture) or its hidden size (cross-attention). With `image_layouts`: a list of
            [layout.n_tokens, D], one per image.
        """
        return self.encode_vision_features(self.vision(pixel_values), image_layouts)

    def encode_vision_features(
        self, vision_features: torch.Tensor, image_layouts: list | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """The part of `encode_images` after the encoder (the trainer calls it on stored outputs of a
        frozen encoder).

        Args:
            vision_features: [n_views, N, Dv] patch tokens from `self.vision` (N = vision_num_patches).
            image_layouts: as for `encode_images`.

        Returns:
            image embeddings, as `encode_images`.
        """
        features = self.connector(vision_features)
        if isinstance(self.fusion, CrossAttentionFusion):
            features = self.fusion.encode(features)  # the resampler, when there is one
        if image_layouts is not None:
            return self.connector.arrange_tiles(features, [lay.grid for lay in image_layouts])
        return features

    def expand_image_placeholders(self, ids: list[int], counts: list[int] | None = None) -> list[int]:
        """Each image placeholder id becomes copies of itself: `counts[i]` for the i-th image (its
        `ImageLayout.n_tokens`), or tokens_per_image each (1 for cross-attention)."""
        out: list[int] = []
        k = 0
        for t in ids:
            if t != self.cfg.image_token_id:
                out.append(t)
                continue
            if counts is not None and k >= len(counts):
                raise ValueError(f"the prompt has more image placeholders than the {len(counts)} images given")
            out.extend([t] * (self.cfg.tokens_per_image if counts is None else counts[k]))
            k += 1
        return out

    def image_slots(self, input_ids: torch.Tensor, n_image_tokens: int, strict: bool = False) -> torch.Tensor:
        """Which placeholder positions `n_image_tokens` image tokens fill.

        Args:
            input_ids: [B, T] token ids.
            n_image_tokens: image tokens given for this forward (prefix/mixture: images x
                tokens_per_image; cross-attention: images, one placeholder each).
            strict: every placeholder must be filled (a prompt); otherwise placeholders beyond the
                filled ones (a generated placeholder id, ids after the prompt) are ordinary text tokens.

        Returns:
            [B, T] bool: the first `n_image_tokens` placeholders in prompt (row-major) order.
        """
        is_placeholder = input_ids == self.cfg.image_token_id  # [B, T]
        n_placeholders = int(is_placeholder.sum())
        if n_placeholders < n_image_tokens or (strict and n_placeholders != n_image_tokens):
            if not n_image_tokens:
                raise ValueError("the prompt has image placeholders but no images were given")
            raise ValueError(f"{n_placeholders} image placeholder tokens but {n_image_tokens} image tokens")
        if n_placeholders == n_image_tokens:
            return is_placeholder
        rank = is_placeholder.flatten().cumsum(0).reshape(is_placeholder.shape)  # 1-based, row-major
        return is_placeholder & (rank <= n_image_tokens)

    def embed(
        self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None, strict: bool = False
    ) -> torch.Tensor:
        """Input embeddings with image tokens in the placeholder slots (prefix fusion).

        Args:
            input_ids: [B, T] token ids.
            image_embeds: [n_images, tokens_per_image, D] in prompt order, a list of [n_tokens_i, D]
                (tiled images), or None.
            strict: raise unless the images fill every placeholder (for a whole prompt). Otherwise a
                placeholder id no image fills (a decode step's, one after the prompt) embeds as text.

        Returns:
            [B, T, D] input embeddings.
        """
        embeds = self.lm.get_input_embeddings()(input_ids)
        flat = flat_image_embeds(image_embeds)  # [n_image_tokens, D]
        n_image_tokens = 0 if flat is None else flat.shape[0]
        slots = self.image_slots(input_ids, n_image_tokens, strict)  # [B, T]
        if not n_image_tokens:
            return embeds
        flat = flat.to(embeds.dtype)
        return embeds.masked_scatter(slots.unsqueeze(-1), flat)

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
        vision_features: torch.Tensor | None = None,
        image_layouts: list | None = None,
        full_logits: bool = False,
    ) -> VLMOutput:
        """Next-token logits for a batch of prompts, with the images fused per cfg.fusion.

        Images are given with the first (uncached) forward of a prompt, in one of three forms, and fill
        the image placeholders in prompt (row-major) order; a placeholder id no image fills (a generated
        token in a decode step, ids after the prompt) is an ordinary text token.

        Args:
            input_ids: [B, T] token ids: prefix/mixture: tokens_per_image placeholders per image;
                cross-attention: one placeholder per image. With a cache, only the new tokens.
            attention_mask: [B, T_total] 1 for real tokens, 0 for padding (T_total counts cached tokens).
            pixel_values: [n_images, 3, H, W] normalised images, in prompt order across the batch
                (with image_layouts: every image's views, [n_views, 3, H, W]).
            image_embeds: [n_images, image_feature_tokens, D] already encoded images (`encode_images`),
                or a list of [n_tokens_i, D] (tiled images).
            labels: [B, T] targets aligned with input_ids (-100: no loss); position t predicts t+1.
                The LM head then runs only at the n positions that predict a label (see `logits`).
            position_ids: [B, T] positions of the new tokens (default: counting from the cache length).
            past_key_values: the cache a previous call returned (its type depends on the fusion).
            use_cache: return a cache for the next decode step.
            logits_to_keep: > 0: logits for the last k positions only.
            vision_features: [n_images, N, Dv] the vision encoder's outputs (`self.vision`).
            image_layouts: one ImageLayout per image (models/image_inputs.py) when pixel_values or
                vision_features hold tiled images' views.
            full_logits: with labels, compute the logits of every position all the same (and the
                loss from them): the reference the label-positions-only path is tested against.

        Returns:
            VLMOutput with
                logits: [B, T, V] ([B, k, V] with logits_to_keep=k); mixture fusion with several images
                    per prompt gives the mixture's log-probabilities. With labels (and not
                    full_logits, logits_to_keep or a cache): [n, V], the logits of the n positions t
                    whose next label labels[b, t+1] is not -100, in row-major (b, t) order.
                loss: scalar next-token cross-entropy when labels are given, else None.
                past_key_values: the cache to pass back with use_cache, else None.
                mixture_weights: [B, T, J] per-token image weights a_ij of mixture fusion with several
                    images ([n, J] at the label positions, as logits), else None.
        """
        if image_embeds is None and vision_features is not None:
            image_embeds = self.encode_vision_features(vision_features, image_layouts)
        elif image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_images(pixel_values, image_layouts)
        weights = None
        args = (input_ids, attention_mask, image_embeds, position_ids, past_key_values, use_cache, logits_to_keep)
        # With labels, the head and the loss only at the positions that predict a label: the rest of
        # [B, T, V] (image tokens, prompts, padding) would be computed and thrown away.
        keep = None
        if labels is not None and not full_logits and not logits_to_keep and past_key_values is None:
            keep = keep_mask(labels)  # [B, T]
        if isinstance(self.fusion, MixtureFusion):
            logits, cache, weights = self.fusion.run(self, *args, keep=keep)
        elif self.fusion is None:
            logits, cache = self._prefix_forward(*args, keep=keep)
        else:
            with _head_at(self.lm, keep) as head:
                logits, cache = self.fusion.run(self, *args)
            logits = _flat(head.logits(logits), keep)
        loss = None
        if labels is not None:
            # Next-token loss: position t predicts token t+1; -100 marks tokens with no loss.
            if keep is not None:  # logits: [n, V], the positions keep marks, row-major
                loss = F.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]])
            else:
                shifted = logits[:, :-1].float()  # [B, T-1, V]
                loss = F.cross_entropy(
                    shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
                )
        return VLMOutput(logits, loss, cache, weights)

    def _prefix_forward(
        self,
        input_ids,
        attention_mask,
        image_embeds,
        position_ids,
        past_key_values,
        use_cache,
        logits_to_keep,
        keep: torch.Tensor | None = None,
    ):
        """(logits, cache) of prefix fusion: [B, T, V], or [n, V] at the positions `keep` ([B, T]) marks."""
        embeds = self.embed(input_ids, image_embeds)  # [B, T, D]
        with _head_at(self.lm, keep) as head:
            out = self.lm(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **{self._cache_arg: past_key_values},
            )
        return _flat(head.logits(out.logits), keep), (out.get(self._cache_arg) if use_cache else None)


def _head_at(lm: nn.Module, keep: torch.Tensor | None):
    """`head_rows` reading [R, T, D] -> [1, n, D] at the positions `keep` marks; without `keep` the LM
    runs untouched (no hook: generation's forwards stay as they were)."""
    if keep is None:
        return contextlib.nullcontext(HeadInput(None))
    return head_rows(lm, lambda h: h[keep][None])


def _flat(logits: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """[1, n, V] -> [n, V] when positions were kept; otherwise the logits unchanged."""
    return logits if keep is None else logits.reshape(-1, logits.shape[-1])


def flat_image_embeds(image_embeds: torch.Tensor | list[torch.Tensor] | None) -> torch.Tensor | None:
    """[n_image_tokens, D]: every image's tokens in order, from [n_images, N, D] or a list of [N_i, D]."""
    if image_embeds is None:
        return None
    if isinstance(image_embeds, torch.Tensor):
        return image_embeds.reshape(-1, image_embeds.shape[-1])
    return torch.cat(list(image_embeds)) if len(image_embeds) else None


def _image_token_dim(cfg: VLMConfig, lm: nn.Module) -> int:
    """Width of the connector's output: the LM's token embeddings for prefix and mixture fusion (image
    tokens stand in for them), the decoder's hidden size for cross-attention (the blocks read it)."""
    embed_dim, hidden_size, _ = text_dims(lm)
    return hidden_size if cfg.fusion == "cross_attention" else embed_dim


def _build_fusion(cfg: VLMConfig, lm: nn.Module) -> nn.Module | None:
    if cfg.fusion == "prefix":
        return None
    embed_dim, hidden_size, lm_heads = text_dims(lm)
    if cfg.fusion == "mixture":
        # scores read the final hidden state, the LM head's input, which has the embeddings' width
        return MixtureFusion(embed_dim, cfg.mixture_max_images)
    dim = hidden_size
    if cfg.image_feature_tokens < 1:
        raise ConfigError("image_feature_tokens is not set: build the model with VisionLanguageModel.build")
    heads = cfg.xattn_heads or lm_heads
    if not heads:
        raise ConfigError("set xattn_heads: the LM's config does not say how many attention heads it has")
    return CrossAttentionFusion(
        lm,
        dim,
        cfg.image_feature_tokens,
        cfg.xattn_every,
        heads,
        cfg.xattn_ff_mult,
        cfg.resampler_latents,
        cfg.resampler_depth,
        cfg.xattn_gate_init,
    )


def _is_tied(model: nn.Module, name: str) -> bool:
    """True when parameter `name` shares storage with another parameter (tied embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and any(p is target for n, p in params.items() if n != name)


def _check_weight_shapes(model: nn.Module, weights: Path) -> None:
    """A one-line ModelLoadError for a weights file that is not readable safetensors or holds a tensor
    of another shape than the model built from config.json has (torch would say so over many lines)."""
    from safetensors import SafetensorError, safe_open

    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{weights} is not a readable safetensors file: {one_line(exc)}") from None
    for name, shape in stored.items():
        if name in expected and shape != expected[name]:
            raise ModelLoadError(
                f"{weights} does not match its config.json: {name} is {list(shape)}, "
                f"config expects {list(expected[name])}"
            )


def load_tokenizer(folder: Path):
    """AutoTokenizer without its warning about config.json's model_type (ours is 'visprompt'); a folder
    whose tokenizer files do not load is a one-line ModelLoadError."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - transformers and tokenizers raise many kinds on bad files
        raise ModelLoadError(f"{folder}: its tokenizer does not load: {one_line(exc)}") from None
    finally:
        logging.set_verbosity(level)
