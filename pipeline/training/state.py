"""Resume state: everything a killed run needs to continue as if it had never stopped.

One file, ``resume.pt`` in the stage's scratch folder, written by rank 0 at the end of every epoch and
every ``training.checkpoint_every`` steps: the distiller's state (student, method modules, buffers
such as memory banks), optimizer, LR schedule, AMP scaler, every rank's RNG states, the position
(epoch, step) and the metrics so far. It is written to a temporary name, synced and renamed, so a
kill at any moment leaves the previous state intact; it is read with ``weights_only=True``.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts.atomic import atomic_write
from pipeline.errors import CheckpointError

RESUME_FILE = "resume.pt"
FORMAT = 1


def capture_rng(device: torch.device) -> dict:
    """This process's RNG states (the data RNGs need none: see :mod:`pipeline.training.data`)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "gauss": [has_gauss, gauss]},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], *numpy["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_rng(seed: int) -> None:
    """Seed every RNG a training step may use (torch CPU and CUDA, python, numpy)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def save_state(path: Path, state: dict) -> None:
    """Write atomically (:func:`pipeline.artifacts.atomic.atomic_write`): a crash leaves the previous state or
    this one."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_state(path: Path) -> dict | None:
    """The saved state, or ``None`` when there is none; an unreadable file is an error naming the fix."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"cannot read the resume state {path} ({type(exc).__name__}: {exc}); delete it to restart the stage"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("format"), int) or state["format"] != FORMAT:
        raise CheckpointError(f"{path} is not resume state of this pipeline version; delete it to restart the stage")
    return state
