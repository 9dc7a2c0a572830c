"""Training: recipes and overrides, loss on answers only, freezing per part, evaluation, checkpoints
and resume, and a trainer that reads any LLaVA dataset."""

import json

import pytest
import torch
import yaml
from PIL import Image

from visprompt.data.llava import LlavaRecord
from visprompt.errors import ConfigError
from visprompt.models.vision_language_model import VisionLanguageModel
from visprompt.train.config import load_recipe
from visprompt.train.trainer import Trainer, warmup_cosine

TINY_MODEL = dict(
    vision_type="resnet",
    vision_hidden_size=32,
    vision_layers=2,
    image_size=32,
    lm_hidden_size=48,
    lm_layers=2,
    lm_heads=2,
    lm_kv_heads=2,
    lm_max_position=256,
    tokenizer_vocab_size=400,
)


def write_recipe(tmp_path, data_dir, **train):
    recipe = {
        "model": TINY_MODEL,
        "train": {
            "train_data": str(data_dir / "train.json"),
            "eval_data": str(data_dir / "test.json"),
            "output_dir": str(tmp_path / "run"),
            "batch_size": 8,
            "max_steps": 6,
            "log_every": 2,
            "vision_lr": 3e-3,
            "connector_lr": 3e-3,
            "lm_lr": 3e-3,
            "eval_max_records": 4,
            "dtype": "float32",  # the same arithmetic on every CPU (auto picks bf16 where it has bf16 units)
            **train,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_overrides_parse_types_and_reject_unknown_keys(tmp_path, shapes_dir):
    path = write_recipe(tmp_path, shapes_dir)
    r = load_recipe(path, ["train.lm_lr=0", "model.lm_layers=3", "batch_size=4", "augment=true"])
    assert r.train.lm_lr == 0.0 and r.model.lm_layers == 3 and r.train.batch_size == 4 and r.train.augment is True
    for bad in (["train.nope=1"], ["batch_size=many"], ["justakey"], ["model.fusion=telepathy"]):
        with pytest.raises(ConfigError):
            load_recipe(path, bad)


def recipe_file(tmp_path, data) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def config_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_recipe_values_of_the_wrong_type_or_range_name_their_key(tmp_path):
    cases = [
        ({"model": {"lm_layers": "abc"}}, "model.lm_layers: expected an int, got 'abc'"),
        ({"model": {"image_size": [1, 2]}}, "model.image_size: expected an int, got [1, 2]"),
        ({"model": {"image_mean": "grey"}}, "model.image_mean: expected a list of numbers, got 'grey'"),
        ({"model": {"lm_tie_embeddings": "maybe"}}, "model.lm_tie_embeddings: expected true or false, got 'maybe'"),
        ({"train": {"lm_lr": "fast"}}, "train.lm_lr: expected a number, got 'fast'"),
        ({"train": {"batch_size": 0}}, "train.batch_size must be >= 1, got 0"),
        ({"train": {"grad_accum": 0}}, "train.grad_accum must be >= 1, got 0"),
        ({"train": {"max_length": 0}}, "train.max_length must be >= 1, got 0"),
        ({"train": {"max_steps": -5}}, "train.max_steps must be >= 0, got -5"),
        ({"train": {"lm_lr": -1e-3}}, "train.lm_lr must be >= 0, got -0.001"),
        ({"train": {"warmup_ratio": 1.5}}, "train.warmup_ratio must be between 0 and 1, got 1.5"),
        ({"train": {"dtype": "float8"}}, "train.dtype must be one of auto, float32, bfloat16, got 'float8'"),
        ({"stages": [{"name": "a", "batch_size": 0}]}, "stages.a.batch_size must be >= 1, got 0"),
        ({"model": [1, 2]}, "recipe section 'model:' must be a mapping of settings, got [1, 2]"),
        ({"train": "fast"}, "recipe section 'train:' must be a mapping of settings, got 'fast'"),
    ]
    for data, expected in cases:
        assert config_error(recipe_file(tmp_path, data)) == expected, data
    assert "must be a mapping with model: and train: sections" in config_error(recipe_file(tmp_path, "[1, 2]\n"))
    plain = recipe_file(tmp_path, {})
    assert config_error(plain, ["batch_size=abc"]) == "train.batch_size: expected an int, got 'abc'"
    assert config_error(plain, ["model.lm_layers=1.5"]) == "model.lm_layers: expected an int, got 1.5"
    assert config_error(plain, ["augment=perhaps"]) == "train.augment: expected true or false, got 'perhaps'"
    assert load_recipe(plain, ["system_prompt=a: b: c"]).model.system_prompt == "a: b: c"  # not YAML: a string


def test_the_trainer_validates_settings_made_in_code():
    from visprompt.train.config import Recipe, TrainConfig

    with pytest.raises(ConfigError, match="train.batch_size must be >= 1, got 0"):
        Trainer(Recipe(train=TrainConfig(train_data="x.json", batch_size=0)))


def test_warmup_then_cosine_schedule():
    lrs = [warmup_cosine(s, 100, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # decays monotonically after warmup
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_train_evaluates_checkpoints_and_saves_a_loadable_model(tmp_path, shapes_dir):
    path = write_recipe(tmp_path, shapes_dir, eval_every=3, save_every=3, save_total_limit=1)
    summary = Trainer(load_recipe(path)).train()
    out = tmp_path / "run"
    assert summary["steps"] == 6
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if "loss" in m]
    eval_rows = [m for m in metrics if "exact_match" in m]
    assert [m["step"] for m in train_rows] == [2, 4, 6]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert [m["step"] for m in eval_rows] == [3, 6] and 0 <= eval_rows[-1]["exact_match"] <= 1
    assert eval_rows[-1]["total"] == 16  # 4 records x 4 questions, every reply turn scored
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]  # older ones pruned
    model = VisionLanguageModel.from_pretrained(out)
    assert model.cfg.tokens_per_image == 16  # 32 px: stem /4, one stride-2 stage -> 4x4


def test_resume_continues_from_the_last_checkpoint(tmp_path, shapes_dir):
    path = write_recipe(tmp_path, shapes_dir, max_steps=4, save_every=2, eval_data="")
    Trainer(load_recipe(path)).train()
    summary = Trainer(load_recipe(path, ["max_steps=6", "resume=true"])).train()
    assert summary["steps"] == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # resumed from checkpoint-2 (checkpoints are mid-run only); the log keeps each step once
    Trainer(load_recipe(path)).train()  # a fresh run into the same folder: a fresh log
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_zero_learning_rate_freezes_a_part(tmp_path, shapes_dir):
    path = write_recipe(tmp_path, shapes_dir, vision_lr=0.0, eval_data="", max_steps=3)
    recipe = load_recipe(path)
    trainer = Trainer(recipe)
    trainer.train()
    trained = VisionLanguageModel.from_pretrained(tmp_path / "run")
    # Build the same initial model again (same seed) and compare the vision weights.
    torch.manual_seed(recipe.train.seed)
    from visprompt.data.llava import load_llava_records
    from visprompt.train.dataset import record_texts

    initial = VisionLanguageModel.build(
        load_recipe(path).model, record_texts(load_llava_records(recipe.train.train_data))
    )
    for (n, a), (_, b) in zip(initial.vision.state_dict().items(), trained.vision.state_dict().items()):
        assert torch.equal(a, b), n  # weights and BatchNorm statistics: a frozen part stays in eval mode
    assert not torch.equal(
        initial.connector.state_dict()["net.1.weight"], trained.connector.state_dict()["net.1.weight"]
    )


def test_all_parts_frozen_is_a_config_error(tmp_path, shapes_dir):
    path = write_recipe(tmp_path, shapes_dir, vision_lr=0.0, connector_lr=0.0, lm_lr=0.0)
    with pytest.raises(ConfigError):
        Trainer(load_recipe(path)).train()


def write_dataset(folder, records) -> str:
    """Two small images (img/0.png, img/1.png) and `records` as d.json in `folder`."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(["red", "navy"]):
        Image.new("RGB", (40, 30), colour).save(folder / "img" / f"{i}.png")
    (folder / "d.json").write_text(json.dumps(records))
    return str(folder / "d.json")


def image_record(rec_id: str, image: str) -> dict:
    question = {"from": "human", "value": "<image>\nWhat colour is it?"}
    return {"id": rec_id, "image": image, "conversations": [question, {"from": "gpt", "value": "red"}]}


def tiny_recipe(tmp_path, data: str, **train):
    recipe = {"model": TINY_MODEL, "train": {"train_data": data, "output_dir": str(tmp_path / "run"), **train}}
    return load_recipe(recipe_file(tmp_path, recipe))


def test_an_empty_training_file_says_it_has_no_records(tmp_path):
    from visprompt.errors import DatasetError

    data = write_dataset(tmp_path, [])
    with pytest.raises(DatasetError) as info:
        Trainer(tiny_recipe(tmp_path, data, max_steps=1)).train()
    assert str(info.value) == f"{data}: the file has no records to train on"
    # the other way to have nothing to train on still says so
    long_data = write_dataset(tmp_path, [image_record("a", "img/0.png")])
    with pytest.raises(ConfigError, match="all 1 records are longer than max_length=4 tokens"):
        Trainer(tiny_recipe(tmp_path, long_data, max_steps=1, max_length=4)).train()


@pytest.mark.parametrize("vision_lr", [0.0, 1e-3])  # features stored once / images loaded per batch
def test_a_training_image_that_is_not_an_image_is_a_bad_record_named_before_training(tmp_path, vision_lr):
    data = write_dataset(tmp_path, [image_record("good", "img/0.png"), image_record("rec-7", "img/notes.png")])
    (tmp_path / "img" / "notes.png").write_text("not a picture")
    summary = Trainer(tiny_recipe(tmp_path, data, max_steps=1, batch_size=1, vision_lr=vision_lr)).train()
    assert summary["examples"] == 1  # the good one; the bad one never reaches a step
    (bad,) = json.loads((tmp_path / "run" / "bad_records.json").read_text())["train"]["bad_records"]
    assert bad["id"] == "rec-7" and bad["kind"] == "unreadable_image"
    assert str(tmp_path / "img" / "notes.png") in bad["reason"] and "not a supported image" in bad["reason"]


def test_trainer_reads_any_llava_dataset(tmp_path):
    """Not shapes: photos-like images, multi-image records, a system prompt, a text-only record."""
    (tmp_path / "img").mkdir()
    for i, c in enumerate(["red", "navy", "teal"]):
        Image.new("RGB", (50 + 10 * i, 40), c).save(tmp_path / "img" / f"{i}.jpg")
    records = [
        {
            "id": "a",
            "image": "img/0.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is the main colour?"},
                {"from": "gpt", "value": "Red, mostly."},
            ],
        },
        {
            "id": "b",
            "image": ["img/1.jpg", "img/2.jpg"],
            "conversations": [
                {"from": "system", "value": "Answer in one word."},
                {"from": "human", "value": "<image>\n<image>\nWhich is darker, first or second?"},
                {"from": "gpt", "value": "first"},
                {"from": "human", "value": "Are they the same colour?"},
                {"from": "gpt", "value": "no"},
            ],
        },
        {"id": "c", "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"}]},
    ]
    (tmp_path / "d.json").write_text(json.dumps(records))
    recipe = {
        "model": TINY_MODEL,
        "train": {
            "train_data": str(tmp_path / "d.json"),
            "eval_data": str(tmp_path / "d.json"),
            "output_dir": str(tmp_path / "run"),
            "batch_size": 2,
            "max_steps": 2,
        },
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    summary = Trainer(load_recipe(tmp_path / "r.yaml")).train()
    assert summary["steps"] == 2 and summary["eval_total"] == 4


def write_staged_recipe(tmp_path, data_dir, stages):
    path = write_recipe(tmp_path, data_dir, eval_data="")
    recipe = yaml.safe_load(path.read_text())
    del recipe["train"]["train_data"]
    recipe["stages"] = stages
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_stages_parse_inherit_train_settings_and_take_per_stage_overrides(tmp_path, shapes_dir):
    stages = [
        {"name": "align", "train_data": str(shapes_dir / "align.json"), "max_steps": 2, "lm_lr": 0},
        {"name": "full", "train_data": str(shapes_dir / "train.json")},
    ]
    path = write_staged_recipe(tmp_path, shapes_dir, stages)
    r = load_recipe(path, ["batch_size=4", "stages.full.max_steps=3"])
    (n1, t1), (n2, t2) = r.stages
    assert (n1, t1.max_steps, t1.lm_lr, t1.batch_size) == ("align", 2, 0.0, 4)
    assert (n2, t2.max_steps, t2.lm_lr, t2.batch_size) == ("full", 3, 3e-3, 4)  # the rest from train:
    for bad in (["stages.nope.max_steps=1"], ["stages.full.nope=1"]):
        with pytest.raises(ConfigError):
            load_recipe(path, bad)
    with pytest.raises(ConfigError):
        load_recipe(write_staged_recipe(tmp_path, shapes_dir, [{"name": "a", "bogus": 1}]))


def test_stages_train_one_model_in_order_and_resume_skips_finished_stages(tmp_path, shapes_dir):
    stages = [
        {"name": "align", "train_data": str(shapes_dir / "align.json"), "max_steps": 2, "lm_lr": 0},
        {"name": "full", "train_data": str(shapes_dir / "train.json"), "max_steps": 3},
    ]
    path = write_staged_recipe(tmp_path, shapes_dir, stages)
    summary = Trainer(load_recipe(path)).train()
    out = tmp_path / "run"
    assert [s["stage"] for s in summary["stages"]] == ["align", "full"] and summary["steps"] == 3
    first = VisionLanguageModel.from_pretrained(out / "stages" / "align")
    final = VisionLanguageModel.from_pretrained(out)
    # stage 1 froze the LM: its weights are the built ones; stage 2 then trained them.
    lm_changed = any(not torch.equal(a, b) for a, b in zip(first.lm.parameters(), final.lm.parameters()))
    vision_same_start = first.cfg.vision_num_patches == final.cfg.vision_num_patches
    assert lm_changed and vision_same_start
    # one tokenizer for both stages, trained on both stages' text
    assert first.tokenizer.get_vocab() == final.tokenizer.get_vocab()
    # the second stage continued from the first (not from fresh weights): its connector starts there
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log if "loss" in m] == [2, 3]
    # resume: the finished first stage is loaded, not trained again
    (out / "stages" / "align" / "metrics.jsonl").write_text("")
    Trainer(load_recipe(path, ["resume=true", "stages.full.max_steps=4"])).train()
    assert (out / "stages" / "align" / "metrics.jsonl").read_text() == ""


def test_two_stages_align_then_lora_reuse_the_frozen_encoders_stored_outputs(tmp_path, shapes_dir, capfd):
    """The guide's recipe in small: stage 1 trains the connector alone (tower and LM frozen), stage 2
    adds LoRA adapters to the LM; the frozen encoder's outputs stored in stage 1 serve stage 2."""
    stages = [
        {"name": "align", "train_data": str(shapes_dir / "align.json"), "max_steps": 2, "lm_lr": 0, "vision_lr": 0},
        {"name": "instruct", "train_data": str(shapes_dir / "train.json"), "max_steps": 2, "vision_lr": 0},
    ]
    path = write_staged_recipe(tmp_path, shapes_dir, stages)
    trainer = Trainer(load_recipe(path, ["model.lm_lora_rank=4"]))
    trainer.train()
    err = capfd.readouterr().err
    align_images = {r["image"] for r in json.loads((shapes_dir / "align.json").read_text())}
    train_images = {r["image"] for r in json.loads((shapes_dir / "train.json").read_text())}
    assert align_images and align_images <= train_images
    assert f"encoding {len(align_images)} images once" in err
    assert (
        f"encoding {len(train_images - align_images)} images once, before the first step ({len(align_images)} more stored before)"
        in err
    )
    out = tmp_path / "run"
    first, final = VisionLanguageModel.from_pretrained(out / "stages" / "align"), trainer.model
    assert not any("lora_" in n for n, _ in first.lm.named_parameters())
    assert any("lora_" in n for n, p in final.lm.named_parameters() if p.requires_grad)
    assert all(not p.requires_grad for n, p in final.lm.named_parameters() if "lora_" not in n)
    # a stage that trains the encoder leaves nothing to reuse
    stages[0]["vision_lr"] = 1e-3
    capfd.readouterr()
    Trainer(load_recipe(write_staged_recipe(tmp_path, shapes_dir, stages), [f"output_dir={tmp_path / 'r2'}"])).train()
    assert f"encoding {len(train_images)} images once, before the first step\n" in capfd.readouterr().err


def test_lora_trains_only_adapters_in_the_lm_and_saves_merged_weights(tmp_path, shapes_dir):
    path = write_recipe(tmp_path, shapes_dir, eval_data="", max_steps=3, vision_lr=0.0, lm_lr=1e-2)
    trainer = Trainer(load_recipe(path, ["model.lm_lora_rank=4", "model.lm_lora_targets=q_proj,v_proj"]))
    built = {}
    original_build = trainer._build_model

    def keep_copy(records):
        model = original_build(records)
        built.update({n: p.detach().clone() for n, p in model.lm.named_parameters()})
        return model

    trainer._build_model = keep_copy
    trainer.train()
    model = trainer.model
    lora = {n: p for n, p in model.lm.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert all(not p.requires_grad for n, p in model.lm.named_parameters() if "lora_" not in n)
    for n, p in model.lm.named_parameters():  # the LM's own weights did not move
        if "lora_" not in n:
            assert torch.equal(p, built[n.replace(".base_layer.", ".")]), n
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # the adapters did
    # the saved folder is a plain model whose logits equal the adapted model's
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "run")
    assert not any("lora_" in n for n, _ in loaded.named_parameters())
    ids = torch.tensor([[loaded.tokenizer.pad_token_id or 0, 5, 6, 7]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.lm(input_ids=ids).logits, loaded.lm(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(ConfigError):
        Trainer(
            load_recipe(
                path, ["model.lm_lora_rank=4", "model.lm_lora_targets=nope_proj", "output_dir=" + str(tmp_path / "r2")]
            )
        ).train()


def test_stored_features_of_a_frozen_encoder_give_the_same_loss(shapes_dir):
    from visprompt.data.llava import load_llava_records
    from visprompt.images import ImagePreprocessor
    from visprompt.models.config import VLMConfig
    from visprompt.train.dataset import VLMDataset, collate, record_texts

    records = load_llava_records(shapes_dir / "train.json")[:6]
    model = VisionLanguageModel.build(VLMConfig(**TINY_MODEL), record_texts(records)).eval()
    pp = ImagePreprocessor(model.cfg.image_size, model.cfg.image_mean, model.cfg.image_std, model.cfg.image_resize_mode)
    ds = VLMDataset(records, model, 512, pp)
    pad = model.tokenizer.pad_token_id
    b = collate([ds[i] for i in range(len(ds))], pad)
    ref = model(b["input_ids"], b["attention_mask"], b["pixel_values"], labels=b["labels"]).loss
    kept = ds.store_vision_features(model.vision, batch_size=4)
    assert kept == 6 * model.cfg.vision_num_patches * model.vision(b["pixel_values"][:1]).shape[-1] * 4
    c = collate([ds[i] for i in range(len(ds))], pad)
    assert c["pixel_values"] is None and c["vision_features"].shape[0] == 6
    got = model(c["input_ids"], c["attention_mask"], vision_features=c["vision_features"], labels=c["labels"]).loss
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        VLMDataset(records, model, 512, pp, augment=True).store_vision_features(model.vision)


def test_trainer_stores_frozen_features_and_saves_the_prompt_layout(tmp_path, capfd):
    from visprompt.data.shapes import generate_shapes_dataset
    from visprompt.engine.backends.own import OwnVLMBackend
    from visprompt.models.chat import render_content
    from visprompt.tasks.assistant import user_turn

    data = tmp_path / "data"
    generate_shapes_dataset(data, n_train=12, n_test=3, seed=5)  # default: one question per record, image after it
    path = write_recipe(tmp_path, data, vision_lr=0.0, max_steps=2, eval_max_records=3)
    Trainer(load_recipe(path)).train()
    assert "frozen encoder run once over 12 images" in capfd.readouterr().err
    model = VisionLanguageModel.from_pretrained(tmp_path / "run")
    assert model.cfg.image_after_text is True
    assert OwnVLMBackend(model).image_after_text is True
    # ask() then renders the question the way the training records put it: "question\n<image>".
    record = json.loads((data / "test.json").read_text())[0]
    question = record["conversations"][0]["value"].removesuffix("\n<image>")
    text, images = render_content(user_turn(["x.png"], question, image_after_text=True), "<image>")
    assert text == record["conversations"][0]["value"] and images == ["x.png"]
    text, _ = render_content(user_turn(["x.png"], question), "<image>")
    assert text == "<image>\n" + question


def test_vqa_report_names_the_question_wherever_the_image_sits():
    """Mistakes quote the question's text whether the image comes before or after it."""
    from visprompt.engine.backend import GenerationResult
    from visprompt.eval import evaluate

    class AlwaysNo:
        name = "always-no"

        def generate(self, conversations, params):
            return [GenerationResult("no", "stop", 1, 1) for _ in conversations]

    records = [
        LlavaRecord("a", ["x.png"], [("What color is the circle?\n<image>", "red")], extra={"kinds": ["color"]}),
        LlavaRecord(
            "b",
            ["y.png"],
            [("<image>\nIs there a square?", "yes"), ("Is it red?", "no")],
            extra={"kinds": ["exist", "color"]},
        ),
    ]
    report = evaluate(AlwaysNo(), records)
    assert report.total == 3 and report.by_kind == {"color": 0.5, "exist": 0.0}
    assert [m["question"] for m in report.examples] == ["What color is the circle?", "Is there a square?"]


def test_a_run_writes_curves_tensorboard_and_a_card_that_names_its_data(tmp_path, shapes_dir):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    path = write_recipe(tmp_path, shapes_dir, eval_every=2, tensorboard=True, max_steps=4)
    summary = Trainer(load_recipe(path)).train()
    out = tmp_path / "run"
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    import hashlib

    digest = hashlib.sha256((shapes_dir / "train.json").read_bytes()).hexdigest()
    assert summary["data"]["train"]["sha256"] == digest and summary["data"]["train"]["records"] > 0
    card = (out / "README.md").read_text()
    assert digest[:16] in card and "visprompt " in card and "lm_lr: 0.003" in card


def test_precision_is_bf16_only_where_the_cpu_has_bf16_units(monkeypatch):
    from visprompt.runtime.cpu import CpuInfo
    from visprompt.train import precision

    for flags, want in (
        (frozenset({"avx2", "fma"}), torch.float32),
        (frozenset({"avx512f", "amx_tile", "amx_bf16"}), torch.bfloat16),
    ):
        monkeypatch.setattr(precision, "cpu_info", lambda flags=flags: CpuInfo("x", "Some CPU", flags))
        dtype, why = precision.choose("auto")
        assert dtype == want and "Some CPU" in why
    assert precision.choose("float32")[0] == torch.float32
    with pytest.raises(ConfigError):
        precision.choose("fp8")


def test_the_optimizer_is_torchs_fused_adamw_with_the_default_update():
    from conftest import tiny_config

    from visprompt.train.trainer import build_optimizer, fused_adamw_applies

    torch.manual_seed(0)
    model = VisionLanguageModel.build(tiny_config(), ["a red square", "a blue circle"])
    lrs = {"connector": 1e-3, "lm": 1e-3}
    fused = build_optimizer(model, lrs, 0.01)
    assert fused.defaults["fused"] is True
    params = [p for g in fused.param_groups for p in g["params"]]
    start = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    for _ in range(3):
        fused.step()
    after_fused = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s0 in zip(params, start):
            p.copy_(s0)
    groups = [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in fused.param_groups]
    plain = torch.optim.AdamW(groups, betas=(0.9, 0.95))  # the same groups, torch's default update
    assert not plain.defaults["fused"]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    for _ in range(3):
        plain.step()
    assert all(torch.allclose(a, p, atol=1e-6, rtol=1e-5) for a, p in zip(after_fused, params))
    integer = torch.nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)
    assert not fused_adamw_applies([{"params": [integer]}])
