"""Real photos that install with PyPI packages, for examples, tests and benches (no download).

scikit-image ships about 30 (`skimage.data`: astronaut, chelsea the cat, coffee, rocket, the
cameraman, a horse silhouette, the Hubble deep field, a stereo pair of a motorcycle, ...);
scikit-learn ships two JPEGs (china, a temple, and flower), read here straight from its package
folder, without importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image

from ..errors import DatasetError

SKLEARN_PHOTOS = ("china", "flower")
# Names that are not plain functions of skimage.data returning one RGB or grey image.
_SKIMAGE_SPECIAL = {"motorcycle": "stereo_motorcycle"}


def sample_photo(name: str) -> Image.Image:
    """An RGB PIL image of a packaged photo: a `skimage.data` name ("astronaut", "chelsea",
    "coffee", "rocket", "camera", "horse", "hubble_deep_field"), "motorcycle" (the left image of
    skimage's stereo pair), or a scikit-learn sample ("china", "flower")."""
    import numpy as np

    if name in SKLEARN_PHOTOS:
        spec = importlib.util.find_spec("sklearn")
        if spec is None or not spec.submodule_search_locations:
            raise DatasetError(f"the {name!r} photo ships with scikit-learn: pip install scikit-learn")
        path = Path(spec.submodule_search_locations[0], "datasets", "images", f"{name}.jpg")
        with Image.open(path) as img:
            return img.convert("RGB")
    try:
        from skimage import data
    except ImportError:
        raise DatasetError(f"the {name!r} photo ships with scikit-image: pip install scikit-image") from None
    getter = getattr(data, _SKIMAGE_SPECIAL.get(name, name), None)
    if getter is None:
        raise DatasetError(f"no packaged photo named {name!r}")
    arr = getter()
    if isinstance(arr, tuple):  # a stereo pair (left, right, disparity)
        arr = arr[0]
    arr = np.asarray(arr)
    if arr.dtype == bool:  # a silhouette: black shape on white
        arr = np.where(arr, 255, 0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def side_by_side(images: list[Image.Image], height: int | None = None) -> Image.Image:
    """One image of `images` pasted left to right at a common height (a scene with several objects)."""
    height = height or min(im.height for im in images)
    resized = [im.convert("RGB").resize((max(1, round(im.width * height / im.height)), height)) for im in images]
    out = Image.new("RGB", (sum(im.width for im in resized), height), (255, 255, 255))
    x = 0
    for im in resized:
        out.paste(im, (x, 0))
        x += im.width
    return out
