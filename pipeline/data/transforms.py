"""The augmentation and normalization of each training recipe (spec §10)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torchvision.transforms import v2

if TYPE_CHECKING:
    from pipeline.data import DataInfo


class CifarTransform:
    """The CIFAR recipe (zero-pad 4, random crop, random flip, normalize) on uint8 CHW tensors.

    The same operations as the torchvision v2 pipeline in a few tensor ops: about 4x less time per
    sample (benchmarks/bench_data.py), which decides whether loader workers keep a GPU busy on 32 px
    images. Any other input (e.g. PIL images) goes through the v2 pipeline.
    """

    def __init__(self, info: DataInfo, train: bool, padding: int = 4):
        self.size, self.train, self.padding = info.input_size, train, padding
        self.mean = torch.tensor(info.mean).view(3, 1, 1)
        self.std = torch.tensor(info.std).view(3, 1, 1)
        steps = [v2.RandomCrop(self.size, padding=padding), v2.RandomHorizontalFlip()] if train else []
        self.fallback = v2.Compose(
            [v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(info.mean, info.std)]
        )

    def __call__(self, image):
        is_uint8_chw = isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.dim() == 3
        if not (is_uint8_chw and tuple(image.shape[1:]) == (self.size, self.size)):
            return self.fallback(image)
        if self.train:
            p = self.padding
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            image = torch.nn.functional.pad(image, (p, p, p, p))[:, top : top + self.size, left : left + self.size]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return (image.float() / 255 - self.mean) / self.std


def build_transform(info: DataInfo, train: bool):
    """CIFAR recipe: pad-4 random crop + flip. ImageNet recipe: RandomResizedCrop + flip for training,
    resize to 256/224 of the input size and center crop for evaluation."""
    size = info.input_size
    if info.recipe == "cifar":
        return CifarTransform(info, train)
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
