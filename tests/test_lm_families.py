"""Every LM family the documentation names works as a VLM's language model: it builds, saves and loads
back to the same logits (random tiny LMs built from a config; nothing is downloaded)."""

import json

import pytest
import torch
from conftest import TEXTS, tiny_config

from visprompt.models.tokenizer import train_tokenizer
from visprompt.models.vision_language_model import VisionLanguageModel

# Tiny configs per family, in each family's own key names (GPT-2: n_embd / n_head / n_layer).
FAMILIES = {
    "llama": ("LlamaConfig", dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2)),
    "smollm2": (
        "LlamaConfig",
        dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    ),
    "mistral": (
        "MistralConfig",
        dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    ),
    "gpt2": ("GPT2Config", dict(n_embd=48, n_layer=2, n_head=4, n_positions=256)),
    # OPT projects its embeddings: token embeddings 32 wide, decoder 48 wide.
    "opt": (
        "OPTConfig",
        dict(hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32),
    ),
}


def write_lm(folder, family: str, seed: int = 0):
    """A random causal LM of `family` with a small trained tokenizer, saved like a hub checkpoint."""
    import transformers

    config_name, sizes = FAMILIES[family]
    tokenizer = train_tokenizer(TEXTS * 3, vocab_size=300)
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **sizes,
    )
    torch.manual_seed(seed)
    lm = transformers.AutoModelForCausalLM.from_config(config)
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def as_json(cfg) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def image_prompt(model) -> torch.Tensor:
    tok = model.tokenizer
    ids = tok("What color is the circle?", add_special_tokens=False)["input_ids"]
    return torch.tensor([model.expand_image_placeholders([model.cfg.image_token_id, *ids])])


@pytest.mark.parametrize(
    "family,fusion",
    [(f, "prefix") for f in FAMILIES] + [("gpt2", "cross_attention"), ("gpt2", "mixture"), ("opt", "cross_attention")],
)
def test_vlm_over_each_lm_family_saves_and_loads_to_equal_logits(tmp_path, family, fusion):
    lm_dir = write_lm(tmp_path / "lm", family)
    torch.manual_seed(0)
    model = VisionLanguageModel.build(tiny_config(lm_source=str(lm_dir), fusion=fusion, xattn_gate_init=0.5)).eval()
    model.save_pretrained(tmp_path / "vlm")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "vlm")

    ids = image_prompt(model)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(ids, pixel_values=pixels).logits
        got = loaded(ids, pixel_values=pixels).logits
    assert got.shape == (1, ids.shape[1], model.lm.get_output_embeddings().out_features)
    assert torch.equal(got, expected)
    assert as_json(loaded.cfg) == as_json(model.cfg)
