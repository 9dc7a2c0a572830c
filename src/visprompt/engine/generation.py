"""Batched, KV-cached decoding for visprompt's own models.

Prompts of different lengths are left-padded so every row's next token sits in the last column;
position ids count only real tokens, so a padded row sees the same positions as it would alone.
"""

from __future__ import annotations

import torch

from ..runtime.sampling import choose_next_tokens, make_generator
from ..runtime.sequence import find_stop
from .backend import GenerationResult, SamplingParams


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] input ids and attention mask, left padded."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    # mask: [B, T] -> position ids [B, T]; pads get 0 (they are masked out anyway)
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def generate_ids(
    model,
    prompts: list[list[int]],
    image_embeds: torch.Tensor | None,
    params: SamplingParams,
    stop_ids: list[int],
    tokenizer,
    use_cache: bool = True,
) -> list[GenerationResult]:
    """Decode every prompt in one batch.

    model: a VisionLanguageModel (its forward takes input_ids + image_embeds).
    image_embeds: [n_images, N, D] for all images of all prompts, in row-major prompt order.

    The same loop serves every fusion: the model's forward returns next-token scores (logits, or
    log-probabilities for a multi-image mixture) and an opaque cache it reads back (the LM's KV cache
    for prefix fusion; CrossAttentionCache / MixtureCache, which also hold image keys and branch
    masks, for the others).
    """
    device = model.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    ids, mask = left_pad(prompts, pad_id, device)  # [B, T]
    batch = ids.shape[0]
    generator = make_generator(params, device)
    out_tokens: list[list[int]] = [[] for _ in range(batch)]
    finish = [""] * batch
    hit_eos = [False] * batch
    texts = [""] * batch
    done = torch.zeros(batch, dtype=torch.bool, device=device)

    out = model(
        ids,
        attention_mask=mask,
        image_embeds=image_embeds,
        position_ids=positions(mask),
        use_cache=use_cache,
        logits_to_keep=1,
    )
    cache = out.past_key_values
    all_ids = ids
    for step in range(params.max_new_tokens):
        next_tok = choose_next_tokens(out.logits[:, -1], params, generator)  # [B]
        next_tok = torch.where(done, torch.full_like(next_tok, pad_id), next_tok)
        for i in range(batch):
            if done[i]:
                continue
            tok = int(next_tok[i])
            if tok in stop_ids:
                finish[i], done[i], hit_eos[i] = "stop", True, True
                continue
            out_tokens[i].append(tok)
            if params.stop:
                texts[i] = tokenizer.decode(out_tokens[i], skip_special_tokens=True)
                if find_stop(texts[i], params.stop) >= 0:
                    finish[i], done[i] = "stop", True
        if bool(done.all()) or step == params.max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # finished rows' columns are never read
        if use_cache:
            pos = positions(mask)[:, -1:]
            out = model(
                next_tok.unsqueeze(1), attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
            )
            cache = out.past_key_values
        else:
            all_ids = torch.cat([all_ids, next_tok.unsqueeze(1)], dim=1)
            out = model(
                all_ids, attention_mask=mask, image_embeds=image_embeds, position_ids=positions(mask), logits_to_keep=1
            )

    results = []
    for i in range(batch):
        text = tokenizer.decode(out_tokens[i], skip_special_tokens=True)
        cut = find_stop(text, params.stop) if params.stop else -1
        if cut >= 0:
            text = text[:cut]
        results.append(
            GenerationResult(
                text=text.strip(),
                finish_reason=finish[i] or "length",
                prompt_tokens=len(prompts[i]),
                completion_tokens=len(out_tokens[i]) + int(hit_eos[i]),  # the end token counts, as in vLLM
                token_ids=out_tokens[i],
            )
        )
    return results
