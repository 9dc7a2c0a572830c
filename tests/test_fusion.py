"""Fusion strategies: prefix, gated cross-attention (Flamingo) and a per-image mixture of prefix branches.

Exactness where the design promises it (zero gates = the plain LM, one-image mixture = prefix, a saved
model reloads bit for bit, a token never sees a later image), cached = uncached decoding, and every
strategy trains through the same Trainer.
"""

import json

import pytest
import torch
import yaml
from conftest import TEXTS, left_pad, positions, spread_weights, tiny_config
from PIL import Image

from visprompt.engine.backend import SamplingParams
from visprompt.engine.backends.own import OwnVLMBackend
from visprompt.models.cross_attention import (
    GatedCrossAttentionBlock,
    find_decoder_layers,
)
from visprompt.models.language_model import language_model_from_config
from visprompt.models.tokenizer import train_tokenizer
from visprompt.models.vision_language_model import VisionLanguageModel
from visprompt.train.config import load_recipe
from visprompt.train.trainer import Trainer, freeze_parts

# (fusion, extra config): every strategy, cross-attention with and without the resampler.
STRATEGIES = {
    "prefix": ("prefix", {}),
    "xattn": ("cross_attention", {}),
    "xattn-resampler": ("cross_attention", {"resampler_latents": 4, "resampler_depth": 1}),
    "xattn-every2": ("cross_attention", {"xattn_every": 2, "xattn_heads": 4}),
    "mixture": ("mixture", {}),
}


def open_gates(model, value=1.0):
    """Set every tanh gate (they start at 0: the plain LM) so the images really take part."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                p.fill_(value)
    return model


def make_model(key, seed=0, gates=1.0, **overrides):
    fusion, extra = STRATEGIES[key]
    torch.manual_seed(seed)
    model = VisionLanguageModel.build(tiny_config(fusion=fusion, **extra, **overrides), TEXTS)
    return open_gates(spread_weights(model, seed=seed), gates).eval()


def image(color, w=40, h=30):
    return {"type": "image", "image": Image.new("RGB", (w, h), color)}


def conv(images, question, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": [*images, {"type": "text", "text": question}]}]


CONVS = [
    conv([image("red")], "What color is the circle?"),
    conv([image("blue"), image("green", 50)], "How many shapes are there? Describe the image please."),
    conv([], "Describe the image."),  # text only
    conv([image("yellow"), image("purple"), image("orange", 35, 35)], "Where is the square?", system="Be brief."),
]


def prompt_ids(model, pieces):
    """Token ids from pieces: ints are token ids, "IMG" is one image's placeholders."""
    ids = []
    for p in pieces:
        ids.extend([model.cfg.image_token_id] * model.cfg.tokens_per_image if p == "IMG" else [p])
    return torch.tensor([ids])


def plain_lm(model):
    """A fresh copy of the model's LM (no fusion hooks) with the same weights."""
    lm = language_model_from_config(model.cfg.lm_config)
    lm.load_state_dict(model.lm.state_dict())
    return lm.eval()


# --- finding the decoder layers of any causal LM -------------------------------------------------


def _lm_folder(tmp_path, family):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    tok = train_tokenizer(TEXTS, vocab_size=300)
    folder = tmp_path / family
    tok.save_pretrained(folder)
    if family == "gpt2":
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=2, n_positions=256))
    else:
        lm = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=len(tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=2,
                num_key_value_heads=1,
            )
        )
    lm.save_pretrained(folder)
    return folder


def _family_model(tmp_path, family, **extra):
    if family == "llama":
        return VisionLanguageModel.build(tiny_config(fusion="cross_attention", lm_layers=3, **extra), TEXTS)
    cfg = tiny_config(fusion="cross_attention", lm_source=str(_lm_folder(tmp_path, family)), **extra)
    return VisionLanguageModel.build(cfg)


def test_decoder_layers_are_found_in_any_family(tmp_path):
    for family, path in (("llama", "model.layers"), ("gpt2", "transformer.h"), ("qwen2", "model.layers")):
        model = _family_model(tmp_path, family)
        assert find_decoder_layers(model.lm) is model.lm.get_submodule(path), family
        assert len(model.fusion.blocks) == 3


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("resampler", [0, 3])
def test_zero_gates_give_exactly_the_plain_lm(tmp_path, family, resampler):
    torch.manual_seed(0)
    model = spread_weights(_family_model(tmp_path, family, resampler_latents=resampler)).eval()
    assert model.cfg.tokens_per_image == 1 and model.cfg.image_feature_tokens == (resampler or 16)
    ids, mask = left_pad(
        [[5, 6, model.cfg.image_token_id, 7, 8, 9], [model.cfg.image_token_id, 10, model.cfg.image_token_id, 11]],
        0,
        "cpu",
    )
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=positions(mask), pixel_values=torch.randn(3, 3, 32, 32))
        ref = plain_lm(model)(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    assert torch.equal(out.logits, ref)
    # Opening the gates makes the images count (so the equality above was not vacuous).
    with torch.no_grad():
        opened = open_gates(model)(
            ids, attention_mask=mask, position_ids=positions(mask), pixel_values=torch.randn(3, 3, 32, 32)
        )
    assert not torch.allclose(opened.logits, ref, atol=1e-3)


def test_gated_block_is_the_identity_at_zero_gates():
    block = GatedCrossAttentionBlock(16, 2, 5)
    x = torch.randn(2, 7, 16)
    kv = block.media_kv(torch.randn(2, 3, 5, 16))
    visible = torch.rand(2, 7, 3) > 0.5
    assert torch.equal(block(x, kv, visible), x)


def test_blocks_hook_layers_called_with_keyword_hidden_states():
    """Some families call their layers as layer(hidden_states=...): the hook handles both forms."""
    from visprompt.models.cross_attention import CrossAttentionFusion

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, hidden_states):
            return self.lin(hidden_states)

    class ToyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2})()
            self.blocks = torch.nn.ModuleList([Layer(), Layer()])
            self.head = torch.nn.ModuleList([torch.nn.Linear(16, 16)])  # a smaller list to ignore

        def forward(self, x):
            for layer in self.blocks:
                x = layer(hidden_states=x)
            return x

    lm = ToyLM()
    fusion = CrossAttentionFusion(lm, 16, 3, every=1, heads=2, ff_mult=2, resampler_latents=0, resampler_depth=1)
    assert find_decoder_layers(lm) is lm.blocks and len(fusion.blocks) == 2
    open_gates(fusion)
    x = torch.randn(1, 4, 16)
    kv = [b.media_kv(torch.randn(1, 1, 3, 16)) for b in fusion.blocks]
    with torch.no_grad():
        plain = lm(x)
        with fusion.conditioned(kv, torch.ones(1, 4, 1, dtype=torch.bool)):
            fused = lm(x)
        assert torch.equal(lm(x), plain)  # outside the context the hooks do nothing
    assert not torch.allclose(fused, plain)


# --- mixture -------------------------------------------------------------------------------------


def test_mixture_with_one_image_is_prefix_fusion():
    prefix, mixture = make_model("prefix"), make_model("mixture")
    missing, unexpected = mixture.load_state_dict(prefix.state_dict(), strict=False)
    assert not unexpected and all(n.startswith("fusion.") for n in missing)
    ids = prompt_ids(prefix, [5, 6, "IMG", 7, 8, 9])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(mixture(ids, pixel_values=pixels).logits, prefix(ids, pixel_values=pixels).logits)
    params = SamplingParams(max_new_tokens=8)
    convs = [CONVS[0], CONVS[2], conv([image("teal")], "yes or no?", system="Be brief.")]  # at most one image each
    a, b = OwnVLMBackend(prefix).generate(convs, params), OwnVLMBackend(mixture).generate(convs, params)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_mixture_branch_is_the_prompt_with_only_that_image():
    """Force a_i = one-hot on image 1: the last token's distribution is prefix fusion on the prompt
    without image 2 (masking plus shifted positions = removing the placeholders)."""
    mixture = make_model("mixture")
    with torch.no_grad():
        mixture.fusion.to_q.weight.zero_()
        mixture.fusion.bias.copy_(torch.tensor([0.0, -1e4] + [0.0] * 6))
        pixels = torch.randn(2, 3, 32, 32)
        out = mixture(prompt_ids(mixture, [5, "IMG", 6, "IMG", 7, 8]), pixel_values=pixels)
        alone = mixture(prompt_ids(mixture, [5, "IMG", 6, 7, 8]), pixel_values=pixels[:1])  # one image: prefix path
    torch.testing.assert_close(out.logits[0, -1], alone.logits[0, -1].log_softmax(-1), rtol=1e-4, atol=1e-4)
    assert out.mixture_weights[0, -1].tolist() == pytest.approx([1.0, 0.0])


def test_mixture_weights_are_a_distribution_over_earlier_images():
    mixture = make_model("mixture")
    ids = prompt_ids(mixture, [5, "IMG", 6, "IMG", 7, 8])
    N = mixture.cfg.tokens_per_image
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = mixture(ids, pixel_values=pixels)
        w = out.mixture_weights[0]  # [T, J]
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[0]))
        assert w[0].tolist() == [1.0, 0.0] and w[1 + N].tolist() == [1.0, 0.0]  # before image 2: only image 1
        assert w[-1, 1] > 0  # after both: image 2 takes part
        torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(1, ids.shape[1]))  # log-probabilities
        # Zero query weights (the initial state): a uniform mix of the two branches' distributions.
        mixture.fusion.to_q.weight.zero_()
        out = mixture(ids, pixel_values=pixels)
        branches = [
            mixture(prompt_ids(mixture, [5, "IMG", 6, 7, 8]), pixel_values=pixels[:1]),
            mixture(prompt_ids(mixture, [5, 6, "IMG", 7, 8]), pixel_values=pixels[1:]),
        ]
    assert out.mixture_weights[0, -1].tolist() == [0.5, 0.5]
    expected = (0.5 * branches[0].logits[0, -1].softmax(-1) + 0.5 * branches[1].logits[0, -1].softmax(-1)).log()
    torch.testing.assert_close(out.logits[0, -1], expected, rtol=1e-4, atol=1e-4)


# --- properties every strategy shares --------------------------------------------------------------


@pytest.mark.parametrize("key", list(STRATEGIES))
def test_a_token_never_sees_a_later_image(key):
    model = make_model(key)
    ids = prompt_ids(model, [5, 6, "IMG", 7, 8, "IMG", 9, 10])
    second = int((ids[0] == model.cfg.image_token_id).nonzero()[-1]) - model.cfg.tokens_per_image + 1
    pixels = torch.randn(2, 3, 32, 32)
    changed = pixels.clone()
    changed[1] = torch.randn(3, 32, 32)
    with torch.no_grad():
        a, b = model(ids, pixel_values=pixels).logits, model(ids, pixel_values=changed).logits
    assert torch.equal(a[:, :second], b[:, :second])
    assert not torch.allclose(a[:, -1], b[:, -1], atol=1e-4)  # the later image does matter after it


@pytest.mark.parametrize("key", list(STRATEGIES))
def test_cached_decoding_equals_uncached_and_batched_equals_single(key):
    backend = OwnVLMBackend(make_model(key))
    params = SamplingParams(max_new_tokens=10)
    cached = backend.generate(CONVS, params, use_cache=True)
    uncached = backend.generate(CONVS, params, use_cache=False)
    single = [backend.generate([c], params)[0] for c in CONVS]
    assert [r.token_ids for r in cached] == [r.token_ids for r in uncached] == [r.token_ids for r in single]
    assert (
        all(r.token_ids for r in cached) and len({t for r in cached for t in r.token_ids}) > 4
    )  # not a constant stream
    # The images are read: other images give other replies.
    recolored = [conv([image("black")] * (len(c[-1]["content"]) - 1), c[-1]["content"][-1]["text"]) for c in CONVS]
    assert [r.token_ids for r in backend.generate(recolored, params)] != [r.token_ids for r in cached]


@pytest.mark.parametrize("key", list(STRATEGIES))
def test_saved_model_reloads_with_identical_logits(key, tmp_path):
    model = make_model(key)
    ids = prompt_ids(model, [7, "IMG", 8, "IMG", 9, 10])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(ids, pixel_values=pixels).logits
    model.save_pretrained(tmp_path)
    loaded = VisionLanguageModel.from_pretrained(tmp_path)
    with torch.no_grad():
        after = loaded(ids, pixel_values=pixels).logits
    assert torch.equal(before, after)
    assert json.loads(json.dumps(loaded.cfg.to_dict())) == json.loads(json.dumps(model.cfg.to_dict()))


def test_image_keys_and_values_are_computed_once_per_prompt(monkeypatch):
    model = make_model("xattn-resampler")
    calls = []
    for block in model.fusion.blocks:
        original = block.media_kv
        monkeypatch.setattr(block, "media_kv", lambda media, f=original: calls.append(1) or f(media))
    backend = OwnVLMBackend(model)
    params = SamplingParams(max_new_tokens=6)
    res = backend.generate(CONVS[:2], params)
    # once per prompt and block, at its prefill; never again in its decode steps
    assert sum(len(r.token_ids) for r in res) > 4 and len(calls) == len(model.fusion.blocks) * len(res)
    calls.clear()
    backend.generate(CONVS[:1], params, use_cache=False)
    assert len(calls) > len(model.fusion.blocks)  # recomputed every step without the cache


def test_fusion_weights_belong_to_the_connector_part():
    model = make_model("xattn-resampler")
    fusion_params = sum(p.numel() for p in model.fusion.parameters())
    counts = freeze_parts(model, {"vision": 1e-3, "connector": 0.0, "lm": 1e-3})
    assert counts["connector"] == 0 and not any(p.requires_grad for p in model.fusion.parameters())
    counts = freeze_parts(model, {"vision": 0.0, "connector": 1e-3, "lm": 0.0})
    assert counts["connector"] == fusion_params + sum(p.numel() for p in model.connector.parameters())
    assert counts["lm"] == 0 and all(p.requires_grad for p in model.fusion.parameters())


def test_ask_and_describe_work_on_a_saved_cross_attention_model(tmp_path):
    from visprompt.tasks.assistant import Assistant

    make_model("xattn").save_pretrained(tmp_path / "m")
    assistant = Assistant.load(str(tmp_path / "m"), max_new_tokens=5)
    im = Image.new("RGB", (30, 30), "red")
    assert isinstance(assistant.ask(im, "What color is the circle?"), str)
    assert len(assistant.describe([im, im])) == 2
    two = assistant.generate(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": im},
                    {"type": "image", "image": im},
                    {"type": "text", "text": "Which?"},
                ],
            }
        ]
    )
    assert isinstance(two, str)


# --- the training loss at label positions only -------------------------------------------------------


def labelled_batch(model):
    """Two right-padded prompts (one image; two images) with labels on a few tokens: some after every
    image, one before the second image (mixture: only branch 0 there), none on images or padding."""
    rows = [prompt_ids(model, [5, 6, "IMG", 7, 8, 9, 10, 11])[0], prompt_ids(model, [5, "IMG", 6, "IMG", 7, 8, 9])[0]]
    width = max(len(r) for r in rows)
    ids = torch.full((2, width), model.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    labels = torch.full((2, width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
        labels[i, len(r) - 3 : len(r)] = r[len(r) - 3 :]
    second = int((rows[1] == model.cfg.image_token_id).nonzero()[-1]) - model.cfg.tokens_per_image + 1
    labels[1, second - 1] = rows[1][second - 1]  # the text token before the second image
    return ids, mask, torch.randn(3, 3, 32, 32), labels


def loss_and_grads(model, batch, **kw):
    ids, mask, pixels, labels = batch
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, pixel_values=pixels, labels=labels, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("key", list(STRATEGIES))
def test_loss_at_label_positions_equals_the_full_logits_loss_and_gradients(key):
    """The LM head and the cross-entropy run only where a label is; loss, gradients and those logits
    equal the full [B, T, V] path's (fp32, within 1e-5), for every fusion (mixture: two images, so its
    per-image branches are mixed at each label position)."""
    model = make_model(key, gates=0.5)
    batch = labelled_batch(model)
    labels = batch[3]
    fast, fast_grads = loss_and_grads(model, batch)
    full, full_grads = loss_and_grads(model, batch, full_logits=True)
    keep = labels[:, 1:] != -100
    assert fast.logits.shape == (int(keep.sum()), full.logits.shape[-1])
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.logits, full.logits[:, :-1][keep], rtol=1e-5, atol=1e-5)
    assert fast_grads.keys() == full_grads.keys() and len(fast_grads) == len(list(model.parameters()))
    for name, grad in full_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    if key == "mixture":  # the per-token image weights at the same positions
        torch.testing.assert_close(fast.mixture_weights, full.mixture_weights[:, :-1][keep])


def test_loss_at_label_positions_in_other_lm_families(tmp_path):
    """GPT-2 (tied head, its own module names) through the same hook: the same loss and gradients."""
    torch.manual_seed(0)
    model = open_gates(_family_model(tmp_path, "gpt2"), 0.5).eval()
    batch = labelled_batch(model)
    fast, fast_grads = loss_and_grads(model, batch)
    full, full_grads = loss_and_grads(model, batch, full_logits=True)
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-5, atol=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


# --- training --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs_json(shapes_dir, tmp_path_factory):
    """Two-image records from the shapes data: how many shapes in both images?"""
    records = json.loads((shapes_dir / "train.json").read_text())
    out = []
    for i in range(24):
        a, b = records[i], records[(i + 7) % len(records)]
        n = len(a["scene"]["objects"]) + len(b["scene"]["objects"])
        out.append(
            {
                "id": f"pair-{i}",
                "image": [str(shapes_dir / a["image"]), str(shapes_dir / b["image"])],
                "conversations": [
                    {"from": "human", "value": "<image>\n<image>\nHow many shapes are there in both images?"},
                    {"from": "gpt", "value": str(n)},
                ],
            }
        )
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps(out))
    return path


@pytest.mark.parametrize("key", ["prefix", "xattn", "xattn-resampler", "mixture"])
def test_each_strategy_trains_through_the_trainer(key, pairs_json, tmp_path):
    fusion, extra = STRATEGIES[key]
    model_cfg = dict(
        vision_type="resnet",
        vision_hidden_size=32,
        vision_layers=2,
        image_size=32,
        lm_hidden_size=48,
        lm_layers=2,
        lm_heads=2,
        lm_kv_heads=2,
        lm_max_position=256,
        tokenizer_vocab_size=400,
        fusion=fusion,
        **extra,
    )
    train = {
        "train_data": str(pairs_json),
        "output_dir": str(tmp_path / "run"),
        "batch_size": 8,
        "max_steps": 6,
        "log_every": 2,
        "vision_lr": 3e-3,
        "connector_lr": 3e-3,
        "lm_lr": 3e-3,
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"model": model_cfg, "train": train}))
    summary = Trainer(load_recipe(tmp_path / "r.yaml")).train()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 6 and losses[-1] < losses[0], losses
    trained = VisionLanguageModel.from_pretrained(tmp_path / "run")
    assert trained.cfg.fusion == fusion
    if fusion == "cross_attention":  # the gates moved off zero: the images are in use
        assert all(float(b.attn_gate.detach().abs()) > 0 for b in trained.fusion.blocks)


@pytest.mark.parametrize("n_images", [1, 2])
@pytest.mark.parametrize("key", ["xattn", "xattn-resampler", "mixture", "prefix"])
def test_a_placeholder_id_in_a_cached_decode_step_is_a_text_token(key, n_images):
    """A generated placeholder id is a token like any other: the cached step does not take it for a new
    image, and equals the uncached forward over the whole sequence, where it is also text."""
    model = make_model(key)
    pid = model.cfg.image_token_id
    ids = prompt_ids(model, [7, *["IMG", 8] * n_images, 9])
    T = ids.shape[1]
    pixels = torch.randn(n_images, 3, 32, 32)
    with torch.no_grad():
        prefill = model(ids, pixel_values=pixels, use_cache=True)
        step = model(
            torch.tensor([[pid]]),
            attention_mask=torch.ones(1, T + 1, dtype=torch.long),
            position_ids=torch.tensor([[T]]),
            past_key_values=prefill.past_key_values,
            use_cache=True,
        )
        step2 = model(torch.tensor([[pid]]), past_key_values=step.past_key_values, use_cache=True)
        full = model(torch.cat([ids, torch.tensor([[pid, pid]])], dim=1), pixel_values=pixels)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step2.logits[:, -1], full.logits[:, -1], atol=1e-4, rtol=1e-4)


def test_prefix_uncached_forward_embeds_placeholders_after_the_images_as_text():
    model = make_model("prefix")
    pid = model.cfg.image_token_id
    ids = prompt_ids(model, [7, "IMG", 8, 9])
    pixels = torch.randn(1, 3, 32, 32)
    longer = torch.cat([ids, torch.tensor([[pid, 10]])], dim=1)
    with torch.no_grad():
        got = model(longer, pixel_values=pixels, use_cache=False).logits
        text = model.lm.get_input_embeddings()(longer)
        embeds = torch.cat([model.embed(ids, model.encode_images(pixels)), text[:, ids.shape[1] :]], dim=1)
        want = model.lm(inputs_embeds=embeds).logits
        no_images = model(torch.tensor([[7, pid, 8]])).logits  # no images for this forward: all text
        want_text = model.lm(input_ids=torch.tensor([[7, pid, 8]])).logits
    assert torch.equal(got, want)
    assert torch.equal(no_images, want_text)
    with pytest.raises(ValueError, match="placeholder"):  # a whole prompt must have an image per slot
        model.embed(ids, strict=True)
    with pytest.raises(ValueError, match="placeholder"):  # more image tokens than slots
        model(ids[:, :3], pixel_values=pixels)
