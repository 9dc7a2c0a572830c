"""The image input layer: safe loading (`load_image`) and encoder preprocessing (`ImagePreprocessor`)."""

from .loading import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageSource,
    image_fingerprint,
    load_image,
    read_image_bytes,
    to_rgb,
)

_PREPROCESS = (
    "CLIP_MEAN",
    "CLIP_STD",
    "HALF_MEAN",
    "HALF_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RESIZE_MODES",
    "AugmentPolicy",
    "ImagePreprocessor",
    "augment",
)


def __getattr__(name: str):
    # Preprocessing (and torch with it) loads when first asked for: loading an image needs neither.
    if name in _PREPROCESS:
        from . import preprocess

        return getattr(preprocess, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "load_image",
    "read_image_bytes",
    "image_fingerprint",
    "to_rgb",
    "ImageSource",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_BYTES",
    "ImagePreprocessor",
    "augment",
    "AugmentPolicy",
    "RESIZE_MODES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "HALF_MEAN",
    "HALF_STD",
]
