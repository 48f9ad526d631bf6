"""The one way the project replaces a file in place: write a temporary sibling, fsync, rename, fsync the folder.

A reader (or a crash) then sees either the old file or the new one, never half of one. Stage folders are
made atomic as a whole by the store (build in staging, rename into place); this is for the single files
that live outside that scheme: resume state, caches, sweep records, the HTML report and a manifest amended
in place. ``tests/test_atomic.py`` checks that no other module renames a file into place. Standard library
only, so ``exports/`` may use it too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "plain_mode"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: os.umask can only be read by setting it


def plain_mode(path: str | Path) -> Path:
    """Give a file or folder that ``tempfile`` made (0600, 0700) the mode a plain ``open`` or ``mkdir`` gives, so a
    model, report or stage folder is readable by whoever the user's umask lets read their files (a service, a
    container build), not by its owner only. Best effort: a file system without modes (vfat, some network mounts)
    refuses ``chmod``, and the file is as usable there without it."""
    path = Path(path)
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_UMASK)
    return path


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Replace ``path`` with what ``write`` puts into the binary file it is given.

    A device, pipe or socket in its place (``/dev/stdout``, a FIFO) is written into, not replaced: a rename would
    put a regular file where the device node was (as root, in ``/dev``).
    """
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        with open(path, "wb") as f:
            write(f)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        plain_mode(tmp)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (a no-op where folders cannot be opened, e.g. on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
