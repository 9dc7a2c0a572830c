"""A synthetic "shapes" visual question answering dataset, in LLaVA format.

Each image shows 1-4 flat shapes (circle, square, triangle, diamond) in six saturated colours and two
clearly different sizes, each in its own cell of a 3x3 grid, so shapes never overlap and every
position has an unambiguous name ("top left", "center", ...). Each image gets several question/answer
turns of different kinds (caption, color, shape, count, position, relation, exist) drawn from
paraphrased templates, with short canonical lower-case answers. A question is only asked when its
answer is unambiguous in that scene.

It is small and clean enough that a tiny model trained from scratch on a CPU can learn it, and the
test split never repeats a training scene (same shapes, colours, sizes and cells).

    python -m visprompt.data.shapes OUT_DIR --n-train 2000 --n-test 200
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ..errors import ConfigError, DatasetError
from .llava import json_list_text

SHAPES = ("circle", "square", "triangle", "diamond")
# Far apart in RGB (every pair differs by >= 70 in some channel) so jitter never makes them ambiguous.
COLORS = {
    "red": (215, 30, 35),
    "green": (35, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 25),
    "purple": (135, 55, 185),
    "orange": (245, 135, 20),
}
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
KINDS = ("caption", "color", "shape", "count", "position", "relation", "exist")

# Side of a shape's bounding box as a fraction of a grid cell; the gap keeps sizes obviously distinct.
_SIZE_FRACTION = {"small": 0.40, "large": 0.74}
_CELL_MARGIN = 0.06  # empty border inside each cell, so shapes in neighbouring cells never touch
_COLOR_JITTER = 12
_BACKGROUND = (240, 240, 240)
_BACKGROUND_JITTER = 10
_SUPERSAMPLE = 2  # draw at 2x and box-downsample: light antialiasing, pixels outside bboxes untouched

TEMPLATES: dict[str, list[str]] = {
    "caption": [
        "Describe the image.",
        "What do you see?",
        "What is in the picture?",
        "Describe the scene briefly.",
        "List the objects in the image.",
    ],
    # {ref}: the shape, with its size only when needed to make it unique ("circle", "small circle").
    "color": [
        "What color is the {ref}?",
        "What is the color of the {ref}?",
        "Which color is the {ref}?",
        "What color does the {ref} have?",
    ],
    # {ref}: the colour, with its size only when needed ("red", "small red").
    "shape": [
        "What shape is the {ref} object?",
        "Which shape is the {ref} object?",
        "What is the shape of the {ref} object?",
        "What form does the {ref} object have?",
    ],
    "count_all": [
        "How many shapes are there?",
        "How many objects are in the image?",
        "How many shapes can you see?",
        "Count the shapes.",
    ],
    "count_shape": [
        "How many {shape}s are there?",
        "How many {shape}s can you see?",
        "Count the {shape}s.",
    ],
    "count_color": [
        "How many {color} shapes are there?",
        "How many {color} objects can you see?",
        "Count the {color} shapes.",
    ],
    # {ref}: colour and shape, with size only when needed ("red circle", "small red circle").
    "position": [
        "Where is the {ref}?",
        "Where is the {ref} located?",
        "In which part of the image is the {ref}?",
        "What is the position of the {ref}?",
    ],
    "relation_left": ["Is the {a} left of the {b}?", "Is the {a} to the left of the {b}?"],
    "relation_right": ["Is the {a} right of the {b}?", "Is the {a} to the right of the {b}?"],
    "relation_above": ["Is the {a} above the {b}?", "Is the {a} higher than the {b}?"],
    "relation_below": ["Is the {a} below the {b}?", "Is the {a} lower than the {b}?"],
    # {a_ref}: colour and shape with its article ("a red circle", "an orange square").
    "exist": [
        "Is there {a_ref}?",
        "Is there {a_ref} in the image?",
        "Do you see {a_ref}?",
        "Does the image contain {a_ref}?",
    ],
}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    row: int  # 0..2, top to bottom
    col: int  # 0..2, left to right

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]  # in reading order (top-to-bottom, left-to-right)

    def signature(self) -> tuple:
        """What makes two scenes "the same" for the train/test split (ignores jitter and tint)."""
        return tuple(sorted((o.shape, o.color, o.size, o.row, o.col) for o in self.objects))


def position_name(row: int, col: int) -> str:
    """Grid cell name: "top left", "middle right", ..., and plain "center" for the middle cell."""
    if (row, col) == (1, 1):
        return "center"
    return f"{ROWS[row]} {COLUMNS[col]}"


def sample_scene(rng: random.Random, max_objects: int = 4) -> Scene:
    """1..max_objects shapes with independent uniform attributes, in distinct grid cells."""
    n = rng.randint(1, max_objects)
    cells = sorted(rng.sample(range(9), n))  # sorted = reading order
    objects = tuple(
        ShapeObject(
            shape=rng.choice(SHAPES),
            color=rng.choice(list(COLORS)),
            size=rng.choice(SIZES),
            row=cell // 3,
            col=cell % 3,
        )
        for cell in cells
    )
    return Scene(objects)


def caption(scene: Scene) -> str:
    """Canonical caption: "a small red circle, a large blue square and a small green triangle"."""
    parts = [f"a {o.size} {o.color} {o.shape}" for o in scene.objects]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def render_scene(scene: Scene, rng: random.Random, image_size: int = 128) -> tuple[Image.Image, dict]:
    """Draw the scene with random colour/position jitter; also return its JSON metadata.

    The metadata lists each object's exact bounding box [x0, y0, x1, y1) in pixels and its RGB.
    """
    bg = tuple(c + rng.randint(-_BACKGROUND_JITTER, _BACKGROUND_JITTER) for c in _BACKGROUND)
    ss = _SUPERSAMPLE
    canvas = Image.new("RGB", (image_size * ss, image_size * ss), bg)
    draw = ImageDraw.Draw(canvas)
    cell = image_size / 3
    margin = max(1, round(cell * _CELL_MARGIN))
    meta_objects = []
    for obj in scene.objects:
        side = round(cell * _SIZE_FRACTION[obj.size])
        # Cell bounds in whole pixels; the shape moves freely inside them, minus the margin.
        cx0, cx1 = round(obj.col * cell), round((obj.col + 1) * cell)
        cy0, cy1 = round(obj.row * cell), round((obj.row + 1) * cell)
        x0 = rng.randint(cx0 + margin, max(cx0 + margin, cx1 - margin - side))
        y0 = rng.randint(cy0 + margin, max(cy0 + margin, cy1 - margin - side))
        rgb = tuple(min(255, max(0, c + rng.randint(-_COLOR_JITTER, _COLOR_JITTER))) for c in COLORS[obj.color])
        _draw_shape(draw, obj.shape, x0 * ss, y0 * ss, (x0 + side) * ss - 1, (y0 + side) * ss - 1, rgb)
        meta_objects.append(
            {
                **asdict(obj),
                "position": obj.position,
                "bbox": [x0, y0, x0 + side, y0 + side],
                "rgb": list(rgb),
            }
        )
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX) if ss > 1 else canvas
    return image, {"background": list(bg), "objects": meta_objects}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, x1: int, y1: int, rgb) -> None:
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=rgb)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=rgb)
    elif shape == "triangle":  # pointing up, filling its box
        draw.polygon([(mx, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif shape == "diamond":
        draw.polygon([(mx, y0), (x1, my), (mx, y1), (x0, my)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


# --- questions ------------------------------------------------------------------------------------
# Each maker returns (question, answer) or None when the scene has no unambiguous question of its kind.

QA = tuple[str, str]


def _unique_ref(scene: Scene, obj: ShapeObject, attrs: Sequence[str]) -> str | None:
    """Shortest description of `obj` by `attrs` (adding size if needed) that matches it alone."""
    for keys in (tuple(attrs), ("size", *attrs)):
        matches = [o for o in scene.objects if all(getattr(o, k) == getattr(obj, k) for k in keys)]
        if len(matches) == 1:
            return " ".join(getattr(obj, k) for k in keys)
    return None


def _referable(scene: Scene, attrs: Sequence[str]) -> list[tuple[ShapeObject, str]]:
    out = []
    for o in scene.objects:
        ref = _unique_ref(scene, o, attrs)
        if ref is not None:
            out.append((o, ref))
    return out


def _ask_caption(scene: Scene, rng: random.Random) -> QA | None:
    return rng.choice(TEMPLATES["caption"]), caption(scene)


def _ask_color(scene: Scene, rng: random.Random) -> QA | None:
    options = _referable(scene, ["shape"])
    if not options:
        return None
    obj, ref = rng.choice(options)
    return rng.choice(TEMPLATES["color"]).format(ref=ref), obj.color


def _ask_shape(scene: Scene, rng: random.Random) -> QA | None:
    options = _referable(scene, ["color"])
    if not options:
        return None
    obj, ref = rng.choice(options)
    return rng.choice(TEMPLATES["shape"]).format(ref=ref), obj.shape


def _ask_count(scene: Scene, rng: random.Random) -> QA | None:
    what = rng.choice(("all", "shape", "color"))
    if what == "all":
        return rng.choice(TEMPLATES["count_all"]), str(len(scene.objects))
    # Half the time ask about something present, so answers are not mostly "0".
    present = [getattr(o, what) for o in scene.objects]
    pool = SHAPES if what == "shape" else tuple(COLORS)
    value = rng.choice(present) if rng.random() < 0.5 else rng.choice(pool)
    question = rng.choice(TEMPLATES[f"count_{what}"]).format(**{what: value})
    return question, str(present.count(value))


def _ask_position(scene: Scene, rng: random.Random) -> QA | None:
    options = _referable(scene, ["color", "shape"])
    if not options:
        return None
    obj, ref = rng.choice(options)
    return rng.choice(TEMPLATES["position"]).format(ref=ref), obj.position


def _ask_relation(scene: Scene, rng: random.Random) -> QA | None:
    options = _referable(scene, ["color", "shape"])
    if len(options) < 2:
        return None
    (a, a_ref), (b, b_ref) = rng.sample(options, 2)
    # Distinct cells differ in row or column (or both); only ask along an axis where they differ.
    axes = [axis for axis, differs in (("x", a.col != b.col), ("y", a.row != b.row)) if differs]
    axis = rng.choice(axes)
    want_yes = rng.random() < 0.5  # pick the answer first: yes/no exactly balanced in expectation
    if axis == "x":
        true_rel = "left" if a.col < b.col else "right"
        rel = true_rel if want_yes else {"left": "right", "right": "left"}[true_rel]
    else:
        true_rel = "above" if a.row < b.row else "below"
        rel = true_rel if want_yes else {"above": "below", "below": "above"}[true_rel]
    question = rng.choice(TEMPLATES[f"relation_{rel}"]).format(a=a_ref, b=b_ref)
    return question, "yes" if want_yes else "no"


def _ask_exist(scene: Scene, rng: random.Random) -> QA | None:
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
        answer = "yes"
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        # Mostly hard negatives (right colour or right shape, not both) so both words must be read.
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        color, shape = rng.choice(near if near and rng.random() < 0.7 else absent)
        answer = "no"
    article = "an" if color[0] in "aeiou" else "a"
    return rng.choice(TEMPLATES["exist"]).format(a_ref=f"{article} {color} {shape}"), answer


_MAKERS: dict[str, Callable[[Scene, random.Random], QA | None]] = {
    "caption": _ask_caption,
    "color": _ask_color,
    "shape": _ask_shape,
    "count": _ask_count,
    "position": _ask_position,
    "relation": _ask_relation,
    "exist": _ask_exist,
}


def make_questions(
    scene: Scene,
    rng: random.Random,
    n: int,
    kinds: Sequence[str] = KINDS,
    kind_counts: Counter | None = None,
) -> list[tuple[str, str, str]]:
    """Up to `n` distinct (kind, question, answer) triples for the scene.

    Kinds asked least so far (in `kind_counts`, updated in place) go first, which keeps the kinds
    balanced over a dataset even though some scenes cannot have every kind (a lone shape has no
    relation question).
    """
    counts = kind_counts if kind_counts is not None else Counter()
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for _round in range(max(1, -(-n // len(kinds))) + 2):  # more rounds only when n > len(kinds)
        order = sorted(kinds, key=lambda k: (counts[k], rng.random()))
        for kind in order:
            if len(out) >= n:
                return out
            qa = _MAKERS[kind](scene, rng)
            if qa is None or qa[0] in seen:
                continue
            seen.add(qa[0])
            counts[kind] += 1
            out.append((kind, *qa))
    return out


# --- dataset --------------------------------------------------------------------------------------


def generate_shapes_dataset(
    out_dir: str | Path,
    n_train: int = 2000,
    n_test: int = 200,
    seed: int = 0,
    image_size: int = 128,
    questions_per_image: int = 4,
    kinds: Sequence[str] | None = None,
    max_objects: int = 4,
    turns_per_record: int = 1,
    image_after_question: bool = True,
) -> dict[str, Any]:
    """Write a shapes VQA dataset to `out_dir` and return a summary.

    Layout: `images/{train,test}/NNNNN.png`, `train.json`, `test.json` (LLaVA format, image paths
    relative to the JSON file), and `align.json`: the training records whose scene has a single
    object, for a first "alignment" stage (a model learns to read the image tokens at all far sooner
    when every question is about the only object in view; see recipes/shapes-tiny.yaml). Each record also has `kinds` (question kind of each gpt turn) and
    `scene` (background, and per object: shape, color, size, row, col, position, bbox, rgb).
    Prompt layout: by default every question is its own record (`turns_per_record=1`; 0 puts all of
    an image's questions in one multi-turn record) with the image *after* the question
    ("How many squares are there?\n<image>"), so the image tokens can attend to the question. In a
    diagnostic with perfect image features, a tiny LM trained from scratch on this layout reached
    92% held-out exact match in 1,500 steps, against 60% with the same questions image-first
    (bench/archive/diagnostics/shapes_learning.py, docs/training.md). Changing the layout does not change the scenes.

    Deterministic: the same arguments give byte-identical files. Test scenes never share a
    signature (shapes, colours, sizes, cells) with a training scene or with each other.
    """
    kinds = tuple(KINDS if kinds is None else kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ConfigError(f"question kinds must be a non-empty subset of {list(KINDS)}, got {list(kinds)}")
    if n_train < 0 or n_test < 0:
        raise ConfigError("n_train and n_test must be >= 0")
    if image_size < 48:
        raise ConfigError(f"image_size must be >= 48 (got {image_size}) for shapes to stay recognisable")
    if questions_per_image < 1:
        raise ConfigError("questions_per_image must be >= 1")
    if turns_per_record < 0:
        raise ConfigError("turns_per_record must be >= 0 (0: all of an image's questions in one record)")
    if not 1 <= max_objects <= 9:
        raise ConfigError("max_objects must be between 1 and 9")

    out = Path(out_dir)
    summary: dict[str, Any] = {"out_dir": str(out), "seed": seed, "image_size": image_size}
    train_signatures: set[tuple] = set()
    for split, n in (("train", n_train), ("test", n_test)):
        # Separate seed-derived streams, so the test draws do not depend on how many train draws ran.
        rng = random.Random(f"visprompt-shapes:{seed}:{split}")
        forbidden = train_signatures if split == "test" else None
        records, signatures = _generate_split(
            out,
            split,
            n,
            rng,
            image_size,
            questions_per_image,
            kinds,
            max_objects,
            forbidden,
            turns_per_record,
            image_after_question,
        )
        if split == "train":
            train_signatures = signatures
            align = [r for r in records if len(r["scene"]["objects"]) == 1]
            (out / "align.json").write_text(json_list_text(align), encoding="utf-8")
            summary["align"] = {
                "images": len({r["image"] for r in align}),
                "records": len(align),
                "json": str(out / "align.json"),
            }
        (out / f"{split}.json").write_text(json_list_text(records), encoding="utf-8")
        kind_counts = Counter(k for r in records for k in r["kinds"])
        answers = Counter(turn["value"] for r in records for turn in r["conversations"] if turn["from"] == "gpt")
        summary[split] = {
            "images": len({r["image"] for r in records}),
            "records": len(records),
            "questions": sum(kind_counts.values()),
            "kinds": {k: kind_counts.get(k, 0) for k in kinds},
            "yes": answers.get("yes", 0),
            "no": answers.get("no", 0),
            "json": str(out / f"{split}.json"),
        }
    return summary


def _generate_split(
    out: Path,
    split: str,
    n: int,
    rng: random.Random,
    image_size: int,
    questions_per_image: int,
    kinds: Sequence[str],
    max_objects: int,
    forbidden: set[tuple] | None,
    turns_per_record: int = 0,
    image_after_question: bool = False,
) -> tuple[list[dict], set[tuple]]:
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(max(n - 1, 0))))
    kind_counts: Counter = Counter()
    signatures: set[tuple] = set()
    records = []
    for i in range(n):
        for _attempt in range(10_000):
            scene = sample_scene(rng, max_objects)
            sig = scene.signature()
            # Test scenes must be new (vs train and vs each other); train may repeat scenes.
            if forbidden is not None and (sig in forbidden or sig in signatures):
                continue
            # With few kinds allowed, a scene may admit no unambiguous question: draw another.
            qas = make_questions(scene, rng, questions_per_image, kinds, kind_counts)
            if qas:
                break
        else:
            raise DatasetError(
                f"could not find {n} {split} scenes distinct from the training scenes with a question to ask"
            )
        signatures.add(sig)
        image, scene_meta = render_scene(scene, rng, image_size)
        name = f"{i:0{width}d}.png"
        image.save(image_dir / name, format="PNG", optimize=False)
        per = turns_per_record or len(qas)
        chunks = [qas[k : k + per] for k in range(0, len(qas), per)]
        for c, chunk in enumerate(chunks):
            conversations = []
            for j, (_kind, question, answer) in enumerate(chunk):
                if j == 0:
                    question = f"{question}\n<image>" if image_after_question else f"<image>\n{question}"
                conversations.append({"from": "human", "value": question})
                conversations.append({"from": "gpt", "value": answer})
            records.append(
                {
                    "id": f"{split}-{i:0{width}d}" + (f"-{c}" if len(chunks) > 1 else ""),
                    "image": f"images/{split}/{name}",
                    "conversations": conversations,
                    "kinds": [kind for kind, _, _ in chunk],
                    "scene": scene_meta,
                }
            )
    return records, signatures


def scene_from_record(record: dict | Any) -> Scene:
    """Rebuild the `Scene` stored in a generated record (a dict, or a `LlavaRecord` via `.extra`)."""
    meta = record["scene"] if isinstance(record, dict) else record.extra["scene"]
    return Scene(tuple(ShapeObject(o["shape"], o["color"], o["size"], o["row"], o["col"]) for o in meta["objects"]))


def answer_question(scene: Scene, kind: str, question: str) -> str | None:
    """Re-derive the answer to a generated question from the scene alone (used to check the data).

    Parses the question back against the templates; None if it matches no template of `kind`.
    """
    for key, templates in TEMPLATES.items():
        if key.split("_")[0] != kind:
            continue
        for template in templates:
            fields = _match_template(template, question)
            if fields is None:
                continue
            return _answer_from_fields(scene, key, fields)
    return None


def _match_template(template: str, text: str) -> dict[str, str] | None:
    pattern = re.escape(template)
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[a-z ]+?)", pattern)
    m = re.fullmatch(pattern, text)
    if m is None or not all(_valid_field(k, v) for k, v in m.groupdict().items()):
        return None
    return m.groupdict()


def _valid_field(name: str, value: str) -> bool:
    # Lazy regex groups can swallow template words ("red shape" as a {shape}); check the vocabulary.
    words = value.split()
    if name == "shape":
        return value in SHAPES
    if name == "color":
        return value in COLORS
    if name == "a_ref":
        return len(words) == 3 and words[0] in ("a", "an") and words[1] in COLORS and words[2] in SHAPES
    return bool(words) and all(w in SIZES or w in COLORS or w in SHAPES for w in words)


def _find(scene: Scene, ref: str) -> ShapeObject | None:
    words = ref.split()
    matches = [o for o in scene.objects if all(w in (o.size, o.color, o.shape) for w in words)]
    return matches[0] if len(matches) == 1 else None


def _answer_from_fields(scene: Scene, key: str, f: dict[str, str]) -> str | None:
    objs = scene.objects
    if key == "caption":
        return caption(scene)
    if key in ("color", "shape", "position"):
        obj = _find(scene, f["ref"])
        return None if obj is None else {"color": obj.color, "shape": obj.shape, "position": obj.position}[key]
    if key == "count_all":
        return str(len(objs))
    if key == "count_shape":
        return str(sum(o.shape == f["shape"] for o in objs))
    if key == "count_color":
        return str(sum(o.color == f["color"] for o in objs))
    if key.startswith("relation_"):
        a, b = _find(scene, f["a"]), _find(scene, f["b"])
        if a is None or b is None:
            return None
        rel = key.split("_", 1)[1]
        truth = {
            "left": a.col < b.col,
            "right": a.col > b.col,
            "above": a.row < b.row,
            "below": a.row > b.row,
        }
        return "yes" if truth[rel] else "no"
    if key == "exist":
        color, shape = f["a_ref"].split()[1:]
        return "yes" if any(o.color == color and o.shape == shape for o in objs) else "no"
    return None


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Generate the synthetic shapes VQA dataset (LLaVA format).")
    parser.add_argument("out_dir")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--questions-per-image", type=int, default=4)
    args = parser.parse_args(argv)
    summary = generate_shapes_dataset(
        args.out_dir, args.n_train, args.n_test, args.seed, args.image_size, args.questions_per_image
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    _main()
