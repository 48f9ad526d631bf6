"""What the ``export`` and ``engine`` stages share: the names of the exported files, the evaluation set in the
deployed model's own preprocessing, the run's label check and the engine's batch profile.

Both stages score their models the same way, so these live once in the library rather than in one stage
that the other imports.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from exports.metadata import DeployMeta
from exports.precisions import PRECISIONS
from exports.runtime import as_gray
from exports.trt_engine import BatchProfile
from pipeline.config import Config
from pipeline.data import Transformed
from pipeline.progress import progress_bar
from pipeline.training import make_loader
from stages.support.kit import bundle

ONNX_FILES = {name: spec.onnx_file for name, spec in PRECISIONS.items()}  # precision -> exported file


def deploy_transform(meta: DeployMeta) -> v2.Compose:
    """The model's evaluation preprocessing, for any image dataset; on PIL images it is exactly what the
    edge runtime computes."""
    return v2.Compose(
        [
            *([as_gray] if meta.color == "gray" else []),
            v2.Resize(meta.resize, antialias=True),  # before ToImage: PIL images are resized by PIL, as the
            v2.CenterCrop(meta.crop),  # edge runtime does (exports.runtime.preprocess)
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(meta.mean, meta.std),
        ]
    )


def label_mismatch(cfg: Config, meta: DeployMeta) -> str:
    """Why the run's test labels cannot score this model ('' when they can)."""
    info = bundle(cfg).info
    if info.num_classes != meta.num_classes:
        return f"dataset {info.name} has {info.num_classes} classes, the model {meta.num_classes}"
    if meta.class_names and list(info.class_names) != list(meta.class_names):
        return f"dataset {info.name} names its classes differently from the model"
    return ""


def eval_batches(cfg: Config, meta: DeployMeta, limit: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The evaluation set in batches: (images, labels), streamed so large test splits fit in memory."""
    source = bundle(cfg).source("test")
    if limit is not None:
        source = torch.utils.data.Subset(source, range(min(limit, len(source))))
    loader = make_loader(Transformed(source, deploy_transform(meta)), cfg.data, train=False)
    for images, labels in progress_bar(loader, desc="evaluation set", leave=False):
        yield images.numpy(), labels.numpy()


def engine_profile(cfg: Config, input_size: int) -> BatchProfile:
    e = cfg.engine
    return BatchProfile(e.min_batch, e.opt_batch, e.max_batch, input_size)


def read_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())
