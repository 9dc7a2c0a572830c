"""Dataset formats and bad records: one dataset written as LLaVA JSON and JSONL, an imagefolder, COCO
captions and WebDataset shards loads to the same records; every kind of bad record is named by its
id, and training skips them or refuses to start."""

import json

import numpy as np
import pytest
import skimage.data
import webdataset as wds
import yaml
from PIL import Image

from visprompt.data.formats import CAPTION_PROMPT, detect_format
from visprompt.data.records import load_records
from visprompt.images import load_image

PHOTOS = {"astronaut": skimage.data.astronaut, "chelsea": skimage.data.chelsea, "coffee": skimage.data.coffee}
CAPTION = "A person in a space suit."
QA = ("What animal is this?", "A cat.")
CONV = [  # two images, two turns, a system message
    {"from": "system", "value": "Answer briefly."},
    {"from": "human", "value": "<image>\n<image>\nWhich one is a drink?"},
    {"from": "gpt", "value": "The second."},
    {"from": "human", "value": "And the first?"},
    {"from": "gpt", "value": "A cat."},
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three real photos, small, as PNG files in images/."""
    root = tmp_path_factory.mktemp("formats")
    (root / "images").mkdir()
    for name, load in PHOTOS.items():
        Image.fromarray(load()).resize((40, 32)).save(root / "images" / f"{name}.png")
    return root


def llava_rows():
    return [
        {
            "id": "0",
            "image": "images/astronaut.png",
            "conversations": [{"from": "human", "value": CAPTION_PROMPT}, {"from": "gpt", "value": CAPTION}],
        },
        {
            "id": "1",
            "image": "images/chelsea.png",
            "conversations": [{"from": "human", "value": f"<image>\n{QA[0]}"}, {"from": "gpt", "value": QA[1]}],
        },
        {"id": "2", "image": ["images/chelsea.png", "images/coffee.png"], "conversations": CONV},
    ]


def write_all_formats(root):
    """The dataset in every format; returns {name: (path, format setting)}."""
    (root / "d.json").write_text(json.dumps(llava_rows()))
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in llava_rows()))
    chat = [  # the same conversation as chat messages with image parts
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which one is a drink?"}],
        },
        {"role": "assistant", "content": "The second."},
        {"role": "user", "content": "And the first?"},
        {"role": "assistant", "content": "A cat."},
    ]
    meta = [
        {"id": "0", "file_name": "images/astronaut.png", "caption": CAPTION},
        {"id": "1", "file_name": "images/chelsea.png", "question": QA[0], "answer": QA[1]},
        {"id": "2", "file_name": ["images/chelsea.png", "images/coffee.png"], "conversations": chat},
    ]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in meta))
    coco = {
        "images": [{"id": 7, "file_name": "images/astronaut.png"}],
        "annotations": [{"id": 0, "image_id": 7, "caption": CAPTION}],
    }
    (root / "captions.json").write_text(json.dumps(coco))
    (root / "shards").mkdir(exist_ok=True)
    png = {n: (root / "images" / f"{n}.png").read_bytes() for n in PHOTOS}
    with wds.TarWriter(str(root / "shards" / "train-000.tar")) as sink:
        sink.write({"__key__": "0", "png": png["astronaut"], "txt": CAPTION})
        sink.write({"__key__": "1", "png": png["chelsea"], "json": {"question": QA[0], "answer": QA[1]}})
    with wds.TarWriter(str(root / "shards" / "train-001.tar")) as sink:
        sink.write({"__key__": "2", "0.png": png["chelsea"], "1.png": png["coffee"], "json": CONV})
    return {
        "llava json": (root / "d.json", "llava"),
        "llava jsonl": (root / "d.jsonl", "llava"),
        "imagefolder": (root, "imagefolder"),
        "coco": (root / "captions.json", "coco"),
        "webdataset folder": (root / "shards", "webdataset"),
        "webdataset pattern": (root / "shards" / "train-{000..001}.tar", "webdataset"),
    }


def as_compared(record):
    """What must agree between formats: id, system, turns and each image's pixels."""
    pixels = [np.asarray(load_image(im)).tobytes() for im in record.images]
    return record.id, record.system, record.turns, pixels


def test_one_dataset_in_every_format_loads_to_the_same_records(photos):
    formats = write_all_formats(photos)
    expected = [as_compared(r) for r in load_records(photos / "d.json").records]
    assert len(expected) == 3 and expected[2][2] == [
        ("<image>\n<image>\nWhich one is a drink?", "The second."),
        ("And the first?", "A cat."),
    ]
    for name, (path, fmt) in formats.items():
        for setting in ("auto", fmt):  # told from the path, or named
            loaded = load_records(path, setting)
            assert loaded.format == fmt and loaded.bad == [], name
            want = expected[:1] if fmt == "coco" else expected  # COCO holds captions only
            assert [as_compared(r) for r in loaded.records] == want, name
    assert detect_format(photos / "metadata.jsonl") == "imagefolder"
    assert detect_format(photos / "shards" / "train-000.tar") == "webdataset"


def test_coco_gives_one_caption_record_per_annotation(photos):
    coco = {
        "images": [{"id": 1, "file_name": "images/coffee.png"}, {"id": 2, "file_name": "coffee.png"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A cup of coffee."},
            {"id": 11, "image_id": 1, "caption": "Espresso on a saucer."},
            {"id": 12, "image_id": 3, "caption": "No such image."},
        ],
    }
    (photos / "coco2.json").write_text(json.dumps(coco))
    loaded = load_records(photos / "coco2.json")
    assert [(r.id, r.turns[0][1]) for r in loaded.records] == [
        ("10", "A cup of coffee."),
        ("11", "Espresso on a saucer."),
    ]
    assert loaded.records[0].images == loaded.records[1].images
    assert [(b.id, b.kind) for b in loaded.bad] == [("12", "missing_image")]
    # image_root: where relative image paths start when they are not beside the JSON
    only_2 = {**coco, "annotations": [{"id": 13, "image_id": 2, "caption": "A cup."}]}
    (photos / "coco3.json").write_text(json.dumps(only_2))
    assert load_records(photos / "coco3.json").bad[0].kind == "missing_image"
    assert load_records(photos / "coco3.json", image_root=photos / "images").records[0].id == "13"


def conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


BAD_ROWS = [  # (row, the kind it is reported as)
    ({"id": "ok", "image": "images/coffee.png", "conversations": conv("<image>\nWhat is it?", "Coffee.")}, None),
    ({"id": "gone", "image": "images/none.png", "conversations": conv("<image>\nq", "a")}, "missing_image"),
    ({"id": "notes", "image": "notes.png", "conversations": conv("<image>\nq", "a")}, "unreadable_image"),
    ({"id": "cut", "image": "cut.png", "conversations": conv("<image>\nq", "a")}, "unreadable_image"),
    ({"id": "nomark", "image": "images/coffee.png", "conversations": conv("q", "a")}, "placeholders"),
    ({"id": "twomarks", "image": "images/coffee.png", "conversations": conv("<image><image>\nq", "a")}, "placeholders"),
    ({"id": "order", "conversations": conv("q", "a")[::-1]}, "roles"),
    ({"id": "who", "conversations": [{"from": "bot", "value": "q"}, {"from": "gpt", "value": "a"}]}, "roles"),
    ({"id": "noanswer", "conversations": conv("q")}, "roles"),
    ({"id": "empty", "image": "images/coffee.png", "conversations": conv("<image>\nq", " ")}, "empty_answer"),
    ({"id": "empty2", "conversations": conv("q", "a", "q2", "")}, "empty_answer"),
]


def write_bad_dataset(root):
    (root / "notes.png").write_text("not a picture")
    png = (root / "images" / "coffee.png").read_bytes()
    (root / "cut.png").write_bytes(png[: len(png) // 2])  # a truncated file: its header reads fine
    path = root / "bad.json"
    path.write_text(json.dumps([row for row, _ in BAD_ROWS]))
    return path


def test_every_kind_of_bad_record_is_reported_by_id(photos):
    loaded = load_records(write_bad_dataset(photos))
    assert [r.id for r in loaded.records] == ["ok"]
    assert [(b.id, b.kind) for b in loaded.bad] == [(row["id"], kind) for row, kind in BAD_ROWS if kind]
    assert all(b.id in b.reason and "\n" not in b.reason for b in loaded.bad)
    assert "cut.png" in next(b.reason for b in loaded.bad if b.id == "cut")


def test_shards_are_checked_with_the_same_rules_as_they_stream(photos):
    png = (photos / "images" / "coffee.png").read_bytes()
    shard = photos / "bad.tar"
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "ok", "png": png, "txt": "Coffee."})
        sink.write({"__key__": "cut", "png": png[:200], "txt": "Coffee."})
        sink.write({"__key__": "empty", "png": png, "json": {"question": "What is it?", "answer": ""}})
        sink.write({"__key__": "nomark", "png": png, "json": conv("q", "a")})
        sink.write({"__key__": "notext", "png": png})
        sink.write({"__key__": "badjson", "png": png, "json": b"{oops"})
    loaded = load_records(shard)
    assert [r.id for r in loaded.records] == ["ok"]
    kinds = [(b.id, b.kind) for b in loaded.bad]
    assert kinds == [
        ("cut", "unreadable_image"),
        ("empty", "empty_answer"),
        ("nomark", "placeholders"),
        ("notext", "format"),
        ("badjson", "format"),
    ]
    assert "bad.tar:cut.png" in loaded.bad[0].reason


TINY = dict(  # a model built from a size spec: a few seconds to train a step
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


def bad_recipe(root, **train):
    recipe = {
        "model": TINY,
        "train": {
            "train_data": str(write_bad_dataset(root)),
            "output_dir": str(root / "run"),
            "batch_size": 1,
            "max_steps": 1,
            "dtype": "float32",
            **train,
        },
    }
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    return root / "r.yaml"


def test_skip_reports_the_bad_records_before_training_and_trains_on_the_rest(photos, capfd):
    from visprompt.cli.main import main

    assert main(["train", str(bad_recipe(photos)), "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out.splitlines()[-1])["examples"] == 1  # only "ok"
    summary = next(line for line in err.splitlines() if line.startswith("bad records:"))
    assert summary.startswith("bad records: train 10 of 11 (") and "skipped" in summary
    assert err.index("bad records:") < err.index("model:")  # said before the run starts
    report = json.loads((photos / "run" / "bad_records.json").read_text())["train"]
    assert report["bad"] == 10 and report["by_kind"]["roles"] == 3
    assert [b["id"] for b in report["bad_records"]] == [row["id"] for row, kind in BAD_ROWS if kind]


def test_fail_exits_2_with_one_line_naming_the_count_and_the_first_ids(photos, capfd):
    from visprompt.cli.main import main

    recipe = bad_recipe(photos, on_bad_record="fail", output_dir=str(photos / "refused"))
    assert main(["train", str(recipe)]) == 2
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert "10 bad record(s)" in last and "first ids gone, notes, cut, nomark" in last
    assert sorted(p.name for p in (photos / "refused").iterdir()) == ["bad_records.json"]  # no model


@pytest.mark.parametrize("vision_lr", [0.0, 1e-3])  # features stored once / images decoded per batch
def test_training_reads_and_evaluates_on_shards(photos, vision_lr):
    from visprompt.train.config import load_recipe
    from visprompt.train.trainer import Trainer

    write_all_formats(photos)
    recipe = {
        "model": TINY,
        "train": {
            "train_data": str(photos / "shards"),
            "eval_data": str(photos / "shards" / "train-{000..001}.tar"),
            "output_dir": str(photos / f"wds-{vision_lr}"),
            "batch_size": 3,
            "max_steps": 1,
            "vision_lr": vision_lr,
            "dtype": "float32",
        },
    }
    (photos / "wds.yaml").write_text(yaml.safe_dump(recipe))
    summary = Trainer(load_recipe(photos / "wds.yaml")).train()
    assert summary["examples"] == 3 and summary["eval_total"] == 4  # 4 answers: record 2 has two turns
    assert summary["data"]["train"]["records"] == 3


def test_recipes_refuse_an_unknown_format_or_bad_record_policy(tmp_path):
    from visprompt.errors import ConfigError
    from visprompt.train.config import load_recipe

    assert load_recipe(None, ["data_format=coco", "on_bad_record=fail"]).train.on_bad_record == "fail"
    for setting, message in [
        ("data_format=parquet", "train.data_format must be one of auto, llava, imagefolder, coco, webdataset"),
        ("on_bad_record=warn", "train.on_bad_record must be one of skip, fail, got 'warn'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_recipe(None, [setting])
