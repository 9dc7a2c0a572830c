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


@pytest.fixture(scope="module")
def trained(towers, shapes_dir, tmp_path_factory):
    """A SigLIP-tower model with a LLaVA connector trained for a few steps through a recipe (its folder)."""
    from visprompt.train.config import load_recipe
    from visprompt.train.trainer import Trainer

    out = tmp_path_factory.mktemp("trained")
    model_cfg = {k: v for k, v in vars(llava_ready(towers["siglip"])).items() if k != "built"}
    recipe = {
        "model": model_cfg,
        "train": {
            "train_data": str(shapes_dir / "train.json"),
            "output_dir": str(out / "run"),
            "batch_size": 8,
            "max_steps": 200,  # ~20 s: enough for short, image-dependent answers
            "vision_lr": 1e-3,
            "connector_lr": 3e-3,
            "lm_lr": 3e-3,
        },
    }
    (out / "recipe.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(recipe))))
    Trainer(load_recipe(out / "recipe.yaml")).train()
    return out / "run"


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


def test_model_trained_through_a_recipe_exports_from_its_folder(trained, tmp_path):
    assert main(["export", str(trained), "--format", "llava", "--output", str(tmp_path / "llava")]) == 0
    assert_transformers_matches(VisionLanguageModel.from_pretrained(trained), tmp_path / "llava")


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


# -- GGUF: llama.cpp and Ollama -----------------------------------------------------------------
def gguf_reader(path):
    from gguf import GGUFReader

    return GGUFReader(str(path))


def field(reader, key):
    return reader.fields[key].contents()


def test_gguf_export_writes_the_lm_with_its_tokenizer_the_mmproj_and_a_modelfile(towers, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    model = build(llava_ready(towers["clip"], system_prompt="Look closely."))
    files = export_model(model, "gguf", tmp_path / "gguf")
    assert [f.name for f in files] == ["model-f16.gguf", "mmproj-f16.gguf", "Modelfile"]
    lm = gguf_reader(files[0])
    assert field(lm, "general.architecture") == "llama" and field(lm, "tokenizer.ggml.model") == "gpt2"
    assert field(lm, "tokenizer.ggml.pre") == "gpt-2"
    assert field(lm, "tokenizer.ggml.tokens")[model.cfg.image_token_id] == "<image>"
    assert field(lm, "tokenizer.chat_template") == model.tokenizer.chat_template
    mm = gguf_reader(files[1])
    assert field(mm, "general.architecture") == "clip" and field(mm, "clip.projector_type") == "mlp"
    assert field(mm, "clip.vision.feature_layer") == [1]  # hidden_states[-2] of 2 blocks
    assert field(mm, "clip.vision.block_count") == 1 and field(mm, "clip.use_gelu") is False  # quick GELU
    names = {t.name for t in mm.tensors}
    assert {"v.class_embd", "v.pre_ln.weight", "v.blk.0.ffn_up.weight", "mm.0.weight", "mm.2.bias"} <= names
    assert not any(n.startswith(("v.blk.1.", "v.post_ln")) for n in names)
    text = files[2].read_text()
    assert "FROM ./model-f16.gguf\nFROM ./mmproj-f16.gguf\n" in text and 'SYSTEM """Look closely."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "<|im_start|>{{ .Role }}" in text
    with pytest.raises(ExportError, match="multiple of 32"):  # q8_0 blocks need rows of 32s; this LM is 48 wide
        export_model(model, "gguf", tmp_path / "q8", quant="q8_0")
    monkeypatch.setattr("visprompt.export.gguf_files.llama_cpp_available", lambda: False)
    with pytest.raises(ExportError, match="pip install llama-cpp-python"):
        export_model(model, "gguf", tmp_path / "q4", quant="q4_k")


def ask_text(model, conv, marker: str) -> tuple[str, list]:
    """The prompt text visprompt renders for `conv` (images as llama.cpp's media marker) and the images."""
    chat, images = to_chat(conv, model.cfg.image_token, model.cfg.system_prompt)
    text = model.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return text.replace(model.cfg.image_token, marker), images


@pytest.mark.parametrize("lm", ["scratch", "qwen2"])
def test_lm_gguf_runs_in_llama_cpp_with_visprompts_tokens_and_greedy_text(towers, qwen2_lm, tmp_path, lm):
    pytest.importorskip("llama_cpp")
    from llama_cpp_vlm import LlamaCppVLM

    model = build(llava_ready(towers["siglip"], lm_source=qwen2_lm if lm == "qwen2" else "scratch"))
    lm_file, _, _ = export_model(model, "gguf", tmp_path / "gguf")
    vlm = LlamaCppVLM(lm_file)  # the language model alone
    backend = OwnVLMBackend(model)
    try:
        for text in TEXTS[::2] + ["<|im_start|>user\nhello world, how are you?<|im_end|>\n"]:
            assert vlm.tokenize(text) == model.tokenizer(text, add_special_tokens=False)["input_ids"]
        convs = [[{"role": "user", "content": q}] for q in ("What color is the circle?", "Describe the image.")]
        for conv, reply in zip(convs, backend.generate(convs, SamplingParams(max_new_tokens=12))):
            text, _ = ask_text(model, conv, vlm.marker)
            assert vlm.greedy(text, n=12, stop=backend.stop_ids) == reply.token_ids
    finally:
        vlm.close()


def scene_questions(shapes_dir, n: int, side: int):
    """The first question of `n` held-out shapes scenes, the image already at the encoder's size (so
    both sides see the same pixels: llama.cpp resizes with its own filter)."""
    from visprompt.data.llava import load_llava_records

    convs = []
    for record in load_llava_records(shapes_dir / "test.json")[:n]:
        image = Image.open(record.images[0]).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
        question = record.turns[0][0].replace("<image>", "").strip()
        convs.append(
            [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
        )
    return convs


def test_trained_gguf_pair_runs_in_llama_cpps_multimodal_path_with_the_same_greedy_text(trained, shapes_dir, tmp_path):
    """F16 language model + F16 mmproj through libmtmd (llama.cpp's multimodal library)."""
    pytest.importorskip("llama_cpp")
    from llama_cpp_vlm import LlamaCppVLM

    model = VisionLanguageModel.from_pretrained(trained)
    assert main(["export", str(trained), "--format", "gguf", "--output", str(tmp_path / "gguf")]) == 0
    vlm = LlamaCppVLM(tmp_path / "gguf" / "model-f16.gguf", tmp_path / "gguf" / "mmproj-f16.gguf")
    backend = OwnVLMBackend(model)
    convs = scene_questions(shapes_dir, 6, model.cfg.image_size)
    replies = backend.generate(convs, SamplingParams(max_new_tokens=16))
    assert len({r.text for r in replies}) > 1  # trained far enough to answer differently per scene
    try:
        for conv, reply in zip(convs, replies):
            text, images = ask_text(model, conv, vlm.marker)
            ours = model.encode_images(backend.preprocess(images))[0].detach()
            theirs = vlm.image_embeddings(images[0])
            assert (theirs - ours).abs().max() < 2e-2 * ours.abs().max()  # f16 weights, tanh GELU
            assert vlm.greedy(text, images, n=16, stop=backend.stop_ids) == reply.token_ids
    finally:
        vlm.close()


def test_clip_tower_mmproj_in_llama_cpp(towers, tmp_path):
    """llama.cpp's LLaVA graph puts CLIP's class embedding after the patches and keeps output rows
    1..N. Where it still does, the test shows exactly that and says so; where it does not, the
    exported pair must give visprompt's greedy tokens."""
    pytest.importorskip("llama_cpp")
    from llama_cpp_vlm import LlamaCppVLM

    from visprompt.export.mmproj import write_mmproj

    model = build(llava_ready(towers["clip"]))
    lm_file, _, _ = export_model(model, "gguf", tmp_path / "gguf")
    vlm = LlamaCppVLM(lm_file, write_mmproj(model, tmp_path / "mmproj-f32.gguf", "f32"))
    image = noise(5, (32, 32))
    backend = OwnVLMBackend(model)
    try:
        pixels = backend.preprocess([image])
        theirs = vlm.image_embeddings(image)
        with torch.no_grad():
            ours = model.encode_images(pixels)[0]
            tower, emb = model.vision.model, model.vision.model.embeddings
            patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [1, N, D]
            x = torch.cat([patches, emb.class_embedding.view(1, 1, -1)], 1) + emb.position_embedding.weight
            x = tower.pre_layrnorm(x)
            for layer in tower.encoder.layers[:1]:  # the blocks up to hidden_states[-2]
                x = layer(x, None)
                x = x[0] if isinstance(x, tuple) else x
            cls_last = model.connector(x[:, 1:])[0]
        scale = ours.abs().max()
        if (theirs - cls_last).abs().max() < 1e-2 * scale and (theirs - ours).abs().max() > 0.1 * scale:
            import llama_cpp

            pytest.skip(
                f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) lacks CLIP's token order in its LLaVA graph: it "
                "appends the class embedding after the patches and keeps rows 1..N, so image token i carries patch "
                "i+1 and the last one the class token; SigLIP towers (no class token) run exactly"
            )
        conv = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
        text, images = ask_text(model, conv, vlm.marker)
        reply = backend.generate([conv], SamplingParams(max_new_tokens=12))[0]
        assert vlm.greedy(text, images, n=12, stop=backend.stop_ids) == reply.token_ids
    finally:
        vlm.close()


def test_q4_k_and_q8_0_language_models_load_in_llama_cpp(towers, tmp_path):
    pytest.importorskip("llama_cpp")
    from llama_cpp_vlm import LlamaCppVLM

    model = build(llava_ready(towers["siglip"], lm_hidden_size=64))  # rows of 64 fill q8_0's 32-value blocks
    for quant in ("q8_0", "q4_k"):
        lm_file, _, _ = export_model(model, "gguf", tmp_path / quant, quant=quant)
        assert field(gguf_reader(lm_file), "general.file_type") == {"q8_0": 7, "q4_k": 15}[quant]
        vlm = LlamaCppVLM(lm_file)
        try:
            assert len(vlm.greedy("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", n=4)) >= 1
        finally:
            vlm.close()
