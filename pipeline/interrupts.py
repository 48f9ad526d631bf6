"""Ctrl-C that lands inside an import: neither lost nor fatal.

Python's own handler raises KeyboardInterrupt wherever the signal lands, and inside ``import torch`` that goes
wrong two ways: torch's C extension imports numpy as an optional dependency and discards whatever that import
raises (the interrupt is lost and the run trains on), and an interrupt raised in a Python call made from
pybind11 during module set-up aborts the process (SIGABRT). So while an import runs, this handler only
remembers the signal and sends it again a moment later; the interrupt is raised once the import is over.
:func:`check` is the backstop at each stage's start. Standard library only: the entry point installs it
before any heavy import.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

RETRY_S = 0.05
_IMPORT_MACHINERY = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>")
_received = False


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename in _IMPORT_MACHINERY:
            return True
        frame = frame.f_back
    return False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = True
    if _importing(frame):
        timer = threading.Timer(RETRY_S, os.kill, (os.getpid(), signal.SIGINT))
        timer.daemon = True
        timer.start()
        return
    raise KeyboardInterrupt


def catch() -> None:
    """Turn SIGINT into KeyboardInterrupt, even where the parent ignored it (a shell starts background jobs with
    SIGINT ignored, and Python keeps that)."""
    signal.signal(signal.SIGINT, _on_sigint)


def forget() -> None:
    """A new command in the same process (the tests run many) starts with no signal pending."""
    global _received
    _received = False


def check() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C arrived since :func:`catch` and was not raised or was swallowed."""
    if _received:
        raise KeyboardInterrupt
