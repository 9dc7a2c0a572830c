"""visprompt: give a language model eyes."""

from .errors import ConfigError, DatasetError, ImageError, ModelLoadError, ModelNotFoundError, VispromptError

__version__ = "0.1.0"


def load(model: str = "starter", **kwargs):
    """Load a model reference (folder, hub id, `starter`, or `openai:MODEL` with `base_url=` and
    `api_key=`) as an `Assistant` with ask/describe/generate/story."""
    from .tasks.assistant import Assistant

    return Assistant.load(model, **kwargs)


def story(images, turns: int | None = None, model: str = "starter", **kwargs):
    """Tell a story from pictures on `model` (see `Assistant.story`); returns the `Story`."""
    state = kwargs.pop("state", None)
    sampling = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("device", "base_url", "api_key")}
    return load(model, **kwargs).story(images, turns=turns, state=state, **sampling)


__all__ = [
    "load",
    "story",
    "VispromptError",
    "ImageError",
    "ModelNotFoundError",
    "ModelLoadError",
    "ConfigError",
    "DatasetError",
    "__version__",
]
