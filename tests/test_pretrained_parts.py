"""Real packaged weights as VLM parts (slow: loads EfficientNet-Lite0 / SmolLM2; still runs in CI)."""

import json

import pytest
import torch
from conftest import TEXTS

from visprompt.data.mnist import generate_mnist_dataset, load_mnist
from visprompt.models.config import VLMConfig
from visprompt.models.vision_language_model import VisionLanguageModel


def test_mnist_dataset_holds_out_a_test_split(tmp_path):
    images, labels = load_mnist()
    assert images.shape == (5000, 28, 28) and set(labels.tolist()) == set(range(10))
    summary = generate_mnist_dataset(tmp_path, n_test=1000, seed=0)
    assert (summary["train"], summary["test"]) == (4000, 1000)
    train = json.loads((tmp_path / "train.json").read_text())
    test = json.loads((tmp_path / "test.json").read_text())
    assert train[0]["conversations"][0]["value"].startswith("<image>\n")
    assert {r["conversations"][1]["value"] for r in test} == {str(d) for d in range(10)}
    assert (tmp_path / train[0]["image"]).is_file()


@pytest.mark.slow
def test_efficientnet_lite0_as_prefix_encoder_round_trips(tmp_path):
    cfg = VLMConfig(
        vision_source="efficientnet-lite0",
        image_size=128,
        connector_pixel_shuffle=2,
        lm_hidden_size=32,
        lm_layers=1,
        lm_heads=2,
        lm_kv_heads=1,
        tokenizer_vocab_size=300,
    )
    model = VisionLanguageModel.build(cfg, TEXTS).eval()
    cfg = model.cfg
    assert cfg.tokens_per_image == 4  # 128 px -> 4x4 map -> pixel shuffle 2 -> 2x2
    assert cfg.image_mean == pytest.approx((127 / 255,) * 3)  # the encoder's own normalisation
    x = torch.randn(2, 3, 128, 128)
    feats = model.encode_images(x)
    assert feats.shape == (2, 4, 32)
    model.save_pretrained(tmp_path)
    assert torch.equal(VisionLanguageModel.from_pretrained(tmp_path).encode_images(x), feats)


@pytest.mark.slow
def test_efficientnet_feature_layer_picks_a_middle_block(tmp_path):
    """vision_feature_layer indexes [stem, block 1..16, head]: 8 is block 8's 80-channel, stride-16 map;
    -1 stays the head; only the blocks up to the chosen one run; the choice survives save/load."""
    cfg = VLMConfig(
        vision_source="efficientnet-lite0",
        image_size=96,
        vision_feature_layer=8,
        connector_pixel_shuffle=2,
        lm_hidden_size=32,
        lm_layers=1,
        lm_heads=2,
        lm_kv_heads=1,
        tokenizer_vocab_size=300,
    )
    model = VisionLanguageModel.build(cfg, TEXTS).eval()
    cfg = model.cfg
    x = torch.randn(2, 3, 96, 96)
    net = model.vision.model.net
    with torch.no_grad():
        stem = net._swish(net._bn0(net._conv_stem(x)))
        block8 = stem
        for block in net._blocks[:8]:
            block8 = block(block8)
        torch.testing.assert_close(
            model.vision(x), block8.flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-4
        )  # [2, 36, 80]
        assert model.vision.hidden_size == 80 and cfg.vision_num_patches == 36
        assert cfg.tokens_per_image == 9  # 6x6 map -> pixel shuffle 2 -> 3x3
        torch.testing.assert_close(
            model.vision.model(x, layer=-1), net.extract_features(x).flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-4
        )
        assert model.vision.model.feature_map(x, 0).shape == (2, 32, 48, 48)  # the stem
    with pytest.raises(ValueError):
        model.vision.model.feature_map(x, 18)
    model.save_pretrained(tmp_path)
    reloaded = VisionLanguageModel.from_pretrained(tmp_path)
    assert reloaded.cfg.vision_feature_layer == 8
    assert torch.equal(reloaded.encode_images(x), model.encode_images(x))


@pytest.mark.slow
def test_smollm2_as_language_model_keeps_its_chat_template(tmp_path):
    cfg = VLMConfig(
        vision_type="vit",
        vision_hidden_size=32,
        vision_layers=1,
        vision_heads=2,
        image_size=32,
        lm_source="smollm2-135m",
    )
    model = VisionLanguageModel.build(cfg)
    cfg = model.cfg
    tok = model.tokenizer
    assert "<image>" in tok.get_vocab() and cfg.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert model.lm.get_input_embeddings().num_embeddings >= len(tok)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "<image>\nhi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(cfg.image_token_id) == 1
