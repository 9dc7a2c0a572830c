"""The synthetic shapes dataset generator and the generic LLaVA reader/writer."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visprompt.data.llava import LlavaRecord, load_llava_records, save_llava_records
from visprompt.data.shapes import (
    COLORS,
    KINDS,
    TEMPLATES,
    _match_template,
    answer_question,
    caption,
    generate_shapes_dataset,
    make_questions,
    position_name,
    sample_scene,
    scene_from_record,
)
from visprompt.errors import ConfigError, DatasetError

N_TRAIN, N_TEST = 30, 10


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes")
    return out, generate_shapes_dataset(out, n_train=N_TRAIN, n_test=N_TEST, seed=0)


def _raw(out: Path, split: str) -> list[dict]:
    return json.loads((out / f"{split}.json").read_text())


# --- generator ------------------------------------------------------------------------------------


def test_layout_and_reader(dataset):
    out, summary = dataset
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        raw = _raw(out, split)
        # Default layout: one record per question (4 per image), the image after the question.
        assert len(raw) == 4 * n == summary[split]["records"] and summary[split]["images"] == n
        records = load_llava_records(out / f"{split}.json")
        assert [r.id for r in records] == [f"{split}-{i:05d}-{q}" for i in range(n) for q in range(4)]
        for item, rec in zip(raw, records):
            assert item["image"] == f"images/{split}/{item['id'].split('-')[1]}.png"  # relative
            assert rec.images == [str((out / item["image"]).resolve())]
            assert Path(rec.images[0]).is_file()
            assert len(rec.turns) == len(rec.extra["kinds"]) == 1
            question, answer = rec.turns[0]
            assert question.endswith("?\n<image>") or question.endswith(".\n<image>"), question
            assert question.count("<image>") == 1
            assert answer == answer.strip().lower() and not answer.endswith(".")
        assert summary[split]["questions"] == sum(len(r.turns) for r in records)
    with Image.open(out / "images/train/00000.png") as im:
        assert im.size == (128, 128) and im.mode == "RGB"


def test_multi_turn_image_first_layout_has_the_same_scenes(dataset, tmp_path):
    out, _ = dataset
    generate_shapes_dataset(
        tmp_path, n_train=N_TRAIN, n_test=N_TEST, seed=0, turns_per_record=0, image_after_question=False
    )
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        raw = _raw(tmp_path, split)
        assert [r["id"] for r in raw] == [f"{split}-{i:05d}" for i in range(n)]
        records = load_llava_records(tmp_path / f"{split}.json")
        for rec in records:
            # <image> exactly once, at the start of the first question; every question in one record.
            assert rec.turns[0][0].startswith("<image>\n")
            assert sum(h.count("<image>") for h, _ in rec.turns) == 1
            assert len(rec.extra["kinds"]) == len(rec.turns) == 4
        # Same scenes and the same questions as the default layout, only arranged differently.
        default = _raw(out, split)
        assert [r["scene"] for r in raw] == [r["scene"] for r in default[::4]]
        flat = [
            (t["value"].replace("<image>", "").strip(), a["value"])
            for r in raw
            for t, a in zip(r["conversations"][0::2], r["conversations"][1::2])
        ]
        assert flat == [
            (r["conversations"][0]["value"].replace("<image>", "").strip(), r["conversations"][1]["value"])
            for r in default
        ]
        assert (tmp_path / "images/train/00007.png").read_bytes() == (out / "images/train/00007.png").read_bytes()


def test_deterministic(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    generate_shapes_dataset(again, n_train=N_TRAIN, n_test=N_TEST, seed=0)
    for name in ("train.json", "test.json", "images/train/00007.png", "images/test/00003.png"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "other"
    generate_shapes_dataset(other, n_train=N_TRAIN, n_test=N_TEST, seed=1)
    assert (other / "train.json").read_bytes() != (out / "train.json").read_bytes()
    assert (other / "test.json").read_bytes() != (out / "test.json").read_bytes()


def test_test_scenes_are_new(dataset):
    out, _ = dataset
    train = {scene_from_record(r).signature() for r in _raw(out, "train")}
    test = [scene_from_record(r).signature() for r in _raw(out, "test")[::4]]  # 4 records per image
    assert not train & set(test)
    assert len(set(test)) == len(test)


def test_test_scenes_new_even_when_train_covers_single_shapes(tmp_path):
    # 432 possible one-shape scenes: with 1 object max, a big train split covers most of them.
    generate_shapes_dataset(
        tmp_path, n_train=600, n_test=20, image_size=48, max_objects=1, questions_per_image=1, kinds=["count"]
    )
    train = {scene_from_record(r).signature() for r in _raw(tmp_path, "train")}
    test = {scene_from_record(r).signature() for r in _raw(tmp_path, "test")}
    assert not train & test and len(test) == 20


def test_answers_match_scene(dataset):
    out, _ = dataset
    for split in ("train", "test"):
        for item in _raw(out, split):
            scene = scene_from_record(item)
            turns = item["conversations"]
            for kind, human, gpt in zip(item["kinds"], turns[0::2], turns[1::2]):
                question = human["value"].removeprefix("<image>\n").removesuffix("\n<image>")
                # Re-derived by parsing the question back; None would mean ambiguous or unparseable.
                assert answer_question(scene, kind, question) == gpt["value"], (item["id"], question)
            objs = item["scene"]["objects"]
            assert 1 <= len(objs) <= 4
            cells = [(o["row"], o["col"]) for o in objs]
            assert cells == sorted(set(cells))  # distinct cells, reading order
            assert all(o["position"] == position_name(o["row"], o["col"]) for o in objs)


def test_caption_format():
    rng = random.Random(3)
    scene = sample_scene(rng)
    while len(scene.objects) < 3:
        scene = sample_scene(rng)
    text = caption(scene)
    parts = text.replace(" and ", ", ").split(", ")
    assert parts == [f"a {o.size} {o.color} {o.shape}" for o in scene.objects]
    assert text.count(" and ") == 1


def test_every_kind_present_and_balanced(dataset):
    out, summary = dataset
    for split in ("train", "test"):
        counts = Counter(k for r in _raw(out, split) for k in r["kinds"])
        assert set(counts) == set(KINDS) and set(summary[split]["kinds"]) == set(KINDS)
        assert max(counts.values()) - min(counts.values()) <= 2  # balanced by construction


def test_yes_no_balance():
    # Questions only, no rendering: enough samples for a meaningful ratio in milliseconds.
    rng = random.Random(0)
    answers: dict[str, Counter] = {"exist": Counter(), "relation": Counter()}
    for _ in range(1500):
        scene = sample_scene(rng)
        for kind, _q, a in make_questions(scene, rng, 2, kinds=("exist", "relation")):
            answers[kind][a] += 1
    for kind, c in answers.items():
        assert set(c) == {"yes", "no"}, kind
        assert 0.42 < c["yes"] / (c["yes"] + c["no"]) < 0.58, (kind, c)


def test_every_template_is_used():
    used = set()
    rng = random.Random(1)
    for _ in range(400):
        for kind, q, _a in make_questions(sample_scene(rng), rng, 7):
            used |= {
                t
                for key, ts in TEMPLATES.items()
                if key.startswith(kind)
                for t in ts
                if _match_template(t, q) is not None
            }
    assert used == {t for ts in TEMPLATES.values() for t in ts}
    assert all(len(ts) >= 2 for ts in TEMPLATES.values())


def test_shapes_do_not_overlap_and_render_as_described(dataset):
    out, _ = dataset
    for split in ("train", "test"):
        for item in _raw(out, split):
            pixels = np.asarray(Image.open(out / item["image"]).convert("RGB")).astype(int)
            objs = item["scene"]["objects"]
            boxes = [o["bbox"] for o in objs]
            for a, b in itertools.combinations(boxes, 2):
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (item["id"], a, b)
            covered = np.zeros(pixels.shape[:2], bool)
            for o in objs:
                x0, y0, x1, y1 = o["bbox"]
                assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
                side = x1 - x0
                assert side == y1 - y0 and (side < 20) == (o["size"] == "small")
                # The centre of every shape's box is inside the shape (true for all four shapes).
                centre = pixels[(y0 + y1) // 2, (x0 + x1) // 2]
                assert np.abs(centre - o["rgb"]).max() <= 2, (item["id"], o)
                covered[y0:y1, x0:x1] = True
            # Outside the boxes: untouched background.
            assert (pixels[~covered] == item["scene"]["background"]).all()


def test_colours_stay_distinct():
    # Worst case after +-12 jitter per channel: still far apart in at least one channel.
    for (na, a), (nb, b) in itertools.combinations(COLORS.items(), 2):
        assert max(abs(x - y) for x, y in zip(a, b)) - 2 * 12 >= 40, (na, nb)


def test_bad_arguments():
    with pytest.raises(ConfigError):
        generate_shapes_dataset("/nonexistent-never-written", n_train=1, n_test=1, kinds=["colour"])
    with pytest.raises(ConfigError):
        generate_shapes_dataset("/nonexistent-never-written", image_size=16)


# --- LLaVA reader ---------------------------------------------------------------------------------


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _conv(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


@pytest.fixture()
def images(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / "img" / name)
    return tmp_path


def _error(path: Path) -> str:
    with pytest.raises(DatasetError) as info:
        load_llava_records(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_reader_errors_are_one_line_and_located(images):
    d = images
    assert "not found" in _error(d / "missing.json")
    assert "not valid JSON" in _error(_write(d / "bad.json", "[{'id': 1}]"))
    assert "not valid JSON" in _error(_write(d / "bad.jsonl", '{"id": 1}\n{oops\n'))
    assert "record 1" in _error(_write(d / "noconv.json", [{"conversations": _conv("hi", "yo")}, {"id": "x"}]))
    msg = _error(_write(d / "order.json", [{"conversations": _conv("hi", "yo")[::-1]}]))
    assert "record 0" in msg and "alternate" in msg
    assert "no gpt answer" in _error(_write(d / "odd.json", [{"conversations": _conv("hi")}]))
    msg = _error(_write(d / "noimg.json", [{"id": "r", "image": "img/zzz.png", "conversations": _conv("q", "a")}]))
    assert "image file not found" in msg and "'r'" in msg
    two = [{"image": ["img/a.png", "img/b.png"], "conversations": _conv("<image>\nq", "a")}]
    assert "1 <image> marker(s) but 2 image(s)" in _error(_write(d / "markers.json", two))
    text_only = [{"conversations": _conv("<image>\nq", "a")}]
    assert "but 0 image(s)" in _error(_write(d / "textonly.json", text_only))
    assert "expected a JSON list" in _error(_write(d / "num.json", "3"))
    assert "record 0" in _error(_write(d / "notobj.json", [[1, 2]]))


def test_reader_formats(images):
    d = images
    rows = [
        {"id": "one", "image": "img/a.png", "conversations": _conv("<image>\nq1", "a1", "q2", "a2"), "k": 1},
        {"id": 7, "image": ["img/a.png", "img/b.png"], "conversations": _conv("<image><image>\nq", "a")},
        {"conversations": [{"from": "system", "value": "be brief"}] + _conv("hello", "hi")},
        {"image": "img/b.png", "conversations": _conv("no marker", "a")},  # marker gets prepended
    ]
    _write(d / "data.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + "\n")
    _write(d / "data.json", rows)
    for name in ("data.jsonl", "data.json"):
        recs = load_llava_records(d / name)
        assert [r.id for r in recs] == ["one", "7", "2", "3"]
        assert recs[0].turns == [("<image>\nq1", "a1"), ("q2", "a2")] and recs[0].extra == {"k": 1}
        assert recs[0].images == [str(d.resolve() / "img/a.png")]
        assert len(recs[1].images) == 2
        assert recs[2].images == [] and recs[2].system == "be brief" and recs[2].turns == [("hello", "hi")]
        assert recs[3].turns == [("<image>\nno marker", "a")]


def test_save_roundtrip(images):
    d = images
    recs = [
        LlavaRecord(id="a", images=[str(d / "img/a.png")], turns=[("<image>\nq", "x")], extra={"kinds": ["k"]}),
        LlavaRecord(id="b", images=[], turns=[("q", "y"), ("q2", "z")], system="sys"),
        LlavaRecord(id="c", images=[str(d / "img/a.png"), str(d / "img/b.png")], turns=[("<image>\n<image>\nq", "w")]),
    ]
    for name in ("out.json", "out.jsonl"):
        save_llava_records(recs, d / name)
        raw = (d / name).read_text()
        assert '"img/a.png"' in raw  # stored relative
        loaded = load_llava_records(d / name)
        for r in recs:
            r.images = [str(Path(p).resolve()) for p in r.images]
        assert loaded == recs


def test_restricted_kinds_never_give_an_empty_record(tmp_path):
    from visprompt.data.llava import load_llava_records

    generate_shapes_dataset(
        tmp_path,
        n_train=60,
        n_test=10,
        seed=1,
        kinds=["color", "shape"],
        max_objects=2,
        questions_per_image=2,
        turns_per_record=0,
    )
    records = load_llava_records(tmp_path / "train.json")
    assert len(records) == 60 and all(r.turns for r in records)


def test_the_command_writes_only_the_kinds_and_the_image_size_asked_for(tmp_path, capsys):
    from visprompt.cli.main import main

    args = ["data", "shapes", str(tmp_path), "--train", "6", "--test", "2", "--questions", "1", "--image-size", "64"]
    assert main([*args, "--kinds", "color"]) == 0
    records = json.loads((tmp_path / "train.json").read_text()) + json.loads((tmp_path / "test.json").read_text())
    assert {k for r in records for k in r["kinds"]} == {"color"}
    with Image.open(tmp_path / records[0]["image"]) as image:
        assert image.size == (64, 64)
    capsys.readouterr()
    assert main([*args, "--kinds", "colour"]) == 2
    assert "question kinds must be" in capsys.readouterr().err
