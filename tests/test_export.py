"""`visprompt export --format llava`: the exported checkpoint, loaded by transformers' own classes,
computes what the visprompt model computes (logits within 1e-4, the same greedy text) for CLIP and
SigLIP towers, random and trained; models LLaVA cannot express are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import TEXTS, spread_weights, tiny_config
from PIL import Image

from visprompt.cli.main import main
from visprompt.engine.backend import SamplingParams
from visprompt.engine.backends.own import OwnVLMBackend
from visprompt.export import ExportError, export_model
from visprompt.models.chat import encode_chat, to_chat
from visprompt.models.vision_language_model import VisionLanguageModel

TOWER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)


def noise(seed: int, size=(40, 52)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


# One image before the text; two images around the text with a system message; the image after the text.
CONVS = [
    [
        {
            "role": "user",
            "content": [{"type": "image", "image": noise(0)}, {"type": "text", "text": "What color is it?"}],
        }
    ],
    [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": noise(1, (32, 32))},
                {"type": "text", "text": "Which one is brighter?"},
                {"type": "image", "image": noise(2, (60, 30))},
            ],
        },
    ],
    [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Describe the image."}, {"type": "image", "image": noise(3)}],
        }
    ],
]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """Tiny random CLIP and SigLIP vision towers saved as transformers folders."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    out = {}
    for name, config, cls in (
        ("clip", CLIPVisionConfig, CLIPVisionModel),
        ("siglip", SiglipVisionConfig, SiglipVisionModel),
    ):
        torch.manual_seed(1)
        folder = tmp_path_factory.mktemp(name)
        cls(config(**TOWER)).save_pretrained(folder)
        out[name] = str(folder)
    return out


@pytest.fixture(scope="module")
def qwen2_lm(tmp_path_factory):
    """A tiny random Qwen2 causal LM folder (attention biases, its own ChatML tokenizer)."""
    from hf_tiny import make_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = make_tokenizer(["<|im_start|>", "<|im_end|>"])
    torch.manual_seed(2)
    lm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    )
    folder = tmp_path_factory.mktemp("qwen2")
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def llava_ready(tower: str, **overrides):
    settings = dict(vision_source=tower, image_size=0, connector_type="llava", vision_feature_layer=-2)
    return tiny_config(**{**settings, **overrides})


def build(cfg) -> VisionLanguageModel:
    torch.manual_seed(0)
    return spread_weights(VisionLanguageModel.build(cfg, TEXTS)).eval()


def assert_transformers_matches(model: VisionLanguageModel, folder, max_new_tokens: int = 12) -> None:
    """Logits of the exported checkpoint (AutoProcessor + AutoModelForImageTextToText) within 1e-4 of
    visprompt's on the same conversations, and the same greedy text."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    hf = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(hf).__name__ == "LlavaForConditionalGeneration"
    backend = OwnVLMBackend(model)
    replies = backend.generate(CONVS, SamplingParams(max_new_tokens=max_new_tokens))
    for conv, reply in zip(CONVS, replies):
        inputs = processor.apply_chat_template(
            conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        chat, images = to_chat(conv, model.cfg.image_token, model.cfg.system_prompt)
        ids = model.expand_image_placeholders(encode_chat(model.tokenizer, chat, add_generation_prompt=True))
        assert inputs["input_ids"][0].tolist() == ids
        pixels = backend.preprocess(images)
        assert torch.equal(inputs["pixel_values"], pixels)
        with torch.no_grad():
            ours = model(torch.tensor([ids]), pixel_values=pixels).logits
            theirs = hf(**inputs).logits
        assert (ours - theirs).abs().max() < 1e-4
        out = hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, len(ids) :].tolist()
        assert out[: len(reply.token_ids)] == reply.token_ids and len(reply.token_ids) > 1
        # visprompt's replies have no surrounding whitespace
        assert processor.decode(out, skip_special_tokens=True).strip() == reply.text


@pytest.mark.parametrize("tower,lm", [("clip", "scratch"), ("siglip", "qwen2")])
def test_random_model_exports_to_llava_that_transformers_runs_identically(towers, qwen2_lm, tmp_path, tower, lm):
    lm_source = qwen2_lm if lm == "qwen2" else "scratch"
    model = build(llava_ready(towers[tower], lm_source=lm_source, system_prompt="You look closely."))
    (folder,) = export_model(model, "llava", tmp_path / "llava")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_feature_select_strategy"] == ("default" if tower == "clip" else "full")
    assert config["image_seq_length"] == model.cfg.tokens_per_image == 16
    assert config["text_config"]["model_type"] == ("llama" if lm == "scratch" else "qwen2")
    assert_transformers_matches(model, folder)


def test_model_trained_through_a_recipe_exports_from_its_folder(towers, shapes_dir, tmp_path):
    from visprompt.train.config import load_recipe
    from visprompt.train.trainer import Trainer

    model_cfg = {k: v for k, v in vars(llava_ready(towers["clip"])).items() if k != "built"}
    recipe = {
        "model": model_cfg,
        "train": {
            "train_data": str(shapes_dir / "train.json"),
            "output_dir": str(tmp_path / "run"),
            "batch_size": 8,
            "max_steps": 4,
            "vision_lr": 1e-3,
            "connector_lr": 3e-3,
            "lm_lr": 3e-3,
        },
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(recipe))))
    Trainer(load_recipe(tmp_path / "recipe.yaml")).train()
    assert main(["export", str(tmp_path / "run"), "--format", "llava", "--output", str(tmp_path / "llava")]) == 0
    assert_transformers_matches(VisionLanguageModel.from_pretrained(tmp_path / "run"), tmp_path / "llava")


@pytest.mark.parametrize(
    "overrides,words",
    [
        (dict(connector_type="mlp"), "connector_type 'mlp'"),
        (dict(connector_pixel_shuffle=2), "Idefics3"),
        (dict(fusion="cross_attention"), "cross_attention fusion"),
        (dict(vision_feature_layer=-1), "SigLIP"),
        (dict(vision_source="scratch", vision_type="resnet"), "'resnet'"),
        (dict(connector_hidden_size=40), "hidden size 40"),
    ],
)
def test_models_llava_cannot_express_are_refused_in_one_line(towers, tmp_path, capsys, overrides, words):
    model = VisionLanguageModel.build(llava_ready(towers["siglip"], **overrides), TEXTS)
    with pytest.raises(ExportError) as e:
        export_model(model, "llava", tmp_path / "x")
    assert words in str(e.value) and "\n" not in str(e.value)
    model.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "m"), "--format", "llava", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot export as LLaVA") and err.count("\n") == 1 and words in err
    assert not (tmp_path / "x").exists()


def test_export_refuses_what_is_not_a_visprompt_model_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    assert main(["export", str(tmp_path), "--format", "llava", "--output", str(tmp_path / "x")]) == 2
    assert main(["export", str(tmp_path), "--format", "onnx", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "not a visprompt model folder" in err[0] and "unknown export format 'onnx'" in err[1]
