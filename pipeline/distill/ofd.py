"""OFD: partial L2 between connected student features and margin-clipped teacher pre-ReLU features.

Paper: B. Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019 -
https://arxiv.org/abs/1904.01866; official code clovaai/overhaul-distillation (``CIFAR-100/distiller.py``).

Each paired stage: a 1x1 conv + BN connector maps the student's pre-ReLU feature to the teacher's
channels; the teacher's pre-ReLU feature is clipped from below at a per-channel margin (the expected
negative response of the BN that makes it, ``E[x | x < 0]`` for ``x ~ N(beta, gamma^2)``, or ``-3 gamma``
when that is almost never negative); the loss is the squared error except where both the student is
below the target and the target is negative (those positions are all "off" after the ReLU). Stages are
weighted ``1 / 2^(deepest - i)``, summed over elements and averaged over the batch, then scaled by
``ofd_weight`` - all as in the official CIFAR code (``loss_distill.sum() / batch_size / 1000``; mdistiller
``OFD.LOSS.FEAT_WEIGHT 0.001``, ``CE_WEIGHT 1.0``, ``CONNECTOR.KERNEL_SIZE 1``).

The BN behind each teacher tap is found from the teacher's autograd graph
(:func:`~pipeline.distill.features.bn_before_taps`), so no per-architecture table is needed.

The official code runs the teacher in train mode (its BNs normalise with batch statistics); mdistiller
keeps it in eval mode. Here eval mode is the default and ``teacher_bn_train=True`` selects batch
statistics; the teacher's running statistics are never updated either way, and the choice is logged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill import register_method
from pipeline.distill.base import WEIGHT, Bound, Distiller
from pipeline.distill.features import bn_before_taps, match_spatial, paired_stage_taps, tap_channels, tapped_forward


def bn_margin(bn: nn.BatchNorm2d) -> Tensor:
    """Per-channel ``E[x | x < 0]`` for ``x ~ N(bias, weight^2)``; ``-3 |weight|`` where ``P(x < 0) <= 0.001``."""
    std = bn.weight.detach().abs().double()
    mean = bn.bias.detach().double()
    z = -mean / std
    cdf = torch.special.ndtr(z)
    truncated = -std * torch.exp(-(z**2) / 2) / math.sqrt(2 * math.pi) / cdf + mean
    return torch.where(cdf > 0.001, truncated, -3 * std).float()


def ofd_loss(student: Tensor, teacher: Tensor, margin: Tensor) -> Tensor:
    """Partial L2: skip positions where the student is below a negative (clipped) target; batch mean."""
    student, teacher = match_spatial(student.float(), teacher.float())
    target = torch.maximum(teacher, margin.view(1, -1, 1, 1))
    keep = (student > target) | (target > 0)
    return ((student - target).pow(2) * keep).sum() / student.shape[0]


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Let ``model``'s BatchNorms normalise with batch statistics without touching their running ones."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    for m in norms:
        m.training, m.track_running_stats = True, False
    try:
        yield
    finally:
        for m, (training, track) in zip(norms, saved):
            m.training, m.track_running_stats = training, track


@register_method(name="ofd")
class OFD(Distiller):
    """CE plus OFD's margin-clipped partial L2 on every paired pre-ReLU stage, through conv+BN connectors."""

    option_bounds: ClassVar[dict[str, Bound]] = {"ce_weight": WEIGHT, "ofd_weight": WEIGHT}

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        ce_weight: float = 1.0,
        ofd_weight: float = 1e-3,
        teacher_bn_train: bool = False,
    ):
        super().__init__(student, teacher)
        self.student_taps, self.teacher_taps = paired_stage_taps(student, teacher, "ofd")
        s_chs, t_chs = tap_channels(student, self.student_taps), tap_channels(teacher, self.teacher_taps)
        self.connectors = nn.ModuleList(_connector(s, t) for s, t in zip(s_chs, t_chs))
        for i, (bn, chs) in enumerate(zip(bn_before_taps(teacher, self.teacher_taps), t_chs)):
            if bn.num_features != chs:
                raise ValueError(f"teacher BN for stage {i} has {bn.num_features} channels, its tap {chs}")
            self.register_buffer(f"margin{i}", bn_margin(bn))
        self.ce_weight = ce_weight
        self.ofd_weight = ofd_weight
        self.teacher_bn_train = teacher_bn_train

    def notes(self) -> list[str]:
        if self.teacher_bn_train:
            return ["ofd: the teacher's BatchNorms use batch statistics (teacher_bn_train=True, as the OFD code)"]
        return []

    def margins(self) -> list[Tensor]:
        return [getattr(self, f"margin{i}") for i in range(len(self.connectors))]

    def losses(self, images, targets):
        logits, feats = tapped_forward(self.student, self.student_taps, images)
        with torch.no_grad():
            if self.teacher_bn_train and self.training:
                with batch_statistics(self.teacher):
                    _, t_feats = tapped_forward(self.teacher, self.teacher_taps, images)
            else:
                _, t_feats = tapped_forward(self.teacher, self.teacher_taps, images)
        n = len(feats)
        loss = sum(
            ofd_loss(connect(s), t, margin) / 2 ** (n - 1 - i)
            for i, (connect, s, t, margin) in enumerate(zip(self.connectors, feats, t_feats, self.margins()))
        )
        return logits, {"ce": self.ce_weight * F.cross_entropy(logits, targets), "ofd": self.ofd_weight * loss}


def _connector(in_chs: int, out_chs: int) -> nn.Sequential:
    conv = nn.Conv2d(in_chs, out_chs, 1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # the OFD code's normal(0, sqrt(2/n))
    return nn.Sequential(conv, nn.BatchNorm2d(out_chs))
