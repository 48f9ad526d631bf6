"""The augmentation and normalization of each training recipe (spec §10)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torchvision.transforms import v2

if TYPE_CHECKING:
    from pipeline.data import DataInfo


def build_transform(info: DataInfo, train: bool) -> v2.Compose:
    """CIFAR recipe: pad-4 random crop + flip. ImageNet recipe: RandomResizedCrop + flip for training,
    resize to 256/224 of the input size and center crop for evaluation."""
    size = info.input_size
    if info.recipe == "cifar":
        steps = [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()] if train else []
    else:
        steps = (
            [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
            if train
            else [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
        )
    return v2.Compose([v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(info.mean, info.std)])


def eval_preprocess_spec(info: DataInfo) -> dict:
    """The evaluation preprocessing as plain data, for runtimes that do not have torchvision."""
    size = info.input_size
    resize = size if info.recipe == "cifar" else round(size * 256 / 224)
    return {"resize": resize, "crop": size, "mean": list(info.mean), "std": list(info.std), "scale": 1 / 255}
