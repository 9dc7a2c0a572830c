"""The package's own exceptions.

Every error a user can cause (bad image, missing model, bad config) is a `VispromptError`; the CLI
prints its message on one line and exits with code 2. Anything else is a bug (exit code 1).
"""


class VispromptError(Exception):
    """Base class: a problem with the user's input, not a bug in visprompt."""


class ImageError(VispromptError, ValueError):
    """The input is not a usable image (not an image, truncated, too large, unsupported source)."""


class VideoError(VispromptError, ValueError):
    """The input is not a usable video (missing, empty, corrupt, no video stream, unsupported codec)."""


class ModelNotFoundError(VispromptError):
    """A model reference could not be resolved to a local folder (and the hub is unreachable)."""


class ModelLoadError(ModelNotFoundError):
    """A model folder was found but cannot be loaded: truncated weights, weights that do not match its
    config.json, a tokenizer that does not load."""


class ConfigError(VispromptError, ValueError):
    """A config file or a `--set key=value` override is invalid."""


class DatasetError(VispromptError, ValueError):
    """A dataset file is missing or not in the expected (LLaVA) format."""


def one_line(reason: object, limit: int = 300) -> str:
    """`reason` (an exception or any text) as one line of at most `limit` characters, for messages."""
    text = " ".join(str(reason).split())
    if not text and isinstance(reason, BaseException):
        text = type(reason).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
