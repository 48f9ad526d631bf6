"""AT: match the spatial attention maps of every paired stage.

Paper: S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017 - https://arxiv.org/abs/1612.03928.

The attention map of a C x H x W feature is ``mean_c |A_c|^p``, flattened and L2-normalised; the loss is
the mean squared difference of the maps, summed over the stages. Defaults follow the CIFAR-100 benchmark
(RepDistiller ``--distill attention -r 1 -a 0 -b 1000`` with ``Attention(p=2)`` over all stage features;
mdistiller ``AT.P 2``, ``CE_WEIGHT 1.0``, ``FEAT_WEIGHT 1000.0``). The paper's ``|A|`` is needed because the
zoo's taps are pre-activation; RepDistiller reads post-ReLU features, where ``|A| = A``, so the maps (and the
tuned weight) differ from theirs in that negative pre-activations count too.
Different spatial sizes are pooled to the smaller one, as mdistiller does.

Stages are paired from the shallow end, as both official codes do (``zip(feat_s[1:-1], feat_t[1:-1])``
in RepDistiller, ``zip(feats[1:], ...)`` in mdistiller): when one network has more stages, its deepest
extra ones are left out. Pairing from the deep end instead (the other feature methods' default here)
brought in MobileNetV2-half's 2x2 stage against WRN-16-2; with ``mean`` over 4 positions and weight 1000
its gradient was about 150x cross-entropy's at the start of training (benchmarks/diagnose_losses.py,
docs/bench-fmnist.md), and AT fell to chance on the synthetic recipe at LR 0.05.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill import register_method
from pipeline.distill.base import WEIGHT, Bound, Distiller
from pipeline.distill.features import match_spatial, paired_stage_taps, tapped_forward


def shallow_pairs(num_student: int, num_teacher: int) -> list[tuple[int, int]]:
    """(student stage, teacher stage) pairs matched from the shallowest stage, as the official codes' ``zip``."""
    return [(i, i) for i in range(min(num_student, num_teacher))]


def attention_map(feat: Tensor, p: float) -> Tensor:
    """``normalize(mean_c |A_c|^p)`` per sample, flattened over space."""
    return F.normalize(feat.float().abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student: Tensor, teacher: Tensor, p: float) -> Tensor:
    student, teacher = match_spatial(student, teacher)
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


@register_method(name="at")
class AT(Distiller):
    """CE plus attention transfer on every paired stage (AT)."""

    teacher_graph_ok = True
    teacher_inference_mode = False  # its loss saves the teacher's features for the backward pass

    option_bounds: ClassVar[dict[str, Bound]] = {
        "p": Bound(0.0, 16.0, low_open=True),
        "ce_weight": WEIGHT,
        "at_weight": WEIGHT,
    }

    def __init__(
        self, student: nn.Module, teacher: nn.Module, p: float = 2.0, ce_weight: float = 1.0, at_weight: float = 1000.0
    ):
        super().__init__(student, teacher)
        if p <= 0:
            raise ValueError(f"p must be positive, got {p}")
        self.student_taps, self.teacher_taps = paired_stage_taps(student, teacher, "at", shallow_pairs)
        self.p = p
        self.ce_weight = ce_weight
        self.at_weight = at_weight

    def losses(self, images, targets):
        logits, feats = tapped_forward(self.student, self.student_taps, images)
        _, t_feats = self.teacher_outputs(images, self.teacher_taps)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, targets),
            "at": self.at_weight * sum(at_loss(s, t, self.p) for s, t in zip(feats, t_feats)),
        }
