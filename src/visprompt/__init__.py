"""visprompt: give a language model eyes."""

from .errors import ConfigError, DatasetError, ImageError, ModelLoadError, ModelNotFoundError, VispromptError

__version__ = "0.1.0"


def load(model: str = "starter", **kwargs):
    """Load a model reference (folder, hub id or `starter`) as an `Assistant` with ask/describe/generate."""
    from .tasks.assistant import Assistant

    return Assistant.load(model, **kwargs)


__all__ = [
    "load",
    "VispromptError",
    "ImageError",
    "ModelNotFoundError",
    "ModelLoadError",
    "ConfigError",
    "DatasetError",
    "__version__",
]
