"""Datasets by name, split into train / held-out val / test, with each recipe's transforms.

A dataset builder returns raw sources (images without transforms) and their facts; this module
adds the seeded held-out split and the transforms, so every dataset gets the same protocol:
tune on ``val`` (a slice of the training split), report on ``test``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import Dataset, Subset

from pipeline.config import DataConfig
from pipeline.data.transforms import build_transform
from pipeline.errors import ConfigError
from pipeline.registry import Registry

Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class DataInfo:
    """What a model trained on the data must remember (it is saved in checkpoint metadata)."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    recipe: Literal["cifar", "imagenet"]
    color: Literal["rgb", "gray"] = "rgb"  # gray: three equal channels; deployed models convert photos to grayscale


@dataclass(frozen=True)
class RawData:
    """Sources yield ``(image, label)`` with no transform; images are CHW uint8 tensors or PIL images."""

    train: Dataset
    test: Dataset
    info: DataInfo


DATASETS: Registry[Callable[[DataConfig], RawData]] = Registry("dataset")


class Transformed(Dataset):
    def __init__(self, source: Dataset, transform: Callable):
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, label = self.source[index]
        return self.transform(image), label


class WithIndices(Dataset):
    """Yields ``(image, label, index)``: methods with per-sample state (CRD's memory bank) need the index."""

    def __init__(self, source: Dataset):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, label = self.source[index]
        return image, label, index


# Usable range of each numeric data setting (None, where allowed, means "the dataset's own"). The upper
# bounds are far beyond any real run; they turn a typo like 10**12 into an error instead of an allocation.
MINIMUMS = {
    "batch_size": 1,
    "eval_batch_size": 1,
    "workers": 0,
    "prefetch_factor": 1,
    "num_classes": 2,
    "image_size": 8,
    "train_subset": 2,
    "split_seed": 0,
}
MAXIMUMS = {
    "batch_size": 1 << 20,
    "eval_batch_size": 1 << 20,
    "workers": 256,
    "prefetch_factor": 1024,
    "num_classes": 1 << 20,
    "image_size": 8192,
    "train_subset": 100_000_000,
    "split_seed": 2**32 - 1,
}
SYNTHETIC_MAX = {"train_size": 10_000_000, "test_size": 10_000_000, "seed": 2**32 - 1}


def check_data_config(cfg: DataConfig) -> None:
    """Refuse settings the loaders would reject mid-run, before any stage starts."""
    for key, minimum in MINIMUMS.items():
        value = getattr(cfg, key)
        if value is not None and not minimum <= value <= MAXIMUMS[key]:
            raise ConfigError(f"data.{key} must be at least {minimum} and at most {MAXIMUMS[key]}, got {value}")
    _check_val_fraction(cfg.val_fraction)
    for key, maximum in SYNTHETIC_MAX.items():
        value, minimum = getattr(cfg.synthetic, key), 0 if key == "seed" else 1
        if not minimum <= value <= maximum:
            raise ConfigError(f"data.synthetic.{key} must be at least {minimum} and at most {maximum}, got {value}")
    if cfg.dataset == "synthetic" and cfg.root is not None:
        # Ignoring it would train on generated images while the user believes the run used their data.
        raise ConfigError(
            f"--data-root / data.root is set ({cfg.root}) but the dataset is 'synthetic', which reads no files; "
            "name your dataset with --set data.dataset=cifar100|imagenet100|imagefolder, or drop --data-root"
        )
    from pipeline.data.small_images import check_recipe_options

    check_recipe_options(cfg)


def _check_val_fraction(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {value}")


class DataBundle:
    """The three splits of one dataset; ``dataset(split, augment)`` gives a ready torch Dataset."""

    def __init__(self, raw: RawData, val_fraction: float, seed: int, train_subset: int | None = None):
        _check_val_fraction(val_fraction)
        self.raw = raw
        self.info = raw.info
        order = torch.randperm(len(raw.train), generator=torch.Generator().manual_seed(seed)).tolist()
        order = order[:train_subset] if train_subset else order  # a quick run's seeded share of the split
        n_val = round(len(order) * val_fraction)
        self._indices = {"val": sorted(order[:n_val]), "train": sorted(order[n_val:])}

    def source(self, split: Split) -> Dataset:
        if split == "test":
            return self.raw.test
        return Subset(self.raw.train, self._indices[split])

    def dataset(self, split: Split, augment: bool = False) -> Dataset:
        return Transformed(self.source(split), build_transform(self.info, train=augment))


def _load_builtin() -> None:
    from pipeline.data import cifar, folders, idx, synthetic  # noqa: F401


def dataset_names() -> list[str]:
    _load_builtin()
    return DATASETS.names()


def load_data(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Build the named dataset; the held-out split (and ``train_subset``'s share) depends only on the dataset
    size and ``data.split_seed``, or the run's ``seed`` when that is unset.

    Pinning ``split_seed`` lets runs of several seeds share one split, so a teacher trained at one seed
    never saw another seed's val images."""
    _load_builtin()
    raw = DATASETS.get(cfg.dataset)(cfg)
    if cfg.recipe not in ("auto", raw.info.recipe):
        raise ConfigError(
            f"dataset {cfg.dataset} is trained with the {raw.info.recipe} recipe; data.recipe={cfg.recipe} applies "
            "to folder datasets (imagefolder, imagenet100)"
        )
    split_seed = seed if cfg.split_seed is None else cfg.split_seed
    return DataBundle(raw, cfg.val_fraction, split_seed, cfg.train_subset)
