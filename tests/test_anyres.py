"""Large images tiled as LLaVA-NeXT's AnyRes does: grid choice, tiles, token layout, training and
generation with images of different aspect ratios."""

import json

import pytest
import torch
from conftest import TEXTS, spread_weights, tiny_config
from PIL import Image

from visprompt.engine.backend import SamplingParams
from visprompt.engine.backends.own import OwnVLMBackend
from visprompt.errors import ConfigError
from visprompt.images.tiling import TileGrid, grid_pinpoints, select_grid, tile_pixels
from visprompt.models.config import VLMConfig
from visprompt.models.image_inputs import image_layout, image_preprocessor, max_image_tokens, prepare_images
from visprompt.models.vision_language_model import VisionLanguageModel

WIDE = (160, 40)  # (width, height)
TALL = (40, 160)


def anyres_model(max_tiles=4, seed=0):
    torch.manual_seed(seed)
    model = VisionLanguageModel.build(tiny_config(image_tiling="anyres", max_tiles=max_tiles), TEXTS)
    return spread_weights(model, seed=seed).eval()


def halves(size, left="red", right="blue"):
    """An image whose left half is one colour and right half another."""
    img = Image.new("RGB", size, left)
    img.paste(Image.new("RGB", (size[0] - size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return img


def test_grids_follow_llava_next_select_best_resolution():
    # LLaVA-NeXT's own pinpoints for a 336 px encoder are the 2-, 3- and 4-tile grids of max_tiles=4
    llava_next = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    assert set(llava_next) <= set(grid_pinpoints(4, (336, 336)))
    # (width, height) -> (rows, cols): most effective pixels, then least padding
    expected = {
        (1000, 300): (1, 3),
        (300, 1000): (3, 1),
        (800, 700): (2, 2),
        (600, 300): (1, 2),
        (700, 400): (2, 2),
        (200, 150): (1, 1),
    }
    for size, grid in expected.items():
        assert select_grid(size, 4, (336, 336)) == TileGrid(*grid), size
    assert select_grid((3000, 200), 4, (336, 336)) == TileGrid(1, 4)
    assert select_grid((3000, 200), 2, (336, 336)) == TileGrid(1, 2)  # max_tiles bounds the grid


def test_wide_and_tall_images_get_different_grids_and_token_counts_within_the_budget():
    cfg = anyres_model().cfg
    n = cfg.tokens_per_image  # per view: (32 / 8) ** 2
    wide, tall = image_layout(cfg, WIDE), image_layout(cfg, TALL)
    assert (wide.grid, tall.grid) == (TileGrid(1, 4), TileGrid(4, 1))
    assert (wide.n_tokens, tall.n_tokens) == (5 * n + 1, 5 * n + 4)  # views + one separator per row
    assert max(wide.n_tokens, tall.n_tokens) <= max_image_tokens(cfg) == 5 * n + 4
    small = image_layout(cfg, (30, 20))  # fits one tile: a 1 x 1 grid, no waste
    assert small.grid == TileGrid(1, 1) and small.n_tokens == 2 * n + 1
    pixels, layouts = prepare_images([Image.new("RGB", WIDE), Image.new("RGB", TALL)], cfg)
    assert pixels.shape == (10, 3, 32, 32) and layouts == [wide, tall]


def test_tiles_are_the_image_cut_in_row_major_order_after_its_global_view():
    pre = image_preprocessor(anyres_model().cfg)
    views = tile_pixels(halves((64, 32)), TileGrid(1, 2), pre)  # [global, left tile, right tile]
    red_minus_blue = (views[:, 0] - views[:, 2]).mean(dim=(1, 2))  # per view
    assert red_minus_blue[1] > 1.5 and red_minus_blue[2] < -1.5  # left tile red, right tile blue
    assert abs(float(red_minus_blue[0])) < 0.3  # the global view holds both halves
    # a 2 x 1 grid of a tall image: top tile first
    tall = halves((64, 32)).rotate(-90, expand=True)  # turned clockwise: red on top
    top, bottom = tile_pixels(tall, TileGrid(2, 1), pre)[1:]
    assert (top[0] - top[2]).mean() > 1.5 and (bottom[0] - bottom[2]).mean() < -1.5


def test_each_image_fills_its_own_number_of_placeholders_with_separators_after_each_row():
    model = anyres_model()
    pixels, layouts = prepare_images([Image.new("RGB", WIDE, "red"), Image.new("RGB", TALL, "blue")], model.cfg)
    with torch.no_grad():
        embeds = model.encode_images(pixels, layouts)
    assert [e.shape[0] for e in embeds] == [lay.n_tokens for lay in layouts]
    n, sep = model.cfg.tokens_per_image, model.connector.tile_separator
    # tall (4 x 1): after the global view, each tile's n tokens are followed by the separator
    for row in range(4):
        torch.testing.assert_close(embeds[1][n + row * (n + 1) + n], sep)
    ids = model.expand_image_placeholders([5, model.cfg.image_token_id, 6, model.cfg.image_token_id], [3, 2])
    assert ids == [5, *[model.cfg.image_token_id] * 3, 6, *[model.cfg.image_token_id] * 2]


def write_aspect_dataset(folder) -> str:
    """Records with wide, tall and square images, each with a question about its colour."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i, (size, colour) in enumerate([(WIDE, "red"), (TALL, "blue"), ((48, 48), "green"), ((96, 40), "blue")]):
        Image.new("RGB", size, colour).save(folder / "img" / f"{i}.png")
        question = {"from": "human", "value": "<image>\nWhat color is it?"}
        records.append(
            {"id": str(i), "image": f"img/{i}.png", "conversations": [question, {"from": "gpt", "value": colour}]}
        )
    (folder / "d.json").write_text(json.dumps(records))
    return str(folder / "d.json")


def train_tiny_anyres(tmp, steps: int, vision_lr: float) -> dict:
    """Train a tiny anyres model with the trainer on images of three aspect ratios into tmp / "run"."""
    from visprompt.train.config import load_recipe
    from visprompt.train.trainer import Trainer

    data = write_aspect_dataset(tmp)
    model = {k: v for k, v in tiny_config(image_tiling="anyres", max_tiles=4).to_dict().items() if k != "built"}
    model["image_mean"], model["image_std"] = list(model["image_mean"]), list(model["image_std"])
    train = dict(train_data=data, output_dir=str(tmp / "run"), max_steps=steps, batch_size=2, log_every=1)
    train.update(dtype="float32", vision_lr=vision_lr, connector_lr=3e-3, lm_lr=3e-3)
    (tmp / "recipe.json").write_text(json.dumps({"model": model, "train": train}))
    return Trainer(load_recipe(str(tmp / "recipe.json"))).train()


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    """A tiny anyres model trained a few steps, its encoder too (images loaded and tiled per step)."""
    tmp = tmp_path_factory.mktemp("anyres")
    assert train_tiny_anyres(tmp, steps=3, vision_lr=3e-3)["steps"] == 3
    return tmp / "run"


def test_a_frozen_encoder_runs_once_over_every_view_of_the_tiled_images(tmp_path, capsys):
    assert train_tiny_anyres(tmp_path, steps=2, vision_lr=0.0)["steps"] == 2
    assert "frozen encoder run once over 4 images" in capsys.readouterr().err


def test_a_tiled_model_trains_and_its_config_round_trips(trained_folder):
    loaded = VisionLanguageModel.from_pretrained(trained_folder)
    assert (loaded.cfg.image_tiling, loaded.cfg.max_tiles) == ("anyres", 4)
    assert VLMConfig.load(trained_folder) == loaded.cfg
    from visprompt.export.checks import llava_unsupported_reason

    assert llava_unsupported_reason(loaded).startswith("image_tiling 'anyres'")  # export refuses in one line
    sep = loaded.connector.tile_separator
    assert sep is not None and sep.shape == (loaded.cfg.built.lm_config["hidden_size"],)
    losses = [json.loads(line)["loss"] for line in (trained_folder / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]  # it learns from the tiled images


def conversations():
    """One batch with wide, tall and square images, a two-image prompt and a text-only one."""
    wide, tall, square = (Image.new("RGB", s, c) for s, c in [(WIDE, "red"), (TALL, "blue"), ((48, 48), "green")])

    def ask(images, question):
        return [
            {
                "role": "user",
                "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": question}],
            }
        ]

    return [
        ask([wide], "What color is it?"),
        ask([tall], "What color is it? Describe it."),
        ask([square, wide], "Which is red?"),
        [{"role": "user", "content": "What is a circle?"}],
        ask([tall], "What color is it?"),
    ]


def test_fast_batched_generation_equals_the_reference_with_mixed_aspect_ratios(trained_folder):
    model = spread_weights(VisionLanguageModel.from_pretrained(trained_folder), seed=1)  # varied tokens
    backend = OwnVLMBackend(model)
    assert backend.fast_path_reason() is None
    params = SamplingParams(max_new_tokens=10)
    convs = conversations()
    fast = backend.generate(convs, params)
    reference = OwnVLMBackend(model, fast=False)
    single = [reference.generate([c], params)[0] for c in convs]
    uncached = reference.generate(convs, params, use_cache=False)
    for other in (single, uncached):
        assert [r.token_ids for r in fast] == [r.token_ids for r in other]
        assert [r.prompt_tokens for r in fast] == [r.prompt_tokens for r in other]
    assert sum(len(set(r.token_ids)) > 2 for r in fast) >= 3  # not constant streams
    # the tall image's 4 rows take 3 more tokens than the wide image's one row
    assert fast[4].prompt_tokens - fast[0].prompt_tokens == 3
    # the same tall image asked again: its tokens come from the prefix cache, keyed per image
    hits = backend.prefix_cache.stats()["hits"]
    again = backend.generate([convs[4]], params)[0]
    assert again.token_ids == fast[4].token_ids and backend.prefix_cache.stats()["hits"] == hits + 1


def test_an_untiled_model_is_unchanged_and_tiling_needs_prefix_fusion():
    torch.manual_seed(0)
    model = VisionLanguageModel.build(tiny_config(), TEXTS)
    assert model.cfg.image_tiling == "none" and model.connector.tile_separator is None
    assert not any("tile_separator" in k for k in model.state_dict())
    images = [Image.new("RGB", WIDE, "red"), Image.new("RGB", TALL, "blue")]
    pixels, layouts = prepare_images(images, model.cfg)
    torch.testing.assert_close(pixels, image_preprocessor(model.cfg)(images))
    assert [lay.n_tokens for lay in layouts] == [model.cfg.tokens_per_image] * 2
    # a config saved without the tiling fields loads untiled
    old = model.cfg.to_dict()
    del old["image_tiling"], old["max_tiles"]
    assert VLMConfig.from_dict(old).image_tiling == "none"
    with pytest.raises(ConfigError, match="image_tiling 'anyres' needs fusion 'prefix'"):
        tiny_config(image_tiling="anyres", fusion="cross_attention")
    with pytest.raises(ConfigError, match="image_tiling must be one of none, anyres"):
        tiny_config(image_tiling="tiles")


def test_training_examples_count_each_images_tokens_as_it_will_be_loaded_and_store_every_view(tmp_path):
    """The dataset expands placeholders from the image header; an EXIF-turned photo counts as turned."""
    from visprompt.data.llava import load_llava_records
    from visprompt.train.dataset import VLMDataset, collate

    model = anyres_model()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored wide, shown turned a quarter: tall
    Image.new("RGB", WIDE, "red").save(tmp_path / "turned.jpg", exif=exif)
    Image.new("RGB", WIDE, "blue").save(tmp_path / "wide.png")
    question = {"from": "human", "value": "<image>\nWhat color is it?"}
    records = [
        {"id": name, "image": name, "conversations": [question, {"from": "gpt", "value": "red"}]}
        for name in ("turned.jpg", "wide.png")
    ]
    (tmp_path / "d.json").write_text(json.dumps(records))
    dataset = VLMDataset(load_llava_records(tmp_path / "d.json"), model, 256, image_preprocessor(model.cfg))
    image_id = model.cfg.image_token_id
    counts = [ex.input_ids.count(image_id) for ex in dataset.examples]
    batch = collate([dataset[0], dataset[1]], model.tokenizer.pad_token_id)
    assert [lay.grid for lay in batch["image_layouts"]] == [TileGrid(4, 1), TileGrid(1, 4)]
    assert counts == [lay.n_tokens for lay in batch["image_layouts"]]
    assert batch["pixel_values"].shape == (10, 3, 32, 32)
    with torch.no_grad():  # every placeholder filled, none left over
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_layouts")})
    assert out.logits.shape[:2] == batch["input_ids"].shape
    # a frozen encoder's outputs, stored once per image (every view), give the same logits
    dataset.store_vision_features(model.vision)
    stored = collate([dataset[0], dataset[1]], model.tokenizer.pad_token_id)
    assert stored["pixel_values"] is None and stored["image_layouts"] == batch["image_layouts"]
    with torch.no_grad():
        again = model(
            stored["input_ids"],
            attention_mask=stored["attention_mask"],
            vision_features=stored["vision_features"],
            image_layouts=stored["image_layouts"],
        )
    torch.testing.assert_close(again.logits, out.logits)


def test_prefix_cache_keys_follow_each_images_own_length():
    from visprompt.runtime.caches import token_keys

    img = 9
    ids = [1, img, img, img, 2, img, img, 3]
    keys = token_keys(ids, img, ["a", "b"], [3, 2])
    assert keys == (1, ("a", 0), ("a", 1), ("a", 2), 2, ("b", 0), ("b", 1), 3)
    # adjacent images of different lengths are still told apart
    assert token_keys([img] * 5, img, ["a", "b"], [2, 3])[2] == ("b", 0)
    assert token_keys([1, img, img, img, img], img, ["a", "b"]) == (1, ("a", 0), ("a", 1), ("b", 0), ("b", 1))
