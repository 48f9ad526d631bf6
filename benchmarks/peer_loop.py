"""A plain distillation training loop, written the way the reference CIFAR codebases train (the baseline).

What makes it "plain", on purpose: a torchvision-style dataset that turns each uint8 HWC array into a PIL
image and runs the v1 transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize)
in DataLoader workers; a blocking ``.cuda()`` copy of every batch; a host read (``.item()``) of the loss
and the top-1 for every step's running averages; the teacher under ``torch.no_grad``; and SGD as a
per-parameter Python loop (``foreach=False``: what the reference codebases ran on the PyTorch releases
they were written for). It drives the same distiller modules as :func:`pipeline.training.fit`, so only
the loop around them differs. It is given persistent workers (the references restart them every
epoch), which can only flatter it.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


class PilCifar(Dataset):
    """CIFAR as torchvision stores it (N x H x W x C uint8), decoded to PIL per sample, v1 transforms."""

    def __init__(self, images: Tensor, labels: Tensor, mean: tuple, std: tuple):
        self.data = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())
        self.targets = [int(t) for t in labels]
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(self.data.shape[1], padding=4),  # 32 for CIFAR
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


class RunningMean:
    """The references' ``AverageMeter``: a running mean of host floats."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def update(self, value: float, n: int) -> None:
        self.total += value * n
        self.count += n

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)


def peer_loader(images: Tensor, labels: Tensor, mean: tuple, std: tuple, batch: int, workers: int) -> DataLoader:
    return DataLoader(
        PilCifar(images, labels, mean, std),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )


def peer_optimizer(params: list[torch.nn.Parameter], lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, foreach=False)


def peer_epoch(
    distiller: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    amp: torch.dtype | None = None,
) -> dict[str, float]:
    """One epoch; returns images/s (wall time of the whole epoch, data loading included) and the running means."""
    distiller.train()
    losses, top1 = RunningMean(), RunningMean()
    seen, tic = 0, time.perf_counter()
    for images, targets in loader:
        images, targets = images.float().to(device), targets.to(device)
        with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
            logits, terms = distiller(images, targets)
        loss = sum(value.float() for value in terms.values())
        n = images.shape[0]
        losses.update(loss.item(), n)
        top1.update((logits.argmax(1) == targets).float().mean().item() * 100, n)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += n
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"images_per_s": seen / (time.perf_counter() - tic), "loss": losses.mean, "top1": top1.mean}


def peer_images_per_s(
    distiller: torch.nn.Module,
    images: Tensor,
    labels: Tensor,
    mean: tuple,
    std: tuple,
    batch: int,
    workers: int,
    epochs: int,
    device: torch.device,
    amp: torch.dtype | None = None,
) -> float:
    """Train ``distiller`` for ``epochs`` peer epochs on ``images`` (uint8 N x C x H x W); the last epoch's images/s
    (the earlier ones pay for warm-up)."""
    loader = peer_loader(images, labels, mean, std, batch, workers)
    distiller.to(device)
    optimizer = peer_optimizer(distiller.trainable_parameters())
    for _ in range(epochs):
        rate = peer_epoch(distiller, loader, optimizer, device, amp)["images_per_s"]
    return rate
