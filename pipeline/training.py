"""The training loop every training stage uses (teacher and student alike).

It trains a :class:`Distiller` for a fixed recipe, evaluates on the held-out split each epoch, and
keeps a resume checkpoint in the stage's scratch folder so that a crash loses at most one epoch.
The final model is the last epoch's (never selected on the test set).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.config import DataConfig, OptimConfig
from pipeline.distill import Distiller
from pipeline.errors import PipelineError
from pipeline.progress import progress_bar

RESUME_FILE = "resume.pt"


class NonFiniteLossError(PipelineError):
    exit_code = 1


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)

    @property
    def last(self) -> dict:
        return self.epochs[-1] if self.epochs else {}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device {name!r} was requested but CUDA is not available; use --set device=cpu")
    return device


def make_loader(
    dataset: Dataset, cfg: DataConfig, train: bool, seed: int = 0, device: torch.device | None = None
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size if train else cfg.eval_batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > cfg.batch_size,
        num_workers=cfg.workers,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        generator=generator,
    )


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
    )


def lr_at(epoch: int, cfg: OptimConfig) -> float:
    """Learning rate for a (0-based) epoch: step decay at milestones, or cosine to zero."""
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / max(cfg.epochs, 1)))
    return cfg.lr * cfg.lr_decay ** sum(epoch >= m for m in cfg.milestones)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "eval") -> dict[str, float]:
    was_training = model.training
    model.eval()
    correct = total = 0
    loss = 0.0
    for images, targets in progress_bar(loader, desc=desc, leave=False):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        logits = model(images)
        loss += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(1) == targets).sum().item()
        total += targets.numel()
    model.train(was_training)
    return {"top1": 100.0 * correct / max(total, 1), "loss": loss / max(total, 1)}


def fit(
    distiller: Distiller,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    cfg: OptimConfig,
    device: torch.device,
    scratch: Path | None = None,
    log: Callable[[str], None] = print,
    desc: str = "train",
    seed: int = 0,
) -> History:
    """Train for ``cfg.epochs`` epochs, resuming from ``scratch`` if a checkpoint is there."""
    distiller.to(device)
    optimizer = build_optimizer(distiller.trainable_parameters(), cfg)
    history = History()
    start = 0
    resume = scratch / RESUME_FILE if scratch else None
    if resume is not None and resume.is_file():
        state = torch.load(resume, map_location=device, weights_only=True)
        distiller.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        history.epochs = state["history"]
        start = state["epoch"]
        log(f"{desc}: resumed after epoch {start} from {resume}")
    steps = len(train_loader)
    for epoch in range(start, cfg.epochs):
        lr = lr_at(epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if isinstance(train_loader.generator, torch.Generator):
            train_loader.generator.manual_seed(seed * 100_003 + epoch)  # shuffling depends on (seed, epoch) only
        distiller.train()
        sums: dict[str, float] = defaultdict(float)
        seen = correct = 0
        tic = time.perf_counter()
        bar = progress_bar(train_loader, desc=f"{desc} {epoch + 1}/{cfg.epochs}", total=steps)
        for step, batch in enumerate(bar):
            images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            # Methods with per-sample state (CRD) also get each sample's dataset index (pipeline.data.WithIndices).
            extra = {"indices": batch[2].to(device, non_blocking=True)} if distiller.needs_indices else {}
            distiller.set_progress(epoch + step / steps)
            logits, losses = distiller(images, targets, **extra)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                bad = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                raise NonFiniteLossError(
                    f"{desc}: non-finite loss at epoch {epoch + 1}, step {step + 1} ({bad}); "
                    "lower the learning rate or the loss weights"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = targets.numel()
            seen += n
            correct += (logits.detach().argmax(1) == targets).sum().item()
            for key, value in losses.items():
                sums[key] += value.item() * n
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        elapsed = time.perf_counter() - tic
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_top1": 100.0 * correct / max(seen, 1),
            "images_per_s": seen / max(elapsed, 1e-9),
            **{f"loss/{k}": v / max(seen, 1) for k, v in sums.items()},
        }
        if val_loader is not None:
            record.update({f"val_{k}": v for k, v in evaluate(distiller.student, val_loader, device).items()})
        history.epochs.append(record)
        log(
            f"{desc} epoch {epoch + 1}/{cfg.epochs}: "
            + " ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("epoch",))
        )
        if resume is not None:
            state = {
                "model": distiller.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "history": history.epochs,
                "epoch": epoch + 1,
            }
            torch.save(state, resume.with_suffix(".tmp"))
            resume.with_suffix(".tmp").replace(resume)
    return history
