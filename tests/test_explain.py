"""`visprompt explain`: where the model looked, per answer token, for every fusion and HF VLMs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXTS, spread_weights, tiny_config
from PIL import Image

from visprompt.cli.main import main
from visprompt.engine.backends.own import OwnVLMBackend
from visprompt.errors import VispromptError
from visprompt.eval.attention import explain, tiles_to_grid
from visprompt.models.vision_language_model import VisionLanguageModel
from visprompt.tasks.assistant import Assistant

FUSIONS = {
    "prefix": {},
    "cross_attention": {"fusion": "cross_attention", "xattn_gate_init": 0.5},
    "mixture": {"fusion": "mixture"},
}
IMAGE = Image.new("RGB", (40, 30), "red")


def own_backend(key: str, **overrides) -> OwnVLMBackend:
    torch.manual_seed(0)
    model = VisionLanguageModel.build(tiny_config(**FUSIONS[key], **overrides), TEXTS)
    return OwnVLMBackend(spread_weights(model).eval())


@pytest.mark.parametrize("key", list(FUSIONS))
def test_each_answer_token_gets_a_map_on_the_image_grid_and_the_answer_is_asks(key):
    backend = own_backend(key)
    found = explain(backend, IMAGE, "What color is the circle?", max_new_tokens=5)
    assert found.answer == Assistant(backend).ask(IMAGE, "What color is the circle?", max_new_tokens=5)
    assert found.grid == (4, 4)  # 32 px, 8 px patches
    assert len(found.maps) == len(found.tokens) == len(found.image_mass) >= 1
    for grid_map, mass in zip(found.maps, found.image_mass):
        assert grid_map.shape == (4, 4) and (grid_map >= 0).all()
        assert grid_map.sum() == pytest.approx(mass, abs=1e-5)
        # cross-attention rows are a distribution over the image; self-attention shares it with text
        assert mass == pytest.approx(1.0, abs=1e-5) if key == "cross_attention" else 0 < mass < 1
    assert len(found.balance) == 2 and all(0 <= b <= 1 for b in found.balance)


def test_mixture_with_one_image_explains_exactly_as_prefix_fusion():
    mixture = own_backend("mixture")
    prefix = own_backend("prefix")
    weights = {k: v for k, v in mixture.model.state_dict().items() if not k.startswith("fusion.")}
    prefix.model.load_state_dict(weights)  # the same weights, without the mixture's scorer
    a = explain(prefix, IMAGE, "Where is the square?", max_new_tokens=3)
    b = explain(mixture, IMAGE, "Where is the square?", max_new_tokens=3)
    assert a.answer == b.answer and a.tokens == b.tokens and a.balance == b.balance
    for x, y in zip(a.maps, b.maps):
        np.testing.assert_array_equal(x, y)


def test_rollout_of_a_one_layer_model_is_half_the_head_mean_on_the_image():
    """Rollout per layer is 0.5 A + 0.5 I (rows already sum to 1): with one layer, on image tokens
    (never the query itself), exactly half the mean map."""
    backend = own_backend("prefix", lm_layers=1)
    mean = explain(backend, IMAGE, "What color is the circle?", max_new_tokens=3)
    rollout = explain(backend, IMAGE, "What color is the circle?", method="rollout", max_new_tokens=3)
    assert rollout.answer == mean.answer
    for a, b in zip(mean.maps, rollout.maps):
        np.testing.assert_allclose(b, 0.5 * a, atol=1e-6)


def test_pixel_shuffled_image_tokens_map_onto_the_merged_grid():
    backend = own_backend("prefix", connector_pixel_shuffle=2)
    assert explain(backend, IMAGE, "What color is the circle?", max_new_tokens=2).grid == (2, 2)


def test_a_chosen_word_is_explained_alone_and_words_it_cannot_explain_are_one_line_errors():
    backend = own_backend("prefix")
    # the image comes first in this model's prompts: a question word after it sees it
    found = explain(backend, IMAGE, "What color is the circle?", token="circle")
    assert found.tokens == ["circle"] and found.maps[0].shape == (4, 4)
    with pytest.raises(VispromptError, match="is not a token of the answer"):
        explain(backend, IMAGE, "What color is the circle?", token="giraffe")
    backend.model.cfg.image_after_text = True  # now the question comes before the image
    with pytest.raises(VispromptError, match="comes before the image"):
        explain(backend, IMAGE, "What color is the circle?", token="circle")
    with pytest.raises(VispromptError, match="rollout needs image tokens"):
        explain(own_backend("cross_attention"), IMAGE, "What color is the circle?", method="rollout")


def test_a_resampler_and_the_starter_are_refused_in_one_line():
    from hf_tiny import make_tiny_starter

    backend = own_backend("cross_attention", resampler_latents=4)
    with pytest.raises(VispromptError, match="resampler"):
        explain(backend, IMAGE, "What color is the circle?")
    with pytest.raises(VispromptError, match="no attention over image tokens"):
        explain(make_tiny_starter(), IMAGE, "What color is the circle?")


@pytest.mark.parametrize(
    ("writer", "grid", "seen"), [("write_llava", (4, 4), (30, 30)), ("write_llava_next", (4, 6), (40, 30))]
)
def test_hf_llava_style_models_map_their_image_tokens_and_keep_their_attention(writer, grid, seen, tmp_path):
    import hf_tiny

    from visprompt.engine.backends.hf_vlm import HFVLMBackend

    backend = HFVLMBackend.from_pretrained(str(getattr(hf_tiny, writer)(tmp_path / "m")))
    before = backend.model.config._attn_implementation
    found = explain(backend, IMAGE, "What is in this image?", max_new_tokens=3)
    assert found.answer == Assistant(backend).ask(IMAGE, "What is in this image?", max_new_tokens=3)
    assert found.grid == grid  # LLaVA-NeXT: the tiles, unpadded to the 4:3 image
    assert found.image.size == seen  # LLaVA sees the centre square; NeXT's tiles cover the whole image
    assert all(m.shape == grid and 0 < m.sum() < 1 for m in found.maps)
    assert len(found.balance) == 2
    assert backend.model.config._attn_implementation == before


def test_qwen2_vl_maps_its_merged_patch_grid(tmp_path):
    import hf_tiny

    from visprompt.engine.backends.hf_vlm import HFVLMBackend

    backend = HFVLMBackend.from_pretrained(str(hf_tiny.write_qwen2_vl(tmp_path / "m")))
    found = explain(backend, Image.new("RGB", (84, 56), "blue"), "What is in this image?", max_new_tokens=2)
    assert found.grid == (2, 3)  # 56 x 84 px: 4 x 6 patches of 14 px, merged 2 x 2
    assert all(m.shape == (2, 3) and 0 < m.sum() < 1 for m in found.maps)


def spike(n: int, at: int) -> torch.Tensor:
    vec = torch.zeros(n)
    vec[at] = 1.0
    return vec


def test_a_tile_tokens_attention_lands_in_its_tile_and_a_global_tokens_spreads_over_its_cells():
    # 2 x 2 tiles of 2 x 2 tokens, then the global image's 2 x 2: 20 tokens onto a 4 x 4 grid
    assert tiles_to_grid(torch.arange(20.0), 2, 2, 2).shape == (4, 4)
    bottom_left = tiles_to_grid(spike(20, 2 * 4 + 1), 2, 2, 2)  # tile (row 2, col 1), its token (0, 1)
    expected = np.zeros((4, 4), dtype=np.float32)
    expected[2, 1] = 1.0
    np.testing.assert_array_equal(bottom_left.numpy(), expected)
    # the global image's token (0, 1) covers the top right quarter: its mass spread over 2 x 2 cells
    expected = np.zeros((4, 4), dtype=np.float32)
    expected[0:2, 2:4] = 0.25
    np.testing.assert_array_equal(tiles_to_grid(spike(20, 16 + 1), 2, 2, 2).numpy(), expected)
    # a wide split (1 x 3 tiles): rows and columns keep their orientation, the total is kept
    wide = tiles_to_grid(spike(16, 2 * 4 + 3), 1, 3, 2)  # third tile, its token (1, 1)
    assert wide.shape == (2, 6) and wide[1, 5] == 1.0 and wide.sum() == 1.0
    spread = tiles_to_grid(spike(16, 12 + 2), 1, 3, 2)  # global token (1, 0): the bottom left 1 x 3 cells
    np.testing.assert_allclose(spread[1, 0:3].numpy(), [1 / 3] * 3)
    assert spread.sum() == pytest.approx(1.0)
    # no split: the global image alone, on its own grid
    np.testing.assert_array_equal(tiles_to_grid(torch.arange(4.0), 0, 0, 2).numpy(), [[0, 1], [2, 3]])
    with pytest.raises(VispromptError, match="cannot map 19 image tokens"):
        tiles_to_grid(torch.zeros(19), 2, 2, 2)


def test_idefics3_pixel_shuffle_keeps_the_patch_grid_row_major(tmp_path):
    """The layout `tiles_to_grid` assumes: after transformers' pixel shuffle, token t of a tile holds
    the scale x scale patches of block (t // side, t % side), and the processor writes a tile's tokens
    right after its <row_r_col_c> tag, tiles row by row."""
    import hf_tiny

    from visprompt.engine.backends.hf_vlm import HFVLMBackend
    from visprompt.models.chat import user_turn

    backend = HFVLMBackend.from_pretrained(str(hf_tiny.write_idefics3(tmp_path / "m")))
    patches = torch.arange(16.0).reshape(1, 16, 1)  # a 4 x 4 patch grid, each patch its own index
    shuffled = backend.model.model.connector.pixel_shuffle(patches, 2)[0]  # [4 tokens, 4 patches]
    for t, held in enumerate(shuffled.tolist()):
        assert {(int(p) // 4 // 2, int(p) % 4 // 2) for p in held} == {divmod(t, 2)}
    ids = backend.prompts([[user_turn([IMAGE], "What is in this image?")]])[0].ids
    image_pos = [i for i, t in enumerate(ids) if t == backend.image_token_id]
    tag = backend.tokenizer.convert_tokens_to_ids("<row_2_col_1>")
    first = image_pos.index(ids.index(tag) + 1)  # the bottom left tile's first token
    assert first == 2 * 4 and len(image_pos) == 5 * 4
    assert tiles_to_grid(spike(20, first), 2, 2, 2)[2:4, 0:2].sum() == 1.0


@pytest.mark.parametrize("writer", ["write_idefics3", "write_smolvlm"])
def test_idefics3_and_smolvlm_split_images_map_onto_the_full_image_grid_and_draw(writer, tmp_path):
    import hf_tiny

    from visprompt.engine.backends.hf_vlm import HFVLMBackend
    from visprompt.eval.heatmap import draw_heatmaps

    backend = HFVLMBackend.from_pretrained(str(getattr(hf_tiny, writer)(tmp_path / "m")))
    found = explain(backend, IMAGE, "What is in this image?", max_new_tokens=3)
    assert found.answer == Assistant(backend).ask(IMAGE, "What is in this image?", max_new_tokens=3)
    # 40 x 30 px -> 64 x 64 -> 2 x 2 tiles of 32 px, 2 x 2 tokens each (+ the global image's 2 x 2)
    assert found.grid == (4, 4) and found.image.size == (40, 30)
    for grid_map, mass in zip(found.maps, found.image_mass):
        assert grid_map.shape == (4, 4) and (grid_map >= 0).all() and 0 < mass < 1
        assert grid_map.sum() == pytest.approx(mass, abs=1e-5)  # the global image's mass is spread, not lost
    wide = explain(backend, Image.new("RGB", (64, 32), "blue"), "What is in this image?", max_new_tokens=2)
    assert wide.grid == (2, 4)  # 1 x 2 tiles
    backend.processor.image_processor.do_image_splitting = False  # (another image: features are cached by image)
    whole = explain(backend, Image.new("RGB", (40, 30), "green"), "What is in this image?", max_new_tokens=2)
    assert whole.grid == (2, 2) and all(m.shape == (2, 2) for m in whole.maps)  # the global image alone
    draw_heatmaps(found, tmp_path / "heat.png")
    with Image.open(tmp_path / "heat.png") as png:
        assert png.format == "PNG" and png.width > 200


def test_a_word_after_the_cross_attention_placeholder_reads_the_image():
    backend = own_backend("cross_attention")  # image first
    found = explain(backend, IMAGE, "What color is the circle?", token="circle")
    assert found.tokens == ["circle"] and found.image_mass == [pytest.approx(1.0)]
    backend.model.cfg.image_after_text = True
    with pytest.raises(VispromptError, match="comes before the image"):
        explain(backend, IMAGE, "What color is the circle?", token="circle")


def test_the_command_writes_the_heatmap_and_the_balance_and_refuses_in_one_line(tmp_path, capsys):
    folder = tmp_path / "model"
    own_backend("prefix").model.save_pretrained(folder)
    IMAGE.save(tmp_path / "red.png")
    args = ["explain", str(tmp_path / "red.png"), "What color is the circle?", "--model", str(folder)]
    out, balance = tmp_path / "heat.png", tmp_path / "balance.png"
    assert main([*args, "--output", str(out), "--balance", str(balance), "--max-new-tokens", "3"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer == Assistant.load(str(folder)).ask(
        str(tmp_path / "red.png"), "What color is the circle?", max_new_tokens=3
    )
    for path in (out, balance):
        with Image.open(path) as png:
            assert png.format == "PNG" and png.width > 200
    assert main([*args, "--output", str(out), "--token", "giraffe"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# --- a trained model: does the answer read the right cell? ------------------------------------------


@pytest.fixture(scope="session")
def color_model(tmp_path_factory):
    """recipes/shapes-color.yaml trained on its data (4,000 colour questions): its folder and data."""
    from visprompt.data.shapes import generate_shapes_dataset
    from visprompt.train.config import load_recipe
    from visprompt.train.trainer import Trainer

    root = tmp_path_factory.mktemp("shapes-color")
    generate_shapes_dataset(
        root / "data", n_train=4000, n_test=200, seed=0, image_size=96, questions_per_image=1, kinds=["color"]
    )
    sets = [f"train_data={root / 'data/train.json'}", f"output_dir={root / 'run'}"]
    Trainer(load_recipe(Path(__file__).parents[1] / "recipes/shapes-color.yaml", sets)).train()
    return root


def one_triangle_scenes(data, n: int):
    """The first `n` held-out scenes with exactly one triangle: (image path, its (row, col))."""
    import json

    out = []
    for record in json.loads((data / "test.json").read_text()):
        triangles = [o for o in record["scene"]["objects"] if o["shape"] == "triangle"]
        if len(triangles) == 1:
            out.append((data / record["image"], (triangles[0]["row"], triangles[0]["col"])))
    return out[:n]


@pytest.mark.slow
def test_the_colour_answer_looks_at_the_triangles_cell(color_model):
    """ "What color is the triangle?": the colour token's map (mean over heads and layers) has its
    largest cell on the triangle's scene cell in at least 80% of 50 held-out scenes."""
    assistant = Assistant.load(str(color_model / "run"))
    scenes = one_triangle_scenes(color_model / "data", 50)
    assert len(scenes) == 50
    hits = 0
    for image, cell in scenes:
        found = explain(assistant.backend, image, "What color is the triangle?", max_new_tokens=2)
        assert found.grid == (3, 3)
        grid_map = found.maps[0]  # the colour: the first answer token
        hits += np.unravel_index(grid_map.argmax(), grid_map.shape) == cell
    print(f"triangle's cell is the argmax in {hits} of {len(scenes)} scenes")
    assert hits >= 40, f"the triangle's cell is the argmax in only {hits} of {len(scenes)} scenes"


def test_a_perceiver_resamplers_latents_are_refused_not_drawn_as_a_grid():
    from types import SimpleNamespace

    from visprompt.eval.attention import _hf_grid

    idefics2 = SimpleNamespace(config=SimpleNamespace(model_type="idefics2", perceiver_config=SimpleNamespace()))
    with pytest.raises(VispromptError, match="perceiver resampler's latents"):
        _hf_grid(idefics2, {}, 64)  # 64 latents would otherwise pass as an 8 x 8 grid
    llava = SimpleNamespace(config=SimpleNamespace(model_type="llava"))
    assert _hf_grid(llava, {}, 64)[0] == (8, 8)
