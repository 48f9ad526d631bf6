"""Errors a user can cause, each with the exit status the CLI gives it.

Library code raises these; only the CLI turns them into a one-line message and an exit status, so a
user mistake never ends in a traceback. The edge runtime has its own base class,
:class:`exports.errors.EdgeError` (a missing optional package is one), which the CLI reports the same way.
"""

from __future__ import annotations

import contextlib
import errno


class PipelineError(Exception):
    """Base class: a problem with what the user asked for, stated with its fix."""

    exit_code = 2


class ConfigError(PipelineError):
    """An unknown or invalid option, preset, model, method or stage."""


class ArtifactError(PipelineError):
    """A stage input that is missing, modified, or produced by a failed stage."""


class CheckpointError(PipelineError):
    """A checkpoint that is missing, unreadable, or does not match the architecture."""


class DatasetError(PipelineError):
    """A dataset that is missing, incomplete, or does not match its recorded checksum."""


class UnreadableImageError(DatasetError):
    """One image file that PIL cannot decode (corrupt, truncated, empty, or a decompression bomb)."""

    def __init__(self, message: str, path: str = "", reason: str = ""):
        super().__init__(message)  # one argument, as a DataLoader worker re-raises it in the main process
        self.path, self.reason = path, reason

    @classmethod
    def of(cls, path: str, reason: str) -> UnreadableImageError:
        return cls(f"{path} is not a readable image ({reason}); remove or replace it", path, reason)


class CheckFailedError(PipelineError):
    """A stage ran but one of its numeric gates did not pass."""

    exit_code = 1


def one_line(exc: BaseException | str) -> str:
    """The error's message as one line.

    An error raised in a DataLoader worker reaches the main process with the worker's traceback folded into
    its message ("Caught DatasetError in DataLoader worker process 0. Original Traceback ..."); the user needs
    only the original message, which is the last line, after the exception's class name.
    """
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in str(exc):
        last = lines[-1]
        name, sep, message = last.partition(": ")
        return message if sep and name.endswith(type(exc).__name__) else last
    return " ".join(line.strip() for line in lines)


# How an allocation failure reads when a library raises it as a RuntimeError: torch's CPU allocator, CUDA and
# cuDNN/cuBLAS, an mmap (safetensors loading a checkpoint), ONNX Runtime's arena, C++'s bad_alloc.
_OUT_OF_MEMORY = (
    "out of memory",
    "ALLOC_FAILED",
    "Cannot allocate memory",
    "can't allocate memory",
    "Failed to allocate memory",
    "bad_alloc",
)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the machine running out of memory (a limit of the machine, not a bug: one line).
    ``torch.OutOfMemoryError`` says "out of memory" in its message."""
    return isinstance(exc, MemoryError) or any(text in str(exc) for text in _OUT_OF_MEMORY)


# A write the file system refused: a full disk, a quota, exhausted inodes, a read-only mount. Python's own files
# raise OSError with one of these codes; libraries that write through their own code say it in their message
# (safetensors: "No space left on device (os error 28)"; torch.save's zip writer: "unexpected pos N vs M").
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_NO_SPACE_TEXT = (
    "No space left on device",
    "Disk quota exceeded",
    "Read-only file system",
    "PytorchStreamWriter failed",  # torch's writer only: its reader's errors say PytorchStreamReader
    "unexpected pos ",
)


def no_space(exc: BaseException) -> bool:
    """Whether ``exc`` is the file system refusing a write (a limit of the machine, not a bug: one line)."""
    if isinstance(exc, OSError):
        return exc.errno in _NO_SPACE_ERRNOS
    return any(text in str(exc) for text in _NO_SPACE_TEXT)


def clipped(message: str, limit: int = 400) -> str:
    """``message`` cut to about ``limit`` characters for one line, keeping its start and its end (where a
    library's message often names the failing node or file)."""
    return message if len(message) <= limit else f"{message[: limit - 60]}...{message[-50:]}"


def short_path(path: object) -> str:
    """A path fit for one line of a message: a long one keeps its start and its file name."""
    text = str(path)
    return text if len(text) <= 120 else f"{text[:60]}...{text[-40:]} ({len(text)} characters)"


class UnsupportedModelError(PipelineError):
    """A model that a converter or runtime (timm, torch.onnx, onnx, ONNX Runtime, onnxconverter-common) cannot
    handle: exporting it needs another model, setting or library version, not a rerun."""


# Where an exception raised inside a conversion step means "this library cannot handle this model".
LIBRARY_PACKAGES = (
    "timm",
    "onnx",
    "onnxruntime",
    "onnxconverter_common",
    "onnxscript",
    "torch.onnx",
    "torch.export",
    "torch._export",
)
_CAUSE_LIMIT = 300
PROJECT_PACKAGES = ("pipeline", "stages", "exports")  # an exception whose innermost known frame is ours is a bug


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is a Ctrl-C or was raised while one unwound: tensorboard's writer, interrupted inside its
    flush, raises ``RuntimeError: release unlocked lock`` in place of the KeyboardInterrupt."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def raised_in_library(exc: BaseException, packages: tuple[str, ...] = LIBRARY_PACKAGES) -> str | None:
    """The module of ``packages`` that raised ``exc`` (its class's module, else the innermost of its frames that
    is a library's or ours), or None.

    Only these count: an exception raised in our own code (a bug) keeps its traceback. Frames of other packages
    are looked through, so numpy failing inside ONNX Runtime's calibration counts as ONNX Runtime's.
    """

    def ours(module: str) -> bool:
        return any(module == p or module.startswith(f"{p}.") for p in packages)

    if ours(type(exc).__module__):
        return type(exc).__module__
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    for module in reversed(frames):
        if ours(module):
            return module
        if module.split(".")[0] in PROJECT_PACKAGES:
            return None
    return None


@contextlib.contextmanager
def library_errors(stage: str, step: str, model: str):
    """Turn an exception that timm, torch.onnx, onnx or ONNX Runtime raises inside ``step`` into one line
    (:class:`UnsupportedModelError`, exit status 2) naming the stage, the step, the model and the cause.

    Our own errors, interrupts, memory and disk errors, a failed import (the CLI names the package to install),
    and exceptions raised outside those libraries (bugs) pass through unchanged.
    """
    try:
        yield
    except (PipelineError, OSError, MemoryError, ImportError):
        raise
    except Exception as exc:
        where = raised_in_library(exc)
        if where is None or hasattr(exc, "exit_code"):  # not a library's, or already a one-line error (EdgeError)
            raise
        cause = one_line(exc) or "(no message)"
        if len(cause) > _CAUSE_LIMIT:
            cause = cause[: _CAUSE_LIMIT - 3] + "..."
        raise UnsupportedModelError(
            f"{stage}: {step} of {model} failed: {type(exc).__name__}: {cause} (raised in {where})"
        ) from exc


# The packages every command needs (pyproject.toml's dependencies): module -> what to install.
CORE_DEPENDENCIES = {
    "torch": "torch>=2.4",
    "torchvision": "torchvision>=0.19",
    "timm": "timm>=1.0.9",
    "onnx": "onnx>=1.17",
    "onnxruntime": "onnxruntime>=1.27",
    "onnxscript": "onnxscript>=0.2",
    "onnxconverter_common": "onnxconverter-common>=1.14",
    "polygraphy": "polygraphy>=0.49",
    "safetensors": "safetensors>=0.4.3",
    "click": "click>=8.1",
    "yaml": "pyyaml>=6.0",
    "tqdm": "tqdm>=4.66",
    "numpy": "numpy>=1.26",
    "PIL": "pillow>=10.0",
    "tensorboard": "tensorboard>=2.16",
    "matplotlib": "matplotlib>=3.8",
}


def missing_dependency(exc: ImportError) -> str | None:
    """The one-line error for a core package that is missing or broken, or ``None`` when the failed import is
    not one of them (a bug in the project, which keeps its traceback).

    A broken package (torch without its CUDA libraries) raises a plain ImportError with no ``name``, so the
    package is also read from the frames the error passed through, deepest first.
    """
    modules = [exc.name or ""]
    tb = exc.__traceback__
    while tb is not None:
        modules.insert(1, str(tb.tb_frame.f_globals.get("__name__", "")))
        tb = tb.tb_next
    for module in modules:
        root = module.split(".")[0]
        if root in CORE_DEPENDENCIES:
            detail = one_line(f"{type(exc).__name__}: {exc}")[:200]
            return (
                f"{root} is not installed or cannot be imported ({detail}); "
                f"install it with: pip install '{CORE_DEPENDENCIES[root]}'"
            )
    return None
