"""HFVLMBackend against transformers' own `generate`, on tiny random checkpoints of each architecture."""

from __future__ import annotations

import base64
import io
import json
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hf_tiny import WRITERS
from PIL import Image

from visprompt.engine.backend import Backend, SamplingParams
from visprompt.engine.backends.hf_vlm import HFVLMBackend, is_hf_vlm_folder
from visprompt.errors import ModelNotFoundError, VispromptError

ARCHS = list(WRITERS)  # llava, llava_next, qwen2_vl, idefics3, smolvlm
N_NEW = 12
TEXT_ONLY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def two_conversations():
    """A batch of two conversations of different lengths, images in both (one image, then two)."""
    return [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": noise_image(40, 30, 1)},
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ],
        [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare "},
                    {"type": "image", "image": noise_image(64, 64, 2)},
                    {"type": "image_url", "image_url": {"url": noise_image(20, 50, 3)}},
                    {"type": "text", "text": " and say which one is brighter. Describe it briefly."},
                ],
            },
        ],
    ]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tiny")
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = WRITERS[arch](root / arch, seed=ARCHS.index(arch))
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def backends(folders):
    cache = {}

    def get(arch: str) -> HFVLMBackend:
        if arch not in cache:
            cache[arch] = HFVLMBackend.from_pretrained(folders(arch))
        return cache[arch]

    return get


def reference_ids(backend: HFVLMBackend, convs, n: int, **gen_kwargs) -> tuple[list[list[int]], dict]:
    inputs = backend.prepare_inputs(convs)
    with torch.inference_mode():
        out = backend.model.generate(**inputs, do_sample=False, max_new_tokens=n, **gen_kwargs)
    start = inputs["input_ids"].shape[1]
    return [row[start:].tolist() for row in out], inputs


# ---------------------------------------------------------------------------------------- equivalence


@contextmanager
def eos_off(backend: HFVLMBackend):
    """Neither our loop nor transformers' generate stops at EOS: every row runs to max_new_tokens."""
    saved = backend.eos_ids, backend.model.generation_config.eos_token_id
    backend.eos_ids = []
    backend.model.generation_config.eos_token_id = None
    try:
        yield backend
    finally:
        backend.eos_ids, backend.model.generation_config.eos_token_id = saved


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_generate(backends, arch):
    backend = backends(arch)
    assert isinstance(backend, Backend)
    convs = two_conversations()
    with eos_off(backend):
        results = backend.generate(convs, SamplingParams(max_new_tokens=N_NEW))
        ref, inputs = reference_ids(backend, convs, N_NEW)
    lengths = inputs["attention_mask"].sum(-1).tolist()
    assert lengths[0] != lengths[1]  # really a padded batch
    for res, ref_row, n_prompt in zip(results, ref, lengths):
        assert res.token_ids == ref_row and len(ref_row) == N_NEW
        assert res.finish_reason == "length"
        assert res.prompt_tokens == n_prompt
        assert res.completion_tokens == N_NEW
        assert res.text == backend.tokenizer.decode(res.token_ids, skip_special_tokens=True)
    assert results[0].token_ids != results[1].token_ids


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "idefics3"])
def test_text_only_and_mixed_batches(backends, arch):
    backend = backends(arch)
    mixed = [
        [{"role": "user", "content": "Say hello to the world, please."}],
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": noise_image(33, 47, 5)}, {"type": "text", "text": "What?"}],
            }
        ],
    ]
    text_only = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "a photo of a cat"}]]
    for convs in (mixed, text_only):
        results = backend.generate(convs, SamplingParams(max_new_tokens=8))
        ref, _ = reference_ids(backend, convs, 8)
        assert [r.token_ids for r in results] == [row[: len(r.token_ids)] for r, row in zip(results, ref)]


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_eos_finishes_each_row_on_its_own(backends, arch):
    backend = backends(arch)
    convs = two_conversations()
    free = backend.generate(convs, SamplingParams(max_new_tokens=N_NEW))
    # Declare as EOS a token row 0 emits at step 3, and one row 1 emits later, and compare with generate.
    eos_a = free[0].token_ids[3]
    eos_b = next((t for t in free[1].token_ids[6:] if t not in free[0].token_ids[:4]), free[1].token_ids[-1])
    saved = backend.eos_ids
    backend.eos_ids = [eos_a, eos_b]
    try:
        results = backend.generate(convs, SamplingParams(max_new_tokens=N_NEW))
    finally:
        backend.eos_ids = saved
    ref, _ = reference_ids(backend, convs, N_NEW, eos_token_id=[eos_a, eos_b])
    assert results[0].finish_reason == "stop"
    assert len(results[0].token_ids) <= 3
    assert len(results[1].token_ids) > len(results[0].token_ids)  # row 1 went on after row 0 stopped
    for res, row in zip(results, ref):
        n = len(res.token_ids)
        assert res.token_ids == row[:n]
        if res.finish_reason == "stop":  # the stop token ends the reply (counted, not kept); generate pads after it
            assert row[n] in (eos_a, eos_b) and res.completion_tokens == n + 1
            assert all(t == backend.pad_id for t in row[n + 1 :])
    assert results[0].text == backend.tokenizer.decode(results[0].token_ids, skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible(backends):
    backend = backends("qwen2_vl")
    convs = two_conversations()
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.95, seed=1234)
    a = backend.generate(convs, params)
    b = backend.generate(convs, params)
    c = backend.generate(convs, params.updated(seed=99))
    greedy = backend.generate(convs, SamplingParams(max_new_tokens=10))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    assert [r.token_ids for r in a] != [r.token_ids for r in greedy]


# ---------------------------------------------------------------------------------------- stop strings, stream


def _ascii_stop(text: str) -> str:
    """A two-letter piece of `text` a few characters in, to use as a stop string."""
    for i in range(3, len(text) - 1):
        piece = text[i : i + 2]
        if piece.isascii() and piece.isalpha():
            return piece
    pytest.skip("greedy text has no ascii letters to stop at")


@pytest.mark.parametrize("arch", ["llava_next", "smolvlm"])
def test_stop_string_trims_text(backends, arch):
    backend = backends(arch)
    convs = two_conversations()
    free = backend.generate(convs, SamplingParams(max_new_tokens=N_NEW))
    stop = _ascii_stop(free[1].text)
    results = backend.generate(convs, SamplingParams(max_new_tokens=N_NEW, stop=["@@never@@", stop]))
    cut = free[1].text.find(stop)
    assert results[1].text == free[1].text[:cut].strip()
    assert results[1].finish_reason == "stop"
    assert results[1].token_ids == free[1].token_ids[: len(results[1].token_ids)]
    assert len(results[1].token_ids) < N_NEW or cut + len(stop) <= len(free[1].text)
    if stop not in free[0].text:
        assert results[0].text == free[0].text and results[0].finish_reason == free[0].finish_reason


@pytest.mark.parametrize("arch", ["llava", "idefics3"])
def test_stream_joins_to_generate(backends, arch):
    backend = backends(arch)
    conv = two_conversations()[1]
    for stop in ([], [_ascii_stop(backend.generate([conv], SamplingParams(max_new_tokens=N_NEW))[0].text)]):
        params = SamplingParams(max_new_tokens=N_NEW, stop=stop)
        [expected] = backend.generate([conv], params)
        handle = backend.submit(conv, params)
        deltas = list(handle)
        result = handle.result()
        assert all(deltas) and len(deltas) > 1
        assert "".join(backend.stream(conv, params)) == expected.text
        assert "".join(deltas) == expected.text
        assert result.text == expected.text and result.finish_reason == expected.finish_reason
        assert result.token_ids == expected.token_ids


def test_images_go_through_load_image(backends, tmp_path):
    """Paths and data: URLs reach the model as the same pixels as a PIL image."""
    backend = backends("llava")
    image = noise_image(36, 36, 9)
    path = tmp_path / "x.png"
    image.save(path)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def conv(src, kind="image"):
        part = {"type": "image", "image": src} if kind == "image" else {"type": "image_url", "image_url": {"url": src}}
        return [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}]

    out = backend.generate([conv(image), conv(str(path)), conv(url, "image_url")], SamplingParams(max_new_tokens=6))
    assert out[0].token_ids == out[1].token_ids == out[2].token_ids


# ---------------------------------------------------------------------------------------- loading


def test_name_and_folder_detection(folders, backends, tmp_path):
    folder = folders("qwen2_vl")
    assert backends("qwen2_vl").name == str(folder)
    assert all(is_hf_vlm_folder(folders(a)) for a in ["llava", "smolvlm"])
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text(json.dumps(TEXT_ONLY_CONFIG))
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "config.json").write_text(json.dumps({"model_type": "visprompt", "image_size": 224}))
    (tmp_path / "empty").mkdir()
    assert not is_hf_vlm_folder(tmp_path / "llm")
    assert not is_hf_vlm_folder(tmp_path / "own")
    assert not is_hf_vlm_folder(tmp_path / "empty")
    assert not is_hf_vlm_folder(tmp_path / "missing")


def test_processors_fall_back_without_torchvision(backends):
    """SmolVLM and Qwen2-VL name processors that want a torchvision video processor."""
    smol = backends("smolvlm").processor
    assert type(smol).__name__ == "Idefics3Processor"
    assert type(smol.image_processor).__name__.endswith("Pil")
    qwen = backends("qwen2_vl").processor
    assert type(qwen).__name__ == "Qwen2VLProcessor"
    assert backends("qwen2_vl").eos_ids == sorted(qwen.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))


def test_not_a_vlm_folder_is_a_clear_error(tmp_path):
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text(json.dumps(TEXT_ONLY_CONFIG))
    with pytest.raises(VispromptError, match="not an image-text-to-text model .*LlamaForCausalLM"):
        HFVLMBackend.from_pretrained(tmp_path / "llm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VispromptError, match="no readable config.json"):
        HFVLMBackend.from_pretrained(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        HFVLMBackend.from_pretrained(str(tmp_path / "nope"))


def test_missing_hub_model_is_one_line(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        HFVLMBackend.from_pretrained("visprompt-test/no-such-model", cache_dir=tmp_path)
    message = str(info.value)
    assert message == (
        "model 'visprompt-test/no-such-model' is not in the local cache and the hub cannot be "
        "reached; run `visprompt pull visprompt-test/no-such-model` on a connected machine, "
        "or pass a local folder"
    )
    assert info.value.__suppress_context__ and info.value.__cause__ is None  # no chained traceback


def test_cached_hub_id_loads(folders, tmp_path):
    """A hub id resolves to its snapshot in the Hugging Face cache, without the network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--tiny-org--tiny-llava"
    shutil.copytree(folders("llava"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    backend = HFVLMBackend.from_pretrained("tiny-org/tiny-llava", cache_dir=tmp_path)
    assert backend.name == "tiny-org/tiny-llava"
    [res] = backend.generate([two_conversations()[0]], SamplingParams(max_new_tokens=4))
    assert res.completion_tokens == 4


def test_folder_without_processor_is_a_clear_error(folders, tmp_path):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(folders("llava") / name, folder / name)
    with pytest.raises(VispromptError, match="cannot load the processor") as info:
        HFVLMBackend.from_pretrained(folder)
    assert "\n" not in str(info.value)


def test_a_broken_folder_is_one_line_naming_it(folders, tmp_path):
    from visprompt.engine.loading import load_backend
    from visprompt.errors import ConfigError, ModelLoadError

    weights = (folders("llava") / "model.safetensors").read_bytes()
    cases = [
        ("model.safetensors", weights[: len(weights) // 2], ModelLoadError, "cannot load the model in"),
        ("model.safetensors", weights[:-64], ModelLoadError, "cannot load the model in"),
        ("config.json", b"[1, 2]", ConfigError, "config.json is not a model config: a JSON list"),
        ("config.json", b"{oops", ConfigError, "config.json is not valid JSON"),
    ]
    for i, (name, data, error, expected) in enumerate(cases):
        folder = tmp_path / str(i)
        shutil.copytree(folders("llava"), folder)
        (folder / name).write_bytes(data)
        with pytest.raises(error) as info:
            load_backend(str(folder))
        message = str(info.value)
        assert expected in message and str(folder) in message and "\n" not in message, message


def test_loading_and_asking_through_the_python_api_print_nothing(folders, capfd):
    from transformers.utils import logging as hf_logging

    import visprompt

    folder = folders("smolvlm")
    bars = hf_logging.is_progress_bar_enabled()
    capfd.readouterr()
    model = visprompt.load(str(folder), max_new_tokens=3)
    model.ask(noise_image(40, 30, 1), "What is in this image?")
    assert capfd.readouterr() == ("", "")  # no "Loading weights" bar, no warning
    assert hf_logging.is_progress_bar_enabled() == bars  # the caller's setting is left as it was


def test_image_processor_falls_back_to_pil_class(folders, monkeypatch):
    """When AutoImageProcessor cannot build the configured (torchvision) class, its Pil twin is used."""
    import transformers

    from visprompt.engine.backends import hf_vlm

    def refuse(*args, **kwargs):
        raise ImportError("this image processor needs torchvision")

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", refuse)
    ip = hf_vlm._pil_image_processor(folders("smolvlm"))
    assert type(ip).__name__ == "SmolVLMImageProcessorPil"
    assert ip.max_image_size == {"longest_edge": 32} and ip.size == {"longest_edge": 64}
