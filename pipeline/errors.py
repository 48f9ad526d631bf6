"""Errors a user can cause, each with the exit status the CLI gives it.

Library code raises these; only the CLI turns them into a one-line message and an exit status, so a
user mistake never ends in a traceback. The edge runtime has its own base class,
:class:`exports.errors.EdgeError` (a missing optional package is one), which the CLI reports the same way.
"""

from __future__ import annotations


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
