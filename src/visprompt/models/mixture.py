"""Mixture fusion for several images: p(t_i+1 | text, images) = sum_j a_ij * p(t_i+1 | text, image_j).

Each image's conditional is a prefix-fusion branch: the prompt with only image j in it. All branches
run as one batch of B*J rows over the SAME token columns; branch j masks the other images'
placeholder tokens out of attention and shifts position ids past them, which is exactly the prompt
with those placeholders removed, while every row keeps one layout (one KV cache row per branch).

a_ij = softmax_j(q(h_ij) . k(pool_j) / sqrt(d) + b_j): the same text->image attention score as the
cross-attention blocks, with h_ij the LM's final hidden state of token i in branch j (the current text
state, having read image j), pool_j image j's mean connector token and b_j a learned bias per image
index. Token i mixes only the images placed before it (media-position masking); a token with no image
before it takes branch 0, which then equals every other branch. With at most one image per prompt the
model IS prefix fusion (same code path, same logits). With more, the forward returns the mixture's
log-probabilities as its logits, and `MixtureCache` carries the branches' cache and masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .lm_head import head_rows


@dataclass
class MixtureCache:
    lm: Any  # the LM's cache over B*J branch rows (row b*J + j is branch j of prompt b)
    branch_mask: torch.Tensor  # [B*J, T_seen] attention mask of every branch
    removed: torch.Tensor  # [B, J] placeholder tokens each branch left out (its position shift)
    keys: torch.Tensor  # [B, J, d] scoring key of each image, computed once
    image_start: torch.Tensor  # [B, J] first placeholder column of each image (huge when absent)
    real: torch.Tensor  # [B, J] bool: branch j holds a real image of prompt b
    seen: int


class MixtureFusion(nn.Module):
    def __init__(self, dim: int, max_images: int):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.bias = nn.Parameter(torch.zeros(max_images))  # b_j per image index
        nn.init.zeros_(self.to_q.weight)  # start from uniform weights over the visible images

    def run(
        self,
        model,
        input_ids,
        attention_mask,
        image_embeds,
        position_ids,
        cache,
        use_cache,
        logits_to_keep,
        keep: torch.Tensor | None = None,
    ):
        """The mixture forward (see VisionLanguageModel.forward); a batch with at most one image per
        prompt runs as prefix fusion.

        Args:
            input_ids: [B, T]; tokens_per_image placeholders per image.
            image_embeds: [n_images, N, D] from `encode_images`, only with the first forward.
            cache: None, a MixtureCache, or a prefix-fusion cache (<= 1 image per prompt).
            keep: [B, T] bool, the only positions whose mixture is wanted (a training loss's label
                positions; first forward, logits_to_keep 0), or None for every kept position.

        Returns:
            (logits [B, K, V], cache, weights [B, K, J] or None): K = T or logits_to_keep; logits are
            the mixture's log-probabilities with several images, and weights the per-token image
            weights a_ij. With `keep`: logits [n, V] and weights [n, J] at its n positions, row-major.
        """
        if cache is not None and not isinstance(cache, MixtureCache):  # decoding a <= 1-image batch
            return (
                *model._prefix_forward(
                    input_ids, attention_mask, image_embeds, position_ids, cache, use_cache, logits_to_keep
                ),
                None,
            )
        B, T = input_ids.shape
        dev = input_ids.device
        if cache is None:
            N = model.cfg.tokens_per_image
            # the placeholders the images fill; any other placeholder id is text (see image_slots)
            n_image_tokens = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
            is_image = model.image_slots(input_ids, n_image_tokens)  # [B, T]
            n_images = is_image.sum(1) // N  # [B]
            if int(n_images.max()) <= 1:
                return (
                    *model._prefix_forward(
                        input_ids, attention_mask, image_embeds, position_ids, None, use_cache, logits_to_keep, keep
                    ),
                    None,
                )
            embeds = model.embed(input_ids, image_embeds)  # [B, T, D], every image in its slots (checks counts)
            J = int(n_images.max())
            j = torch.arange(J, device=dev)
            rank = torch.where(is_image, (is_image.cumsum(1) - 1) // N, -1)  # [B, T] image index of a placeholder
            removed = is_image[:, None, :] & (rank[:, None, :] != j[None, :, None])  # [B, J, T]
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            branch_mask = (mask[:, None, :] * ~removed).reshape(B * J, T)
            base_pos = position_ids if position_ids is not None else torch.arange(T, device=dev).expand(B, T)
            branch_pos = (base_pos[:, None, :] - removed.cumsum(-1)).clamp(min=0).reshape(B * J, T)
            real = j[None, :] < n_images[:, None]  # [B, J]
            starts = torch.where(
                is_image[:, None, :] & (rank[:, None, :] == j[None, :, None]), torch.arange(T, device=dev), T
            )
            image_start = torch.where(real, starts.min(-1).values, torch.iinfo(torch.long).max)  # [B, J]
            pooled = image_embeds.new_zeros(B, J, image_embeds.shape[-1])
            pooled[real] = image_embeds.mean(1)  # boolean indexing is row-major: prompt order
            keys = self.to_k(pooled)  # [B, J, d]
            removed_total, lm_cache, start = removed.sum(-1), None, 0
        else:
            # a placeholder id in a decode step is a generated token: text, not a new image
            if image_embeds is not None:
                raise ValueError("images can only be given with the first (uncached) forward of a prompt")
            J = cache.real.shape[1]
            new_mask = attention_mask[:, -T:] if attention_mask is not None else torch.ones_like(input_ids)
            branch_mask = torch.cat([cache.branch_mask, new_mask.repeat_interleave(J, 0)], dim=1)
            start = cache.seen
            base_pos = position_ids if position_ids is not None else (start + torch.arange(T, device=dev)).expand(B, T)
            branch_pos = (base_pos.repeat_interleave(J, 0) - cache.removed.reshape(B * J, 1)).clamp(min=0)
            embeds = model.lm.get_input_embeddings()(input_ids)
            keys, image_start, real, removed_total, lm_cache = (
                cache.keys,
                cache.image_start,
                cache.real,
                cache.removed,
                cache.lm,
            )

        # The positions whose mixture is computed, as (prompt, column) pairs: every kept column of
        # every prompt, or the `keep` positions only; the LM head runs at those, in every branch.
        select = None
        if keep is not None:
            pos_b, pos_t = keep.nonzero(as_tuple=True)  # row-major

            def select(h):  # [B*J, T, D] -> [1, n*J, D], row (p, j) = branch j at position p
                return h.reshape(B, J, T, -1)[pos_b, :, pos_t].reshape(1, -1, h.shape[-1])

        with head_rows(model.lm, select) as head:
            out = model.lm(
                inputs_embeds=embeds.repeat_interleave(J, 0),
                attention_mask=branch_mask,
                position_ids=branch_pos,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **{model._cache_arg: lm_cache},
            )
        logits, h = out.logits, head.hidden
        if keep is not None and head.selected:
            logits, h = logits.reshape(-1, J, logits.shape[-1]), h.reshape(-1, J, h.shape[-1])  # [P, J, *]
        else:  # [B*J, K, *] -> [P, J, *]: every kept column, or the `keep` positions among them
            K = logits.shape[1]
            if keep is None:
                pos_b = torch.arange(B, device=dev).repeat_interleave(K)
                pos_t = torch.arange(T - K, T, device=dev).repeat(B)
            k_index = pos_t - (T - K)
            logits = logits.reshape(B, J, K, -1)[pos_b, :, k_index]
            h = h.reshape(B, J, K, -1)[pos_b, :, k_index]
        logp = logits.float().log_softmax(-1)  # [P, J, V]
        q = self.to_q(h.to(self.to_q.weight.dtype))  # [P, J, d]
        bias = self.bias[torch.arange(J, device=dev).clamp(max=self.bias.numel() - 1)]  # [J]
        scores = (q * keys[pos_b].to(q.dtype)).sum(-1).float() / math.sqrt(q.shape[-1]) + bias[None, :]  # [P, J]

        cols = start + pos_t  # [P] each position's column
        visible = image_start[pos_b] <= cols[:, None]  # [P, J]
        valid = branch_mask[:, -T:].reshape(B, J, T)[pos_b, :, pos_t].bool()  # the token exists in branch j
        allowed = visible & valid & real[pos_b]
        first = torch.arange(J, device=dev)[None, :] == 0
        allowed = allowed | (first & ~allowed.any(1, keepdim=True))  # no image yet: branch 0 (all are equal)
        log_a = scores.masked_fill(~allowed, float("-inf")).log_softmax(dim=1)  # [P, J]
        mixed = torch.logsumexp(log_a[..., None] + logp, dim=1)  # [P, V]
        weights = log_a.exp()  # [P, J]
        if keep is None:
            mixed, weights = mixed.reshape(B, K, -1), weights.reshape(B, K, J)
        new_cache = None
        if use_cache:
            new_cache = MixtureCache(
                out.get(model._cache_arg), branch_mask, removed_total, keys, image_start, real, start + T
            )
        return mixed, new_cache, weights
