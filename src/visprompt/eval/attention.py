"""Where the model looked: text -> image attention of each answer token, mapped onto the image grid.

    explanation = explain(backend, "scene.png", "What color is the triangle?")
    explanation.maps[0]        # [H_grid, W_grid] attention mass of the first answer token per cell

The answer is generated greedily through the backend (the same text `ask` gives); then ONE reference
forward over prompt + answer (transformers' eager attention, never the fast decoder) returns every
layer's attention weights. An answer token is explained by the row of the position that predicted it
(the position before it); a prompt word (`token=`) by its own row.

Aggregation: the mean over heads and layers of the attention weights (default), or attention rollout
(Abnar & Zuidema, 2020: per layer the head mean plus the residual, 0.5 A + 0.5 I, rows renormalised,
multiplied through the layers). Prefix fusion (and mixture fusion, which with one image is prefix
fusion) and HF VLMs read image tokens through self-attention; gated cross-attention fusion reads
them in its own blocks, whose weights are used instead (rollout does not apply there).

Idefics3/SmolVLM split an image into rows x cols tiles plus a global image (the whole image at tile
size), each side x side tokens after the pixel shuffle; their map is the full image's
[rows * side, cols * side] grid: each tile's tokens in its block, plus each global token's mass
spread evenly over the rows x cols cells it covers (see `tiles_to_grid`).

Per layer, the modality balance is the share of the explained rows' attention mass on image tokens
(the rest is on text). Under cross-attention fusion image and text never share a softmax; there it is
the share of the gated cross-attention output in the norm of the layer's two attention outputs
(|tanh(g) x_attn| / (|tanh(g) x_attn| + |self_attn|); 0 in layers without a block).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..engine.backend import SamplingParams
from ..errors import VispromptError
from ..images import load_image
from ..models.chat import check_question, user_turn

METHODS = ("mean", "rollout")


@dataclass
class Explanation:
    """What `explain` found.

    Fields:
        image: the image as the model saw it (resized and cropped as its preprocessing does, RGB).
        prompt: the question.
        answer: the greedy answer, as `ask` gives it.
        tokens: the explained tokens' text, in order.
        maps: per explained token, [H_grid, W_grid] float32 attention mass on each image cell (cells
            in the image's rows and columns); under cross-attention fusion each map sums to 1.
        image_mass: per explained token, the share of its attention on image tokens (the map's sum).
        balance: per LM layer, the image share of the explained rows' attention (see the module).
        method: "mean" or "rollout".
        grid: (H_grid, W_grid).
    """

    image: Any
    prompt: str
    answer: str
    tokens: list[str]
    maps: list[np.ndarray]
    image_mass: list[float]
    balance: list[float]
    method: str
    grid: tuple[int, int]


@dataclass
class _Pass:
    """One forward over prompt + answer, reduced to what the maps need.

    self_attn: per layer [heads, T, T] self-attention weights (None under cross-attention fusion).
    cross: per layer [heads, T, N] weights on the image tokens, or None for a layer without a block.
    cross_share: per layer [T] image share of the attention outputs (cross-attention fusion), else None.
    image_pos: [N] positions of the image tokens in the sequence, in grid order (prefix, HF).
    grid: (H_grid, W_grid) with H_grid * W_grid == N, unless to_grid places the tokens.
    ids: the sequence's token ids; prompt_len: how many of them are the prompt.
    first_image: the first position that can read the image (its first token, or its placeholder).
    to_grid: [N] per image token -> [H_grid, W_grid], keeping the total; None: a reshape in order.
    """

    self_attn: list[torch.Tensor] | None
    cross: list[torch.Tensor | None] | None
    cross_share: list[torch.Tensor] | None
    image_pos: torch.Tensor | None
    grid: tuple[int, int]
    ids: list[int]
    prompt_len: int
    first_image: int
    to_grid: Callable[[torch.Tensor], torch.Tensor] | None = None


def explain(
    backend,
    image: Any,
    prompt: str,
    token: str | None = None,
    method: str = "mean",
    max_new_tokens: int = 32,
) -> Explanation:
    """Generate the greedy answer, then map each answer token's attention (or a chosen word's) onto
    the image grid.

    Args:
        backend: an OwnVLMBackend (prefix, cross-attention or one-image mixture fusion) or an
            HFVLMBackend whose image tokens map onto the image (LLaVA, LLaVA-NeXT, Qwen2-VL,
            Idefics3/SmolVLM).
        image: a path, bytes, data: URL or PIL image.
        prompt: the question.
        token: explain only this word: the first answer token that reads as it, else the first
            prompt token (a prompt word must come after the image to see it); None: every answer token.
        method: "mean" (over heads and layers) or "rollout".
        max_new_tokens: the answer's limit.

    Returns:
        An Explanation (maps [H_grid, W_grid] per explained token, the per-layer balance).
    """
    if method not in METHODS:
        raise VispromptError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    check_question(prompt)
    collect = _collector(backend)
    picture = load_image(image)
    conv = [user_turn([picture], prompt, bool(getattr(backend, "image_after_text", False)))]
    result = backend.generate([conv], SamplingParams(max_new_tokens=max_new_tokens))[0]
    if not result.token_ids:
        raise VispromptError("the model gave an empty answer: there is no answer token to explain")
    run = collect(backend, conv, list(result.token_ids))
    if method == "rollout" and run.self_attn is None:
        raise VispromptError(
            "rollout needs image tokens inside the sequence (prefix fusion, HF VLMs); "
            "cross-attention fusion reads them in separate blocks: use the mean"
        )
    tok = _tokenizer(backend)
    queries, names = _queries(run, tok, token)
    maps, masses = [], []
    for q in queries:
        vec = _rollout_row(run, q) if method == "rollout" else _mean_row(run, q)
        grid_map = run.to_grid(vec) if run.to_grid is not None else vec.reshape(run.grid)
        maps.append(grid_map.cpu().numpy().astype(np.float32))
        masses.append(float(vec.sum()))
    return Explanation(
        image=_seen_image(backend, picture),
        prompt=prompt,
        answer=result.text,
        tokens=names,
        maps=maps,
        image_mass=masses,
        balance=_balance(run, queries),
        method=method,
        grid=run.grid,
    )


# -- aggregation -------------------------------------------------------------------------------------


def _mean_row(run: _Pass, q: int) -> torch.Tensor:
    """[N] attention of query row q on the image tokens, mean over heads and layers."""
    if run.self_attn is not None:
        rows = torch.stack([a[:, q, run.image_pos] for a in run.self_attn])  # [layers, heads, N]
        return rows.mean(dim=(0, 1))
    rows = torch.stack([c[:, q] for c in run.cross if c is not None])  # [blocks, heads, N]
    return rows.mean(dim=(0, 1))


def _rollout_row(run: _Pass, q: int) -> torch.Tensor:
    """[N] attention rollout (Abnar & Zuidema): row q of prod_l (0.5 mean_h A_l + 0.5 I), renormalised
    per layer, on the image tokens."""
    T = run.self_attn[0].shape[-1]
    eye = torch.eye(T)
    joint = eye
    for a in run.self_attn:
        layer = 0.5 * a.mean(0) + 0.5 * eye  # [T, T]
        layer = layer / layer.sum(-1, keepdim=True)
        joint = layer @ joint
    return joint[q, run.image_pos]


def _balance(run: _Pass, queries: list[int]) -> list[float]:
    """Per layer, the image share of the explained rows' attention (see the module docstring)."""
    if run.self_attn is not None:
        return [float(a[:, queries][..., run.image_pos].sum(-1).mean()) for a in run.self_attn]
    return [float(s[queries].mean()) for s in run.cross_share]


# -- which rows ---------------------------------------------------------------------------------------


def _tokenizer(backend):
    model = getattr(backend, "model", None)
    return getattr(model, "tokenizer", None) or backend.tokenizer


def _piece(tok, token_id: int) -> str:
    return tok.decode([token_id]).strip()


def _queries(run: _Pass, tok, word: str | None) -> tuple[list[int], list[str]]:
    """Rows to explain and their tokens' text: each answer token's predicting row, or the chosen word's."""
    P, ids = run.prompt_len, run.ids
    answer = [(P - 1 + k, _piece(tok, t)) for k, t in enumerate(ids[P:])]
    if word is None:
        return [q for q, _ in answer], [name for _, name in answer]
    want = word.strip().lower()
    for q, name in answer:
        if name.lower() == want:
            return [q], [name]
    for pos in range(P):
        name = _piece(tok, ids[pos])
        if name.lower() == want:
            if pos < run.first_image:
                raise VispromptError(
                    f"{word!r} comes before the image in the prompt, so it cannot attend to it: "
                    "choose an answer word or one after the image"
                )
            return [pos], [name]
    shown = " ".join(name for _, name in answer)
    raise VispromptError(f"{word!r} is not a token of the answer ({shown!r}) or of the prompt")


# -- collectors ---------------------------------------------------------------------------------------


def _collector(backend):
    from ..engine.backends.hf_vlm import HFVLMBackend
    from ..engine.backends.own import OwnVLMBackend

    if isinstance(backend, OwnVLMBackend):
        return _own_pass
    if isinstance(backend, HFVLMBackend):
        return _hf_pass
    raise VispromptError(
        f"cannot explain '{getattr(backend, 'name', type(backend).__name__)}': it has no attention over "
        "image tokens (explain runs visprompt models and transformers VLMs, not the starter)"
    )


@contextlib.contextmanager
def eager_attention(model):
    """Run `model` with transformers' eager attention (the one that returns its weights), then restore."""
    before = getattr(model.config, "_attn_implementation", None)
    if before == "eager" or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before or "sdpa")


def _square_grid(n: int, what: str) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise VispromptError(f"cannot map {n} image tokens onto a grid: {what}")
    return side, side


def _own_pass(backend, conv, answer_ids: list[int]) -> _Pass:
    from ..models.cross_attention import CrossAttentionFusion

    model = backend.model
    prompt = backend.prompts([conv])[0]
    ids = prompt.ids + answer_ids
    x = torch.tensor([ids], device=model.device)
    if isinstance(model.fusion, CrossAttentionFusion):
        if model.fusion.resampler is not None:
            raise VispromptError(
                "cannot map attention onto the image: this model's cross-attention reads a perceiver "
                "resampler's latents, which have no place in the image"
            )
        grid = _square_grid(model.cfg.image_feature_tokens, "the model's image tokens are not a square grid")
        cross, share = _cross_attention_pass(model, x, prompt.image_embeds)
        first = ids.index(model.cfg.image_token_id)  # the placeholder: the image is read from there on
        return _Pass(None, cross, share, None, grid, ids, len(prompt.ids), first)
    # prefix fusion; mixture fusion with one image is prefix fusion (the same code path)
    grid = _square_grid(model.cfg.tokens_per_image, "the model's image tokens are not a square grid")
    with torch.no_grad(), eager_attention(model.lm):
        embeds = model.embed(x, prompt.image_embeds, strict=True)
        out = model.lm(inputs_embeds=embeds, output_attentions=True, use_cache=False)
    image_pos = (x[0] == model.cfg.image_token_id).nonzero()[:, 0][: grid[0] * grid[1]]
    attentions = [a[0].float() for a in out.attentions]
    return _Pass(attentions, None, None, image_pos, grid, ids, len(prompt.ids), int(image_pos[0]))


def _cross_attention_pass(model, x: torch.Tensor, image_embeds: torch.Tensor):
    """Each block's weights on the image tokens and, per layer, the image share of the attention outputs."""
    from ..models.cross_attention import find_decoder_layers

    fusion = model.fusion
    layers = find_decoder_layers(model.lm)
    weights: dict[int, torch.Tensor] = {}
    gated: dict[int, torch.Tensor] = {}
    own: dict[int, torch.Tensor] = {}

    def block_hook(layer_idx):
        def hook(block, args, output):
            hidden, kv, visible = args
            if kv is not None and visible is not None and visible.shape[-1] > 0:
                w, out = block.cross_attend(hidden, kv, visible)
                weights[layer_idx] = w[0].float()  # [heads, T, N]
                gated[layer_idx] = (torch.tanh(block.attn_gate) * out)[0].norm(dim=-1).float()  # [T]

        return hook

    def self_hook(layer_idx):
        def hook(module, args, output):
            own[layer_idx] = (output[0] if isinstance(output, tuple) else output)[0].norm(dim=-1).float()

        return hook

    handles = [b.register_forward_hook(block_hook(i)) for b, i in zip(fusion.blocks, fusion.layer_ids)]
    handles += [layer.self_attn.register_forward_hook(self_hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(input_ids=x, image_embeds=image_embeds)
    finally:
        for h in handles:
            h.remove()
    cross = [weights.get(i) for i in range(len(layers))]
    share = []
    for i in range(len(layers)):
        g = gated.get(i, torch.zeros_like(own[i]))
        share.append(g / (g + own[i]).clamp(min=1e-12))
    return cross, share


def _hf_pass(backend, conv, answer_ids: list[int]) -> _Pass:
    model = backend.model
    prompt = backend.prompts([conv])[0]
    inputs = dict(prompt.inputs)
    P = inputs["input_ids"].shape[1]
    extra = torch.tensor([answer_ids], device=inputs["input_ids"].device, dtype=inputs["input_ids"].dtype)
    for key, value in list(inputs.items()):
        # per-token inputs grow with the answer: its ids, a 1 in the mask, 0 (text) in type ids
        if isinstance(value, torch.Tensor) and value.shape[:2] == (1, P) and not value.is_floating_point():
            fill = extra if key == "input_ids" else torch.full_like(extra, int(key == "attention_mask"))
            inputs[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
    image_pos = (inputs["input_ids"][0] == backend.image_token_id).nonzero()[:, 0]
    to_grid = None
    if getattr(model.config, "model_type", "") in _SPLIT_IMAGE_TYPES:
        grid, keep, to_grid = _split_image_grid(backend, conv, len(image_pos))
    else:
        grid, keep = _hf_grid(model, inputs, len(image_pos))
    with torch.no_grad(), eager_attention(model):
        out = model(**inputs, output_attentions=True, use_cache=False)
    attentions = getattr(out, "attentions", None)
    if not attentions:
        raise VispromptError(f"'{backend.name}' returned no attention weights (output_attentions=True)")
    ids = inputs["input_ids"][0].tolist()
    attentions = [a[0].float() for a in attentions]
    first = int(image_pos[0])
    return _Pass(attentions, None, None, image_pos[keep], grid, ids, len(prompt.ids), first, to_grid)


def _hf_grid(model, inputs: dict, n: int) -> tuple[tuple[int, int], torch.Tensor]:
    """(H_grid, W_grid) of an HF VLM's image tokens and which of the N tokens form it, in grid order."""
    model_type = getattr(model.config, "model_type", "")
    if getattr(model.config, "perceiver_config", None) is not None:  # Idefics2: a resampler's latents
        raise VispromptError(
            f"cannot map attention of this {model_type or 'model'} onto the image: its {n} image tokens are a "
            "perceiver resampler's latents, which have no place in the image"
        )
    if "image_grid_thw" in inputs:  # Qwen2-VL: patches merged merge x merge per token
        t, h, w = (int(v) for v in inputs["image_grid_thw"][0])
        merge = int(getattr(model.config.vision_config, "spatial_merge_size", 1))
        grid = (h // merge, w // merge)
        if t != 1 or grid[0] * grid[1] != n:
            raise VispromptError(f"cannot map {n} image tokens onto the {grid[0]}x{grid[1]} grid Qwen2-VL reports")
        return grid, torch.arange(n)
    if "image_sizes" in inputs and getattr(model.config, "image_grid_pinpoints", None):
        return _anyres_grid(model, inputs, n)
    side = math.isqrt(n)
    if side * side == n:
        return (side, side), torch.arange(n)
    if side * side == n - 1:  # a CLS token kept in front ("full" feature strategy)
        return (side, side), torch.arange(1, n)
    raise VispromptError(
        f"cannot map attention of this {model_type or 'model'} onto the image: its {n} image tokens are not "
        "one square grid (explain maps LLaVA, LLaVA-NeXT, Qwen2-VL and Idefics3/SmolVLM image tokens)"
    )


def _anyres_grid(model, inputs: dict, n: int) -> tuple[tuple[int, int], torch.Tensor]:
    """LLaVA-NeXT: an overview image (s x s tokens) first, then the tiles' tokens, unpadded to the
    image's aspect ratio, as R rows of C tokens each followed by a newline token. The map is the
    tiles' R x C grid, which covers the whole image; the overview and newline tokens are left out."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    rest = n - side * side
    h, w = (int(v) for v in inputs["image_sizes"][0])
    shapes = [(r, rest // r - 1) for r in range(1, rest + 1) if rest % r == 0 and rest // r > 1]
    if rest <= 0 or not shapes:
        raise VispromptError(f"cannot map {n} LLaVA-NeXT image tokens onto tiles of {side}x{side}")
    rows, cols = min(shapes, key=lambda rc: abs(math.log(rc[1] / rc[0]) - math.log(w / h)))
    keep = torch.tensor([side * side + r * (cols + 1) + c for r in range(rows) for c in range(cols)])
    return (rows, cols), keep


# Idefics3 and SmolVLM (SmolVLM2): image splitting into tiles + a global image
_SPLIT_IMAGE_TYPES = ("idefics3", "smolvlm")


def tiles_to_grid(vec: torch.Tensor, rows: int, cols: int, side: int) -> torch.Tensor:
    """Idefics3/SmolVLM image tokens -> the full image's [rows * side, cols * side] grid.

    The processor's layout (`<row_r_col_c>` before each tile, `<global-img>` before the global
    image): rows x cols tiles in row-major order, each side x side tokens (the pixel shuffle keeps the
    patch grid's row-major order, side = tile / patch / scale_factor), then the global image's
    side x side tokens. Each tile's tokens fill its block of the grid; each global token covers
    rows x cols cells of it, and its mass is spread evenly over them. The map is the sum of the two,
    so it keeps the tokens' total mass. rows = cols = 0 (no split: the global image only): the
    global image's own side x side grid.

    Args:
        vec: [N] one value per image token, in the sequence's order.
        rows, cols: the processor's split (0, 0 when the image is not split).
        side: tokens per tile side.

    Returns:
        [H_grid, W_grid] float tensor.
    """
    per = side * side
    tiles = rows * cols
    if vec.numel() != (tiles + 1) * per:
        raise VispromptError(
            f"cannot map {vec.numel()} image tokens onto {rows} x {cols} tiles and a global image "
            f"of {side} x {side} tokens each"
        )
    overview = vec[tiles * per :].reshape(side, side)
    if tiles == 0:
        return overview
    mosaic = vec[: tiles * per].reshape(rows, cols, side, side).permute(0, 2, 1, 3).reshape(rows * side, cols * side)
    return mosaic + overview.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1) / tiles


def _split_image_grid(backend, conv, n: int):
    """Idefics3/SmolVLM: the grid, the kept tokens (all) and their placement, from the image
    processor's split of the conversation's image (rows x cols tiles, or none)."""
    from ..engine.backends.hf_vlm import to_hf_messages

    sources = to_hf_messages(conv)[1]
    image_processor = getattr(backend.processor, "image_processor", None)
    if len(sources) != 1 or image_processor is None:
        raise VispromptError("cannot map attention onto the image: explain needs one image and its image processor")
    info = image_processor(images=[[load_image(sources[0])]], return_row_col_info=True)
    rows, cols = int(info["rows"][0][0]), int(info["cols"][0][0])
    frames = rows * cols + 1
    side = math.isqrt(n // frames)
    if side * side * frames != n:
        raise VispromptError(
            f"cannot map {n} image tokens onto {rows} x {cols} tiles and a global image of equal square token grids"
        )
    grid = (rows * side, cols * side) if frames > 1 else (side, side)
    return grid, torch.arange(n), functools.partial(tiles_to_grid, rows=rows, cols=cols, side=side)


def _seen_image(backend, picture):
    """The part of the image the map covers: a visprompt model's own resize; for an HF VLM the centre
    square when its processor crops one (LLaVA), else the whole image (LLaVA-NeXT's and Idefics3's
    tiles, Qwen2-VL)."""
    pre = getattr(backend, "preprocess", None)
    if pre is not None and hasattr(pre, "resize"):
        return pre.resize(picture)
    processor = getattr(getattr(backend, "processor", None), "image_processor", None)
    anyres = getattr(getattr(backend.model, "config", None), "image_grid_pinpoints", None)
    if getattr(processor, "do_center_crop", False) and not anyres:
        w, h = picture.size
        side = min(w, h)
        return picture.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    return picture
