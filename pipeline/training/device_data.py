"""The training split held on the device and augmented there (``training.device_data``).

For small-image in-memory datasets (synthetic, CIFAR-100: 150 MB as uint8) the whole split fits in
GPU memory, so a batch can be gathered, randomly cropped, flipped and normalized by a few kernels
instead of by loader workers, a pinned-memory copy and a host-to-device transfer per step.

The data order is the :class:`~pipeline.training.data.EpochSampler`'s, as with the DataLoader path. The
random crop offsets and flips are not drawn from an RNG: each is a hash of (seed, epoch, sample index,
draw), computed with integer tensor ops on the device. So a sample's augmentation depends on that key
alone, whatever the batch, rank, device or resume point, and the same formula evaluated one sample at
a time in Python (:func:`sample_draws`) gives the same numbers. The draws differ from the DataLoader
path's (which seeds torch's CPU generator per sample): same distribution, other values, which is why the
setting enters the stage fingerprints.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from pipeline.errors import ConfigError
from pipeline.training.data import EpochSampler, mix_seed

MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so that a 32-bit value times one stays below 2**63 in int64 arithmetic.
_MUL = (0x7FEB352D, 0x6A09E667)
_DRAW_KEYS = (0x243F6A88, 0x85A308D3, 0x13198A2E)  # one constant per draw: crop top, crop left, flip
DRAWS = len(_DRAW_KEYS)


def _mix32(x):
    """A 32-bit integer finalizer (xor-shift, multiply); works on Python ints and int64 tensors alike."""
    x = x ^ (x >> 16)
    x = (x * _MUL[0]) & MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL[1]) & MASK32
    return x ^ (x >> 16)


def epoch_key(seed: int, epoch: int) -> tuple[int, int]:
    """The two 32-bit halves of the (seed, epoch) key that every sample's draws of that epoch start from."""
    key = mix_seed(seed, epoch)
    return key & MASK32, (key >> 32) & MASK32


def sample_draws(seed: int, epoch: int, index: int) -> list[int]:
    """The 32-bit draws of one sample, one at a time in plain Python: the reference for :func:`batch_draws`."""
    low, high = epoch_key(seed, epoch)
    base = _mix32(_mix32((index & MASK32) ^ low) ^ high)
    return [_mix32(base ^ key) for key in _DRAW_KEYS]


def draw_keys(device: torch.device) -> Tensor:
    return torch.tensor(_DRAW_KEYS, dtype=torch.long, device=device)


def batch_draws(seed: int, epoch: int, indices: Tensor, keys: Tensor | None = None) -> Tensor:
    """``(N, DRAWS)`` int64 draws in ``[0, 2**32)`` for the sample ``indices`` (on their device).

    ``keys`` (:func:`draw_keys` on that device) can be passed to spare a host-to-device copy per batch.
    """
    low, high = epoch_key(seed, epoch)
    base = _mix32(_mix32((indices.long() & MASK32) ^ low) ^ high)
    return _mix32(base[:, None] ^ (draw_keys(indices.device) if keys is None else keys))


def crop_flip(draws: Tensor, padding: int) -> tuple[Tensor, Tensor, Tensor]:
    """Crop offsets in ``[0, 2 * padding]`` (top, left) and the flip flag, from :func:`batch_draws` rows."""
    span = 2 * padding + 1
    return draws[:, 0] % span, draws[:, 1] % span, (draws[:, 2] >> 31) == 1


def augment(images: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int) -> Tensor:
    """Zero-pad, crop and flip a uint8 ``N x C x H x W`` batch in one gather; returns uint8, channels_last."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4).permute(0, 2, 3, 1)  # N, H+2p, W+2p, C
    rows = top[:, None] + torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + left[:, None]
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class DeviceLoader:
    """Stands in for the training DataLoader: ``(images, targets[, indices])`` batches made on ``device``.

    Iterating gives this rank's batches of the sampler's current epoch (from its start step), in the
    same order as the DataLoader path; ``sampler`` and ``len()`` behave as the DataLoader's.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        sampler: EpochSampler,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        seed: int,
        device: torch.device,
        padding: int = 4,
        with_indices: bool = False,
    ):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.sampler, self.seed, self.device = sampler, seed, device
        self.padding, self.with_indices = padding, with_indices
        self.batch_size = sampler.batch_size // sampler.world_size
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.keys = draw_keys(device)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        keys = list(self.sampler)
        if not keys:
            return
        epoch = keys[0][1]
        order = torch.tensor([index for index, _ in keys], dtype=torch.long).to(self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield self.batch(order[start : start + self.batch_size], epoch)

    def batch(self, indices: Tensor, epoch: int) -> tuple[Tensor, ...]:
        """The augmented, normalized batch of the samples ``indices`` (a device tensor) in ``epoch``."""
        top, left, flip = crop_flip(batch_draws(self.seed, epoch, indices, self.keys), self.padding)
        images = augment(self.images[indices], top, left, flip, self.padding)
        images = (images.float() / 255 - self.mean) / self.std  # CifarTransform's arithmetic, op for op
        targets = self.labels[indices]
        return (images, targets, indices) if self.with_indices else (images, targets)


def device_loader(dataset: Dataset, sampler: EpochSampler, seed: int, device: torch.device) -> DeviceLoader:
    """A :class:`DeviceLoader` for a training dataset built by :meth:`DataBundle.dataset` (optionally with indices).

    Only the CIFAR recipe over uint8 image tensors qualifies (synthetic, CIFAR-100); anything else (image
    folders, the ImageNet recipe) is a :class:`ConfigError` naming the setting.
    """
    from pipeline.data import Transformed, WithIndices
    from pipeline.data.transforms import CifarTransform

    with_indices = isinstance(dataset, WithIndices)
    inner = dataset.source if with_indices else dataset
    transform = getattr(inner, "transform", None)
    source = inner.source if isinstance(inner, Transformed) else None
    positions = None
    if isinstance(source, Subset):
        source, positions = source.dataset, torch.as_tensor(source.indices, dtype=torch.long)
    images, labels = getattr(source, "images", None), getattr(source, "labels", None)
    fits = (
        isinstance(transform, CifarTransform)
        and transform.train
        and isinstance(images, Tensor)
        and images.dtype == torch.uint8
        and images.dim() == 4
        and tuple(images.shape[2:]) == (transform.size, transform.size)
    )
    if not fits:
        raise ConfigError(
            "training.device_data=true needs an in-memory small-image dataset with the CIFAR recipe "
            "(synthetic or cifar100); set training.device_data=false for this dataset"
        )
    if positions is not None:
        images, labels = images[positions], torch.as_tensor(labels)[positions]
    mean, std = transform.mean.flatten().tolist(), transform.std.flatten().tolist()
    return DeviceLoader(
        images, torch.as_tensor(labels), sampler, mean, std, seed, device, transform.padding, with_indices
    )
