"""Model kit: building from size specs, tokenizer training, prefix fusion, save/load round trip."""

import copy
import dataclasses
import json
import re

import pytest
import torch
from conftest import TEXTS, spread_weights, tiny_config

from visprompt.errors import ConfigError, ModelLoadError, ModelNotFoundError, VispromptError
from visprompt.models.chat import encode_chat, encode_training_example
from visprompt.models.config import BUILT_FIELDS, BuiltConfig, VLMConfig
from visprompt.models.modality_projector import ModalityProjector, pixel_shuffle
from visprompt.models.tokenizer import train_tokenizer
from visprompt.models.vision_language_model import VisionLanguageModel


def test_tokenizer_trained_on_data_round_trips_and_keeps_special_tokens():
    tok = train_tokenizer(TEXTS * 3, vocab_size=400, image_token="<image>")
    assert len(tok) <= 400 + 1
    text = "Where is the small red circle? top left, 3 shapes; ünïcode ✓"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: any text survives
    ids = tok("<image>\nWhat color is the circle?")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<image>")  # the placeholder is one token, never split
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>"
    # Frequent words from the data became single tokens.
    assert len(tok("What")["input_ids"]) == 1 and len(tok(" color")["input_ids"]) == 1
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_loss_mask_covers_only_assistant_replies():
    tok = train_tokenizer(TEXTS, vocab_size=300)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat color is the circle?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "How many shapes are there?"},
        {"role": "assistant", "content": "3"},
    ]
    ids, mask = encode_training_example(tok, chat)
    assert ids == encode_chat(tok, chat, add_generation_prompt=False)
    supervised = tok.decode([t for t, m in zip(ids, mask) if m])
    assert supervised.replace("\n", "") == "red<|im_end|>3<|im_end|>"
    # Nothing of the questions, the system prompt or the image placeholder is supervised.
    image_id = tok.convert_tokens_to_ids("<image>")
    assert not any(m for t, m in zip(ids, mask) if t == image_id)


def test_pixel_shuffle_merges_neighbours():
    x = torch.arange(16).float().reshape(1, 16, 1)  # a 4x4 grid, one channel
    y = pixel_shuffle(x, 2)  # [1, 4, 4]
    assert y.shape == (1, 4, 4)
    assert y[0, 0].tolist() == [0, 1, 4, 5]  # top-left 2x2 block
    with pytest.raises(ConfigError):
        pixel_shuffle(torch.zeros(1, 15, 1), 2)
    proj = ModalityProjector(8, 16, pixel_shuffle_factor=2)
    assert proj(torch.zeros(2, 64, 8)).shape == (2, 16, 16)


@pytest.mark.parametrize("vision_type,shuffle", [("vit", 1), ("vit", 2), ("resnet", 1)])
def test_build_from_size_spec(vision_type, shuffle):
    cfg = tiny_config(vision_type=vision_type, connector_pixel_shuffle=shuffle, vision_layers=2)
    model = VisionLanguageModel.build(cfg, TEXTS)
    cfg = model.cfg
    assert cfg.vision_config is not None and cfg.lm_config is not None
    tokens = model.encode_images(torch.zeros(3, 3, 32, 32))
    assert tokens.shape == (3, cfg.tokens_per_image, 48)
    expected = {("vit", 1): 16, ("vit", 2): 4, ("resnet", 1): 16}[(vision_type, shuffle)]
    assert cfg.tokens_per_image == expected
    assert cfg.image_token_id == model.tokenizer.convert_tokens_to_ids("<image>")


def test_image_features_replace_placeholder_embeddings(tiny_model):
    cfg = tiny_model.cfg
    ids = torch.tensor([[5] + [cfg.image_token_id] * cfg.tokens_per_image + [6]])
    image_embeds = torch.randn(1, cfg.tokens_per_image, 48)
    embeds = tiny_model.embed(ids, image_embeds)
    assert torch.equal(embeds[0, 1 : 1 + cfg.tokens_per_image], image_embeds[0])
    assert torch.equal(embeds[0, 0], tiny_model.lm.get_input_embeddings().weight[5])
    with pytest.raises(ValueError):
        tiny_model.embed(ids, torch.randn(2, cfg.tokens_per_image, 48))  # more image tokens than slots


def test_save_load_round_trip_gives_identical_logits(tiny_model, tmp_path):
    cfg = tiny_model.cfg
    ids = torch.tensor([[7, 8] + [cfg.image_token_id] * cfg.tokens_per_image + [9, 10, 11]])
    pixels = torch.randn(1, 3, 32, 32)
    before = tiny_model(ids, pixel_values=pixels).logits
    tiny_model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = VisionLanguageModel.from_pretrained(tmp_path)
    after = loaded(ids, pixel_values=pixels).logits
    assert torch.equal(before, after)
    assert json.loads(json.dumps(loaded.cfg.to_dict())) == json.loads(json.dumps(cfg.to_dict()))
    assert loaded.tokenizer("What color?")["input_ids"] == tiny_model.tokenizer("What color?")["input_ids"]


def test_resnet_round_trip_keeps_batchnorm_statistics(tmp_path):
    model = spread_weights(VisionLanguageModel.build(tiny_config(vision_type="resnet", vision_layers=2), TEXTS))
    model.vision.train()(torch.randn(4, 3, 32, 32))  # move the running statistics away from init
    model.eval().save_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.encode_images(x), VisionLanguageModel.from_pretrained(tmp_path).encode_images(x))


def test_config_rejects_unknown_fields_and_fusions(tmp_path):
    with pytest.raises(ConfigError):
        VLMConfig.from_dict({"lm_layerz": 3})
    with pytest.raises(ConfigError):
        VLMConfig(fusion="telepathy")
    with pytest.raises(ModelNotFoundError):
        VisionLanguageModel.from_pretrained(tmp_path)


def test_hf_vision_encoder_and_lm_from_local_folders(tmp_path):
    """Pretrained parts load by folder (as they would by hub id), CLS dropped, CNN maps flattened."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, ResNetConfig, ResNetModel

    from visprompt.models.tokenizer import train_tokenizer

    clip_dir, resnet_dir, lm_dir = tmp_path / "clip", tmp_path / "resnet", tmp_path / "lm"
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(clip_dir)
    ResNetModel(
        ResNetConfig(embedding_size=16, hidden_sizes=[16, 24], depths=[1, 1], layer_type="basic")
    ).save_pretrained(resnet_dir)
    tok = train_tokenizer(TEXTS, vocab_size=300)
    tok.save_pretrained(lm_dir)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).save_pretrained(lm_dir)

    clip_vlm = VisionLanguageModel.build(VLMConfig(vision_source=str(clip_dir), lm_source=str(lm_dir), image_size=32))
    assert clip_vlm.cfg.tokens_per_image == 16  # 4x4 patches, CLS dropped
    assert clip_vlm.cfg.image_mean[0] == pytest.approx(0.48145466)  # CLIP's own normalisation
    resnet_vlm = VisionLanguageModel.build(
        VLMConfig(vision_source=str(resnet_dir), lm_source=str(lm_dir), image_size=64)
    )
    assert resnet_vlm.encode_images(torch.zeros(1, 3, 64, 64)).shape == (1, resnet_vlm.cfg.tokens_per_image, 32)
    # A CNN's middle stage by vision_feature_layer (transformers' hidden_states: 1 = first stage).
    stage1 = VisionLanguageModel.build(
        VLMConfig(vision_source=str(resnet_dir), lm_source=str(lm_dir), image_size=64, vision_feature_layer=1)
    )
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        want = stage1.vision.model(pixel_values=x, output_hidden_states=True).hidden_states[1]  # [1, 16, 16, 16]
        assert stage1.vision.hidden_size == 16 and stage1.cfg.vision_num_patches == 16 * 16
        assert torch.equal(stage1.vision(x), want.flatten(2).transpose(1, 2))
    with pytest.raises(ConfigError, match="vision_feature_layer 9 is out of range"):  # one line, exit 2 in the CLI
        VisionLanguageModel.build(
            VLMConfig(vision_source=str(resnet_dir), lm_source=str(lm_dir), image_size=64, vision_feature_layer=9)
        )
    # Saved and reloaded without the source folders.
    clip_vlm.save_pretrained(tmp_path / "vlm")
    for d in (clip_dir, lm_dir):
        for f in d.iterdir():
            f.unlink()
    reloaded = VisionLanguageModel.from_pretrained(tmp_path / "vlm")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(reloaded.encode_images(x), clip_vlm.eval().encode_images(x))


def test_missing_hub_model_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        VisionLanguageModel.build(VLMConfig(vision_source="no-such-org/no-such-model"), TEXTS)
    assert "visprompt pull no-such-org/no-such-model" in str(e.value) and "\n" not in str(e.value)


def test_connector_output_gain_sets_the_image_tokens_starting_scale():
    quiet = VisionLanguageModel.build(tiny_config(), TEXTS)
    loud = VisionLanguageModel.build(tiny_config(connector_output_gain=15.0), TEXTS)
    for model, gain in ((quiet, 1.0), (loud, 15.0)):
        text_rms = float(model.lm.get_input_embeddings().weight.pow(2).mean().sqrt())
        w = model.connector.out_norm.weight
        assert torch.allclose(w, torch.full_like(w, gain * text_rms))
    pixels = torch.randn(2, 3, quiet.cfg.image_size, quiet.cfg.image_size)
    with torch.no_grad():
        rms_quiet = quiet.encode_images(pixels).pow(2).mean().sqrt()
        rms_loud = loud.encode_images(pixels).pow(2).mean().sqrt()
    assert 10 < float(rms_loud / rms_quiet) < 20
    with pytest.raises(ConfigError):
        tiny_config(connector_output_gain=0.0)


def test_batch_input_norm_standardises_each_channel_and_round_trips(tmp_path):
    """connector_input_norm="batch": per-channel statistics over the data (a CNN map's channels can
    sit far from zero); running statistics at inference are saved and reloaded."""
    model = spread_weights(VisionLanguageModel.build(tiny_config(connector_input_norm="batch"), TEXTS))
    norm = model.connector.net[0]
    feats = torch.randn(8, 4, norm.num_features) * 0.1 + torch.linspace(-20, 20, norm.num_features)  # [B, N, D]
    out = norm.train()(feats)
    assert out.mean(dim=(0, 1)).abs().max() < 1e-4 and (out.std(dim=(0, 1)) - 1).abs().max() < 0.05
    for _ in range(50):  # running statistics converge to the data's
        norm(feats)
    model.eval().save_pretrained(tmp_path)
    reloaded = VisionLanguageModel.from_pretrained(tmp_path)
    assert reloaded.cfg.connector_input_norm == "batch"
    assert torch.equal(reloaded.connector.net[0].running_mean, norm.running_mean)
    pixels = torch.randn(2, 3, model.cfg.image_size, model.cfg.image_size)
    assert torch.equal(reloaded.encode_images(pixels), model.encode_images(pixels))
    with pytest.raises(ConfigError):
        tiny_config(connector_input_norm="group")


def test_building_leaves_the_callers_config_unchanged_and_the_model_keeps_a_filled_copy():
    cfg = tiny_config(image_size=0, fusion="cross_attention")
    before = copy.deepcopy(cfg)
    model = VisionLanguageModel.build(cfg, TEXTS)
    assert cfg == before  # nothing computed was written into the caller's object
    assert cfg.built == BuiltConfig() and cfg.image_token_id == -1 and cfg.tokens_per_image == 0
    filled = model.cfg
    assert filled is not cfg
    assert (filled.image_size, filled.image_mean, filled.image_std) == (64, (0.5,) * 3, (0.5,) * 3)
    assert (filled.tokens_per_image, filled.image_feature_tokens, filled.vision_num_patches) == (1, 64, 64)
    assert filled.image_token_id == model.tokenizer.convert_tokens_to_ids("<image>")
    assert dataclasses.replace(filled, image_size=0, image_mean=(), image_std=(), built=BuiltConfig()) == cfg


def as_json(cfg) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def test_config_save_load_round_trip_is_equal(tmp_path, tiny_model):
    tiny_model.cfg.save(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved["built"]) == set(BUILT_FIELDS) and not set(saved) & set(BUILT_FIELDS)
    assert as_json(VLMConfig.load(tmp_path)) == as_json(tiny_model.cfg) == json.dumps(saved, sort_keys=True)
    tiny_model.save_pretrained(tmp_path / "model")
    assert as_json(VisionLanguageModel.from_pretrained(tmp_path / "model").cfg) == as_json(tiny_model.cfg)


def test_flat_config_files_with_built_fields_at_the_top_still_load(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    flat = {k: v for k, v in data.items() if k != "built"} | data["built"]  # the older layout
    (tmp_path / "config.json").write_text(json.dumps(flat))
    assert as_json(VLMConfig.load(tmp_path)) == json.dumps(data, sort_keys=True)
    loaded = VisionLanguageModel.from_pretrained(tmp_path)
    ids = torch.tensor([tiny_model.expand_image_placeholders([5, tiny_model.cfg.image_token_id, 6])])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixel_values=pixels).logits, tiny_model(ids, pixel_values=pixels).logits)
    with pytest.raises(ConfigError, match="unknown model config field"):
        VLMConfig.from_dict({"built": {"image_token_idd": 3}})


def test_a_model_with_lora_adapters_saves_merged_weights_and_tied_embeddings_once(tmp_path):
    pytest.importorskip("peft")
    from safetensors import safe_open

    from visprompt.models.lora import add_lora

    torch.manual_seed(0)
    model = VisionLanguageModel.build(tiny_config(), TEXTS).eval()
    add_lora(model.lm, 4, 8.0, "q_proj,v_proj")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # adapters that change the output
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert len(keys & {"lm.model.embed_tokens.weight", "lm.lm_head.weight"}) == 1
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    loaded = VisionLanguageModel.from_pretrained(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_public_model_forwards_document_their_arguments_and_shapes():
    from visprompt.models.cross_attention import (
        CrossAttentionFusion,
        GatedCrossAttentionBlock,
        PerceiverAttention,
        PerceiverResampler,
    )
    from visprompt.models.mixture import MixtureFusion
    from visprompt.models.vision_encoder import VisionEncoder

    methods = [
        VisionLanguageModel.forward,
        VisionLanguageModel.encode_images,
        VisionLanguageModel.encode_vision_features,
        VisionLanguageModel.embed,
        VisionEncoder.forward,
        ModalityProjector.forward,
        PerceiverAttention.forward,
        PerceiverResampler.forward,
        GatedCrossAttentionBlock.forward,
        CrossAttentionFusion.encode,
        CrossAttentionFusion.run,
        MixtureFusion.run,
    ]
    for method in methods:
        doc = method.__doc__ or ""
        assert "Args:" in doc and "Returns:" in doc and "[" in doc, method.__qualname__


def test_built_fields_are_not_recipe_settings():
    from visprompt.train.config import load_recipe

    for key in ("model.built={}", "model.image_token_id=3"):
        with pytest.raises(ConfigError, match="unknown model setting"):
            load_recipe(None, [key])


# ------------------------------------------------------------------------------ broken model folders


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    """A saved tiny model, and the weights of one 64 wide where its config says 48."""
    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    VisionLanguageModel.build(tiny_config(), TEXTS).save_pretrained(root / "good")
    VisionLanguageModel.build(tiny_config(lm_hidden_size=64), TEXTS).save_pretrained(root / "wide")
    return root


def broken_copy(saved_folders, tmp_path, name: str, contents: bytes | str):
    """A copy of the good folder with file `name` replaced by `contents`."""
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(saved_folders / "good", folder)
    path = folder / name
    path.write_bytes(contents) if isinstance(contents, bytes) else path.write_text(contents)
    return folder, path


def refused_folder(folder, error=VispromptError) -> str:
    """Loading `folder` (directly and as a backend) raises `error` on one line; the message."""
    from visprompt.engine.loading import load_backend

    with pytest.raises(error) as info:
        VisionLanguageModel.from_pretrained(folder)
    with pytest.raises(error) as again:
        load_backend(str(folder))
    message = str(info.value)
    assert message == str(again.value) and message.strip() and "\n" not in message, message
    return message


def good_file(saved_folders, name: str) -> bytes:
    return (saved_folders / "good" / name).read_bytes()


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0001])
def test_truncated_weights_name_the_file(saved_folders, tmp_path, keep):
    data = good_file(saved_folders, "model.safetensors")
    folder, weights = broken_copy(saved_folders, tmp_path, "model.safetensors", data[: max(2, int(len(data) * keep))])
    message = refused_folder(folder, ModelLoadError)
    assert message.startswith(f"{weights} is not a readable safetensors file: ")


def test_weights_of_another_size_name_the_tensor_and_both_shapes(saved_folders, tmp_path):
    wide = (saved_folders / "wide" / "model.safetensors").read_bytes()
    folder, weights = broken_copy(saved_folders, tmp_path, "model.safetensors", wide)
    message = refused_folder(folder, ModelLoadError)
    assert re.fullmatch(
        rf"{re.escape(str(weights))} does not match its config.json: [\w.]+ is \[[\d, ]+\], config expects \[[\d, ]+\]",
        message,
    ), message
    assert "64" in message and "48" in message


def test_broken_config_json_names_the_file(saved_folders, tmp_path):
    cfg = json.loads(good_file(saved_folders, "config.json"))
    cases = {
        "[1, 2]": "is not a model config: a JSON list, not an object",
        '{"model_type": "visprompt",': "is not valid JSON",
        b"\xff\xfe{}": "is not valid JSON",  # not UTF-8
        json.dumps({**cfg, "lm_layers": "abc"}): "lm_layers: expected an int, got 'abc'",
        json.dumps({**cfg, "image_mean": "grey"}): "image_mean: expected a list of numbers, got 'grey'",
        json.dumps({**cfg, "built": 3}): "built: expected a mapping, got 3",
        json.dumps({**cfg, "built": {**cfg["built"], "lm_config": [1]}}): "lm_config: expected a mapping, got [1]",
        json.dumps(
            {**cfg, "built": {**cfg["built"], "lm_config": {"model_type": "no-such-lm"}}}
        ): "does not describe a model",
    }
    for text, expected in cases.items():
        folder, path = broken_copy(saved_folders, tmp_path / str(len(list(tmp_path.iterdir()))), "config.json", text)
        message = refused_folder(folder, ConfigError)
        assert str(path) in message and expected in message, (text, message)


def test_a_tokenizer_that_does_not_load_names_the_folder(saved_folders, tmp_path):
    folder, _ = broken_copy(saved_folders, tmp_path, "tokenizer.json", "{broken")
    message = refused_folder(folder, ModelLoadError)
    assert message.startswith(f"{folder}: its tokenizer does not load: ")


def test_loading_and_asking_a_saved_model_through_the_python_api_print_nothing(saved_folders, capfd):
    from PIL import Image

    import visprompt
    from visprompt.runtime import cpu_kernels

    cpu_kernels.load()  # the decoder's kernel says once per machine that it compiles: not this test's matter
    capfd.readouterr()
    model = visprompt.load(str(saved_folders / "good"), max_new_tokens=3)
    model.ask(Image.new("RGB", (16, 16), "red"), "What color is the circle?")
    assert capfd.readouterr() == ("", "")
