"""Small models and distillers for the training-loop tests (milliseconds per step on a CPU)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DataConfig, OptimConfig, SyntheticConfig
from pipeline.data import DataBundle, load_data
from pipeline.distill.base import Distiller
from pipeline.training import History, fit, make_loader

DATA = DataConfig(batch_size=16, num_classes=4, synthetic=SyntheticConfig(train_size=60, test_size=16))
OPTIM = OptimConfig(epochs=2, lr=0.05, milestones=[1])  # 3 steps per epoch: 54 training samples, batch 16


class TinyNet(nn.Module):
    """Small enough for milliseconds per step, with BatchNorm and dropout so that RNG and buffers matter."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1)))


class Scripted(Distiller):
    """Cross-entropy training with hooks to fail at a chosen step (1-based count of forward calls)."""

    requires_teacher = False

    def __init__(self, student, fail_at: int = 0, failure: str = "crash"):
        super().__init__(student, None)
        self.fail_at, self.failure, self.calls = fail_at, failure, 0
        self.seen_extra: list = []
        self.dtypes: dict[str, torch.dtype] = {}

    def forward(self, images, targets, *extra):
        self.seen_extra.append(extra)
        return self.losses(images, targets)

    def losses(self, images, targets):
        self.calls += 1
        if self.calls == self.fail_at and self.failure == "crash":
            raise KeyboardInterrupt("simulated kill")
        if self.calls == self.fail_at and self.failure == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.calls == self.fail_at and self.failure == "cpu_oom":  # what torch's CPU allocator raises
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                "to allocate 1207959552 bytes. Error code 12 (Cannot allocate memory)"
            )
        logits = self.student(images)
        self.dtypes["logits"] = logits.dtype
        with torch.autocast(images.device.type, enabled=False):  # an fp32 island, as KDiffusion's chain
            fp32 = F.cross_entropy(logits.float(), targets)
            self.dtypes["fp32_island"] = fp32.dtype
        bad = torch.tensor(float("nan")) if self.calls == self.fail_at and self.failure == "nan" else 0.0
        return logits, {"ce": fp32, "aux": 0.0 * logits.float().mean() + bad}


def count_compiled_calls(monkeypatch, compile_for_real: bool = True) -> list[int]:
    """Wrap what ``torch.compile`` returns in a call counter: one entry per compile request, its calls so far.

    Lets a test tell that compiled code ran, not only that ``training.compile`` was accepted (a loop that ignored
    the option would pass any test of its results). ``compile_for_real=False`` hands back the callable
    uncompiled, so the routing is checked on a CPU without a compiler toolchain's minutes.
    """
    real, counts = torch.compile, []

    def spy(fn, **kwargs):
        compiled = real(fn, **kwargs) if compile_for_real else fn
        counts.append(0)
        index = len(counts) - 1

        def counted(*args, **kw):
            counts[index] += 1
            return compiled(*args, **kw)

        return counted

    monkeypatch.setattr(torch, "compile", spy)
    return counts


@functools.cache
def tiny_data() -> DataBundle:
    return load_data(DATA, seed=0)


def fit_scripted(
    data: DataBundle,
    training,
    *,
    scratch=None,
    fail_at: int = 0,
    failure: str = "crash",
    logdir=None,
    optim: OptimConfig = OPTIM,
    data_cfg: DataConfig = DATA,
    on_device: bool = False,
) -> tuple[Scripted, History]:
    """A Scripted TinyNet through the real loop and loaders on the CPU (seed 3), so a resumed or re-configured
    run can be compared with a reference run of the same call."""
    torch.manual_seed(0)
    distiller = Scripted(TinyNet(), fail_at, failure)
    history = fit(
        distiller,
        make_loader(data.dataset("train", augment=True), data_cfg, train=True, seed=3, on_device=on_device),
        make_loader(data.dataset("val"), data_cfg, train=False),
        optim,
        torch.device("cpu"),
        scratch=scratch,
        log=lambda _: None,
        seed=3,
        training=training,
        logdir=logdir,
    )
    return distiller, history
