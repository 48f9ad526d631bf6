"""The edge runtime's errors: standard library only, so an app that embeds the runtime gets them too.

Each is a problem with a model file, an image or the installed packages, stated with its fix. They do
not derive from :class:`pipeline.errors.PipelineError` because the runtime must import without the
pipeline; the pipeline's CLI reports them exactly as it reports its own errors (one line, ``exit_code``).
"""

from __future__ import annotations

from pathlib import Path


class EdgeError(Exception):
    """Base class of the runtime's user-facing errors."""

    exit_code = 2


class MissingDependencyError(EdgeError):
    """An optional package is not installed; the message names the pip extra that provides it."""

    def __init__(self, package: str, extra: str | None = None, cause: BaseException | None = None):
        hint = f"pip install 'kdiffusion-pipeline[{extra}]'" if extra else f"pip install {package}"
        detail = f" ({cause})" if cause else ""
        super().__init__(f"{package} is required for this step but is not importable{detail}; install it with: {hint}")
        self.package = package
        self.extra = extra


class ModelFileError(EdgeError):
    """A model file that is missing, unreadable, or not exported by this pipeline."""

    @classmethod
    def not_a_file(cls, path) -> ModelFileError:
        """For a path that is not a regular file: missing, or a folder, a pipe, a device (which never ends)."""
        return cls(f"model file {path} {'is not a regular file' if Path(path).exists() else 'does not exist'}")


class ModelTooLargeError(EdgeError):
    """A model whose weights do not fit one ONNX file (protobuf's 2 GiB)."""


class ImageError(EdgeError):
    """An image file that is missing or cannot be decoded."""


class ProviderError(EdgeError):
    """An ONNX Runtime execution provider that is not available, or that the session did not use."""


class RunnerStateError(RuntimeError):
    """A runner used out of order (``infer`` before ``activate``, or activated twice): a programming error."""
