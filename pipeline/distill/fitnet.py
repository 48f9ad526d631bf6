"""FitNet: a student stage regresses the teacher's through a learned regressor (the "hint").

Paper: A. Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 - https://arxiv.org/abs/1412.6550.

Defaults follow the CIFAR-100 benchmark (RepDistiller ``train_student.py --distill hint``, README and
``scripts/run_cifar_distill.sh``: ``-r 1 -a 0 -b 100``, ``--hint_layer 2``; mdistiller ``FITNET.HINT_LAYER 2``,
``CE_WEIGHT 1.0``, ``FEAT_WEIGHT 100.0``), which trains hint and task jointly rather than in the paper's two
phases. RepDistiller's hint layer 2 is the second of three stages (its feature list starts with the stem),
here pair index 1 of the deep-aligned stage pairs. The regressor is RepDistiller's ``ConvReg`` for equal
sizes (3x3 conv + BN) without its final ReLU: the zoo's taps are pre-activation and can be negative.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import nn

from pipeline.distill import register_method
from pipeline.distill.base import WEIGHT, Bound, Distiller
from pipeline.distill.features import match_spatial, paired_stage_taps, tap_channels, tapped_forward


@register_method(name="fitnet")
class FitNet(Distiller):
    """CE plus an L2 hint between a regressed student stage and the matching teacher stage (FitNet)."""

    teacher_graph_ok = True
    teacher_inference_mode = False  # its loss saves the teacher's features for the backward pass

    option_bounds: ClassVar[dict[str, Bound]] = {
        "hint_stage": Bound(-64, 64),
        "ce_weight": WEIGHT,
        "hint_weight": WEIGHT,
    }

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        hint_stage: int = 1,
        ce_weight: float = 1.0,
        hint_weight: float = 100.0,
    ):
        super().__init__(student, teacher)
        s_taps, t_taps = paired_stage_taps(student, teacher, "fitnet")
        if not -len(s_taps) <= hint_stage < len(s_taps):
            raise ValueError(f"hint_stage must index one of the {len(s_taps)} paired stages, got {hint_stage}")
        self.student_tap, self.teacher_tap = s_taps[hint_stage], t_taps[hint_stage]
        (s_chs,), (t_chs,) = tap_channels(student, [self.student_tap]), tap_channels(teacher, [self.teacher_tap])
        self.regressor = nn.Sequential(nn.Conv2d(s_chs, t_chs, 3, padding=1, bias=False), nn.BatchNorm2d(t_chs))
        self.ce_weight = ce_weight
        self.hint_weight = hint_weight

    def losses(self, images, targets):
        logits, (feat,) = tapped_forward(self.student, [self.student_tap], images)
        _, (target,) = self.teacher_outputs(images, [self.teacher_tap])
        pred, target = match_spatial(self.regressor(feat), target)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, targets),
            "hint": self.hint_weight * F.mse_loss(pred.float(), target.float()),
        }
