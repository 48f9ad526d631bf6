"""Classic logit distillation.

KD: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", 2015.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from pipeline.distill import register_method
from pipeline.distill.base import TEMPERATURE, WEIGHT, Bound, Distiller


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(z_T/T) ‖ softmax(z_S/T))``, batch-mean; T² keeps gradients comparable across T."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    log_q = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2


@register_method(name="kd")
class KD(Distiller):
    """CE plus Hinton KD on softened logits (KD).

    Defaults follow the CIFAR-100 benchmark recipe (RepDistiller: T=4; mdistiller's KD config: CE weight
    0.1, KD weight 0.9)."""

    option_bounds: ClassVar[dict[str, Bound]] = {"temperature": TEMPERATURE, "ce_weight": WEIGHT, "kd_weight": WEIGHT}
    teacher_graph_ok = True

    def __init__(self, student, teacher, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9):
        super().__init__(student, teacher)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight

    def losses(self, images, targets):
        logits = self.student(images)
        teacher_logits = self.teacher_logits(images)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, targets),
            "kd": self.kd_weight * kd_loss(logits, teacher_logits, self.temperature),
        }
