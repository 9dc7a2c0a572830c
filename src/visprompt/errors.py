"""The package's own exceptions.

Every error a user can cause (bad image, missing model, bad config) is a `VispromptError`; the CLI
prints its message on one line and exits with code 2. Anything else is a bug (exit code 1).
"""


class VispromptError(Exception):
    """Base class: a problem with the user's input, not a bug in visprompt."""


class ImageError(VispromptError, ValueError):
    """The input is not a usable image (not an image, truncated, too large, unsupported source)."""


class ModelNotFoundError(VispromptError):
    """A model reference could not be resolved to a local folder (and the hub is unreachable)."""


class ConfigError(VispromptError, ValueError):
    """A config file or a `--set key=value` override is invalid."""


class DatasetError(VispromptError, ValueError):
    """A dataset file is missing or not in the expected (LLaVA) format."""
