"""Training at scale: the loop every training stage uses, on one process or many (torchrun + DDP).

- :mod:`~pipeline.training.loop`: :func:`fit` and :func:`evaluate`, with the non-finite-loss and
  out-of-memory guards;
- :mod:`~pipeline.training.data`: a resumable, rank-aware data order and per-sample seeded augmentation;
- :mod:`~pipeline.training.device_data`: the training split held and augmented on the device;
- :mod:`~pipeline.training.state`: the full resume state, written atomically;
- :mod:`~pipeline.training.distributed`: the process group and the collectives the loop needs;
- :mod:`~pipeline.training.speed`: mixed precision, channels_last, torch.compile, CUDA graphs, SGD kernels,
  cuDNN, SyncBatchNorm;
- :mod:`~pipeline.training.monitor`: TensorBoard events, the epoch log line and the ETA.
"""

from __future__ import annotations

from pipeline.training.data import make_loader
from pipeline.training.distributed import resolve_device, world
from pipeline.training.loop import (
    History,
    NonFiniteLossError,
    TrainingOutOfMemoryError,
    build_optimizer,
    check_optim,
    evaluate,
    fit,
    lr_at,
)
from pipeline.training.state import RESUME_FILE

__all__ = [
    "RESUME_FILE",
    "History",
    "NonFiniteLossError",
    "TrainingOutOfMemoryError",
    "build_optimizer",
    "check_optim",
    "evaluate",
    "fit",
    "lr_at",
    "make_loader",
    "resolve_device",
    "world",
]
