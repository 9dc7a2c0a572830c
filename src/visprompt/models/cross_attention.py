"""Cross-attention fusion (Flamingo): gated cross-attention blocks in front of the LM's decoder layers.

Text hidden states attend to image features with a_ij = softmax_j(q_i . k_j / sqrt(d) + b), where b is
a learned bias per head and per image-token position. Each block adds its attention output and a
feed-forward through tanh gates that start at 0, so an untrained model is exactly the plain LM.

Works with any transformers causal LM: the decoder layers are found by walking the model (the
homogeneous nn.ModuleList holding most parameters), and each block runs as a forward pre-hook on its
layer, so the LM's own modules and weight names stay untouched (a pretrained LM loads as before and
the blocks' weights live outside it, under `fusion.*`, trained as part of the "connector").

The prompt holds ONE placeholder token per image, marking where the image sits; the placeholder stays
an ordinary token for the LM. A text token sees only the images whose placeholder is at or before it
(media-position masking, as in Flamingo, with every earlier image visible). Image keys/values are
computed once per prompt and kept in `CrossAttentionCache` for the decode steps.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


def find_decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's list of decoder blocks, found by walking the model rather than by a per-family path.

    Candidates are nn.ModuleLists whose items all share one class; a list as long as
    config.num_hidden_layers wins, then the one holding the most parameters (so a per-layer list of
    MoE experts never beats the list of layers that contains them).
    """
    want = getattr(getattr(lm, "config", None), "num_hidden_layers", None)
    best, best_key = None, None
    for _name, mod in lm.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or len({type(m) for m in mod}) != 1:
            continue
        key = (len(mod) == want, sum(p.numel() for p in mod.parameters()), len(mod))
        if best_key is None or key > best_key:
            best, best_key = mod, key
    if best is None:
        raise ConfigError(f"cannot find the decoder layers of {type(lm).__name__}: no nn.ModuleList of blocks")
    return best


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int):
        super().__init__(
            nn.LayerNorm(dim), nn.Linear(dim, mult * dim, bias=False), nn.GELU(), nn.Linear(mult * dim, dim, bias=False)
        )


class PerceiverAttention(nn.Module):
    """Latents attend to [image tokens; latents] (Flamingo's resampler attention)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Args:
            x: [n, N, D] image tokens.
            latents: [n, L, D] the current latents.

        Returns:
            [n, L, D] the latents' attention output (to add to the latents).
        """
        n, L, D = latents.shape
        h = self.heads
        lat = self.norm_latents(latents)
        q = self.to_q(lat)
        k, v = self.to_kv(torch.cat([self.norm_media(x), lat], dim=1)).chunk(2, dim=-1)  # [n, N+L, D]
        q, k, v = (t.reshape(n, -1, h, D // h).transpose(1, 2) for t in (q, k, v))  # [n, h, *, dh]
        out = F.scaled_dot_product_attention(q, k, v)  # [n, h, L, dh]
        return self.to_out(out.transpose(1, 2).reshape(n, L, D))


class PerceiverResampler(nn.Module):
    """Any number of image tokens -> a fixed number of learned latents: [n, N, D] -> [n, L, D]."""

    def __init__(self, dim: int, num_latents: int, depth: int, heads: int, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads), FeedForward(dim, ff_mult)]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: [n, N, D] image tokens (the connector's output).

        Returns:
            [n, L, D] the learned latents after reading the image (L = num_latents).
        """
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)  # [n, L, D]
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm(latents)


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(attn_gate) * XAttn(LN(x), images), then x + tanh(ff_gate) * FF(x); gates start at 0."""

    def __init__(self, dim: int, heads: int, image_tokens: int, ff_mult: int = 4, gate_init: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"cross-attention heads ({heads}) must divide the LM hidden size ({dim})")
        self.heads, self.image_tokens = heads, image_tokens
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.bias = nn.Parameter(torch.zeros(heads, image_tokens))  # b: per head and image-token position
        self.attn_gate = nn.Parameter(torch.full((1,), float(gate_init)))
        self.ff = FeedForward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.full((1,), float(gate_init)))

    def media_kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # media: [B, M, L, D] (M images per row, L tokens each) -> keys, values [B, h, M*L, dh]
        B, M, L, D = media.shape
        k, v = self.to_kv(media.reshape(B, M * L, D)).chunk(2, dim=-1)
        return tuple(t.reshape(B, M * L, self.heads, D // self.heads).transpose(1, 2) for t in (k, v))

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None, visible: torch.Tensor | None
    ) -> torch.Tensor:
        """Args:
            x: [B, T, D] hidden states entering a decoder layer.
            kv: image keys and values from `media_kv`, each [B, h, M*L, dh]; None: no images.
            visible: [B, T, M] bool, which of the M images each token may read; None: no images.

        Returns:
            [B, T, D] hidden states with the gated cross-attention and feed-forward added.
        """
        if kv is not None and visible is not None and visible.shape[-1] > 0:
            _, out = self.cross_attend(x, kv, visible)
            x = x + torch.tanh(self.attn_gate) * out
        return x + torch.tanh(self.ff_gate) * self.ff(x)

    def cross_attend(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], visible: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The text -> image attention, before its gate.

        Args:
            x: [B, T, D] hidden states entering a decoder layer.
            kv: image keys and values from `media_kv`, each [B, h, M*L, dh].
            visible: [B, T, M] bool, which of the M images each token may read (M >= 1).

        Returns:
            (weights [B, h, T, M*L] a_ij, each row summing to 1 over the visible images' tokens (a
            token with no image before it gets a dummy row); output [B, T, D], zero for such tokens).
        """
        B, T, D = x.shape
        h = self.heads
        k, v = kv
        M = visible.shape[-1]
        q = self.to_q(self.norm(x)).reshape(B, T, h, D // h).transpose(1, 2)  # [B, h, T, dh]
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // h)  # [B, h, T, M*L]
        scores = scores + self.bias.repeat(1, M).to(scores.dtype)[None, :, None, :]
        mask = visible.repeat_interleave(self.image_tokens, dim=-1)[:, None]  # [B, 1, T, M*L]
        # A token with no image before it gets a finite dummy row, zeroed below (never NaN).
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(B, T, D)  # [B, T, D]
        return weights, self.to_out(out).masked_fill(~visible.any(-1, keepdim=True), 0.0)


class _BlockHook:
    """Forward pre-hook of one decoder layer: runs its gated block on the incoming hidden states.

    A callable object rather than a closure, so copy.deepcopy of the model maps it to the copy's blocks.
    """

    def __init__(self, fusion: CrossAttentionFusion, block_idx: int):
        self.fusion, self.block_idx = fusion, block_idx

    def __call__(self, module, args, kwargs):
        ctx = self.fusion._ctx
        if ctx is None:  # the LM called on its own: the plain LM
            return None
        kv, visible = ctx
        block = self.fusion.blocks[self.block_idx]
        kv_i = kv[self.block_idx] if kv else None
        if args:
            return (block(args[0], kv_i, visible), *args[1:]), kwargs
        kwargs["hidden_states"] = block(kwargs["hidden_states"], kv_i, visible)
        return args, kwargs


@dataclass
class CrossAttentionCache:
    """What decoding needs besides the LM's KV cache: each block's image keys/values (computed once),
    the column of each image's placeholder, and how many columns have been seen."""

    lm: Any  # the LM's own cache
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # per block, [B, h, M*L, dh]
    image_cols: torch.Tensor  # [B, M] placeholder column of each image; a huge value for missing ones
    seen: int


class CrossAttentionFusion(nn.Module):
    """The optional resampler plus one gated block per `every` decoder layers, hooked into the LM."""

    def __init__(
        self,
        lm: nn.Module,
        dim: int,
        image_tokens: int,
        every: int,
        heads: int,
        ff_mult: int,
        resampler_latents: int,
        resampler_depth: int,
        gate_init: float = 0.0,
    ):
        super().__init__()
        layers = find_decoder_layers(lm)
        # OpenFlamingo's placement: in front of layers every-1, 2*every-1, ...
        self.layer_ids = [i for i in range(len(layers)) if (i + 1) % every == 0]
        if not self.layer_ids:
            raise ConfigError(f"xattn_every={every} is larger than the LM's {len(layers)} decoder layers")
        self.resampler = (
            PerceiverResampler(dim, resampler_latents, resampler_depth, heads, ff_mult) if resampler_latents else None
        )
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(dim, heads, image_tokens, ff_mult, gate_init) for _ in self.layer_ids
        )
        self._ctx: tuple[list | None, torch.Tensor | None] | None = None  # set only inside `run`
        for block_idx, layer_idx in enumerate(self.layer_ids):
            layers[layer_idx].register_forward_pre_hook(_BlockHook(self, block_idx), with_kwargs=True)

    @contextlib.contextmanager
    def conditioned(self, kv, visible):
        self._ctx = (kv, visible)
        try:
            yield
        finally:
            self._ctx = None

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Args:
            features: [n, N, D] connector output.

        Returns:
            [n, L, D] what the blocks read: the resampler's latents (L = resampler_latents), or the
            features themselves (L = N) without a resampler.
        """
        return self.resampler(features) if self.resampler is not None else features

    def run(self, model, input_ids, attention_mask, image_embeds, position_ids, cache, use_cache, logits_to_keep):
        """The LM forward with the blocks conditioned on this batch's images (see VisionLanguageModel.forward).

        Args:
            input_ids: [B, T]; one placeholder per image marks where it sits.
            image_embeds: [n_images, L, D] from `encode_images`, only with the first forward.
            cache: None, or the CrossAttentionCache a previous call returned.

        Returns:
            (logits [B, T or logits_to_keep, V], CrossAttentionCache or None).
        """
        T = input_ids.shape[1]
        if isinstance(cache, CrossAttentionCache):
            # a placeholder id in a decode step is a generated token: text, not a new image
            if image_embeds is not None:
                raise ValueError("images can only be given with the first (uncached) forward of a prompt")
            kv, image_cols, start, lm_cache = cache.kv, cache.image_cols, cache.seen, cache.lm
        else:
            if cache is not None:
                raise TypeError(f"cross-attention fusion needs a CrossAttentionCache, got {type(cache).__name__}")
            start, lm_cache = 0, None
            n_images = 0 if image_embeds is None else image_embeds.shape[0]
            kv, image_cols = self._media(model.image_slots(input_ids, n_images), image_embeds)
        cols = start + torch.arange(T, device=input_ids.device)
        visible = image_cols[:, None, :] <= cols[None, :, None]  # [B, T, M]: image placed at or before the token
        with self.conditioned(kv, visible):
            out = model.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **{model._cache_arg: lm_cache},
            )
        new_cache = CrossAttentionCache(out.get(model._cache_arg), kv, image_cols, start + T) if use_cache else None
        return out.logits, new_cache

    def _media(self, is_image: torch.Tensor, image_embeds: torch.Tensor | None):
        """Per-row image features and their placeholder columns; keys/values of every block.
        is_image: [B, T] the placeholders the images fill (one per image, see `image_slots`)."""
        B = is_image.shape[0]
        counts = is_image.sum(1)  # [B] images per row
        if image_embeds is None:
            return None, torch.empty(B, 0, dtype=torch.long, device=is_image.device)
        M = int(counts.max())
        rows, cols = is_image.nonzero(as_tuple=True)  # row-major = prompt order
        slot = (is_image.cumsum(1) - 1)[rows, cols]  # index of each image within its row
        media = image_embeds.new_zeros(B, M, *image_embeds.shape[1:])  # [B, M, L, D]
        media[rows, slot] = image_embeds
        image_cols = torch.full((B, M), torch.iinfo(torch.long).max, dtype=torch.long, device=is_image.device)
        image_cols[rows, slot] = cols
        return [block.media_kv(media) for block in self.blocks], image_cols
