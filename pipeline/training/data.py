"""Data order and augmentation that depend only on (seed, epoch, sample), never on how the run is executed.

The training sampler deals out one seeded permutation per epoch, a global batch at a time, across the
ranks (the role of ``DistributedSampler``, with ``set_epoch``), and can start in the middle of an
epoch. Every sample's augmentation draws from a torch RNG seeded from (seed, epoch, index). So the
batches a model sees are the same with any number of DataLoader workers, after a resume from any
step, and (as global batches) with any number of processes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.config import DataConfig
from pipeline.errors import ConfigError
from pipeline.training.distributed import world


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers; nearby inputs give unrelated seeds."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochSampler(Sampler[tuple[int, int]]):
    """This rank's share of a per-epoch permutation, as ``(index, epoch)`` keys for :class:`SeededSamples`.

    Each global batch of ``batch_size`` consecutive permutation entries is split round-robin across the
    ``world_size`` ranks, so the union of the ranks' k-th batches is the single-process k-th batch. A
    trailing partial global batch is dropped, which keeps every rank at the same step count.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ConfigError(
                f"data.batch_size={batch_size} is the global batch and must be divisible by the number of "
                f"processes ({world_size})"
            )
        if size < batch_size:
            raise ConfigError(
                f"the training split has {size} samples, fewer than one batch (data.batch_size={batch_size}); "
                "lower data.batch_size"
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch)))
        order = order[self.start_step * self.batch_size : self.steps_per_epoch * self.batch_size]
        return iter([(index, self.epoch) for index in order[self.rank :: self.world_size].tolist()])

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch_size // self.world_size


class SeededSamples(Dataset):
    """Loads ``dataset[index]`` for an ``(index, epoch)`` key with the torch RNG seeded from the key.

    Augmentations must draw from torch's RNG (torchvision's do) to be reproducible; the caller's RNG
    state is restored afterwards, so loading in the main process does not disturb training randomness.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
            return self.dataset[index]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: disjoint, unpadded shards, so summed metrics count each sample once."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def make_loader(
    dataset: Dataset,
    cfg: DataConfig,
    train: bool,
    seed: int = 0,
    device: torch.device | None = None,
    on_device: bool = False,
) -> DataLoader:
    """The training loader (global ``cfg.batch_size`` split across ranks) or an evaluation loader.

    Under torchrun an evaluation loader gives each rank a disjoint shard; :func:`~pipeline.training.evaluate`
    sums the metrics over the ranks. Batches are tuples; items after ``(images, targets)`` go to the
    distiller as they are. ``on_device`` (``training.device_data``) makes the training loader a
    :class:`~pipeline.training.device_data.DeviceLoader` that holds the split on ``device``.
    """
    current = world()
    if train and on_device:
        from pipeline.training.device_data import device_loader

        sampler = EpochSampler(len(dataset), cfg.batch_size, seed, current.rank, current.size)
        return device_loader(dataset, sampler, seed, device or torch.device("cpu"))
    # data.workers is per machine; the processes on one node share it.
    workers = cfg.workers // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if cfg.workers else 0
    common = {
        "num_workers": workers,
        "pin_memory": device is not None and device.type == "cuda",
        "persistent_workers": workers > 0,
        "prefetch_factor": cfg.prefetch_factor if workers else None,
        # Worker seeds come from this generator, not the global RNG, which belongs to the training step.
        "generator": torch.Generator().manual_seed(seed),
    }
    if train:
        sampler = EpochSampler(len(dataset), cfg.batch_size, seed, current.rank, current.size)
        return DataLoader(
            SeededSamples(dataset, seed), batch_size=cfg.batch_size // current.size, sampler=sampler, **common
        )
    sampler = ShardSampler(len(dataset), current.rank, current.size) if current.is_distributed else None
    return DataLoader(dataset, batch_size=cfg.eval_batch_size, sampler=sampler, **common)
