"""The CIFAR-style recipe for a folder of small images, and a decode-once memory cache for it.

An ImageFolder gets the ImageNet recipe by default (RandomResizedCrop; resize 256/224 and center crop),
which crops most of a 32 px image away. With ``data.recipe=cifar`` each image is brought to the input
size once as the evaluation transform and the edge runtime do it (shorter side resized, center crop),
kept as a uint8 CHW tensor, and then trained with the CIFAR recipe (pad-4 random crop, flip): the fast
tensor path of :class:`~pipeline.data.transforms.CifarTransform`.

Decoding a PNG costs more than the whole CIFAR augmentation, so a small folder is decoded once, into
memory, the first time the data is loaded (``data.cache``: ``auto`` caches when the decoded splits fit
in :data:`AUTO_CACHE_BYTES`; ``always``; ``never``: decode on every read, in the loader workers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pipeline.config import DataConfig
from pipeline.data import DataInfo, RawData
from pipeline.data.synthetic import TensorImages
from pipeline.errors import ConfigError, DatasetError, UnreadableImageError
from pipeline.progress import progress_bar

RECIPES = ("auto", "cifar", "imagenet")
CACHE_MODES = ("auto", "always", "never")
SMALL_SIZE = 32  # the CIFAR recipe's input size when data.image_size is not set
AUTO_CACHE_BYTES = 2 * 2**30  # decoded uint8 bytes of both splits below which data.cache=auto caches


def check_recipe_options(cfg: DataConfig) -> None:
    if cfg.recipe not in RECIPES:
        raise ConfigError(f"unknown data.recipe {cfg.recipe!r}; choose one of: {', '.join(RECIPES)}")
    if cfg.cache not in CACHE_MODES:
        raise ConfigError(f"unknown data.cache {cfg.cache!r}; choose one of: {', '.join(CACHE_MODES)}")


class FittedImages(Dataset):
    """``(uint8 3 x size x size tensor, label)`` from a source of PIL images: shorter side resized to ``size``
    (bilinear, antialiased) and center-cropped, as :func:`stages.export.deploy_transform` does."""

    def __init__(self, source: Dataset, size: int):
        self.source, self.size = source, size
        self.fit: Callable = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.PILToTensor()])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.source[index]
        if isinstance(image, Image.Image):
            return self.fit(image), int(label)
        return TF.center_crop(TF.resize(image, self.size, antialias=True), self.size), int(label)


def decode_all(dataset: Dataset, desc: str = "decoding images") -> TensorImages:
    """Every image of ``dataset`` (uint8 CHW of one size) in one tensor, decoded once.

    Every unreadable file is named in one error, so that a folder with several is fixed in one pass.
    """
    images, labels, unreadable = [], [], []
    for i in progress_bar(range(len(dataset)), desc=desc, leave=False):
        try:
            image, label = dataset[i]
        except UnreadableImageError as exc:
            unreadable.append(exc)
            continue
        images.append(image)
        labels.append(label)
    if len(unreadable) == 1:
        raise unreadable[0]
    if unreadable:
        shown = ", ".join(exc.path for exc in unreadable[:5]) + (", ..." if len(unreadable) > 5 else "")
        raise DatasetError(
            f"{len(unreadable)} images are not readable; remove or replace them: {shown} "
            f"(the first: {unreadable[0].reason})"
        )
    return TensorImages(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


def with_small_image_recipe(raw: RawData, cfg: DataConfig) -> RawData:
    """``raw`` (PIL sources) served at ``data.image_size`` (default 32) px for the CIFAR recipe, cached
    in memory as ``data.cache`` says."""
    size = cfg.image_size or SMALL_SIZE
    train, test = FittedImages(raw.train, size), FittedImages(raw.test, size)
    decoded_bytes = (len(train) + len(test)) * 3 * size * size
    if cfg.cache == "always" or (cfg.cache == "auto" and decoded_bytes <= AUTO_CACHE_BYTES):
        train, test = decode_all(train, "decoding train images"), decode_all(test, "decoding test images")
    info = DataInfo(**{**raw.info.__dict__, "input_size": size, "recipe": "cifar"})
    return RawData(train, test, info)
