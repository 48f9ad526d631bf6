"""DKD: KD split into a target-class part (TCKD) and a non-target part (NCKD), weighted apart.

Paper: B. Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022 - https://arxiv.org/abs/2203.08679;
official code megvii-research/mdistiller (``mdistiller/distillers/DKD.py``).

With ``b = [p_target, 1 - p_target]`` and ``p_hat`` the softmax over the non-target classes only (both at
temperature T), ``TCKD = KL(b_T || b_S)``, ``NCKD = KL(p_hat_T || p_hat_S)``, each times T^2, and the paper's
identity ``KD = TCKD + (1 - p_target^T) NCKD`` holds. The loss is ``alpha TCKD + beta NCKD``, ramped in
linearly over the first ``warmup_epochs``. Defaults are mdistiller's CIFAR-100 config (``DKD.CE_WEIGHT 1.0``,
``ALPHA 1.0``, ``BETA 8.0``, ``T 4.0``, ``WARMUP 20``); its per-pair configs change only ``BETA``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill import register_method
from pipeline.distill.base import EPOCHS, TEMPERATURE, WEIGHT, Bound, Distiller
from pipeline.distill.features import warmup_factor


def dkd_parts(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Per-sample (TCKD, NCKD), each already multiplied by T^2."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_q = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    is_target = F.one_hot(targets, log_p.shape[1]).bool()
    tckd = _kl(_binary(log_q, is_target), _binary(log_p, is_target))
    others = ~is_target
    n, c = log_p.shape
    nckd = _kl(F.log_softmax(log_q[others].view(n, c - 1), dim=1), F.log_softmax(log_p[others].view(n, c - 1), dim=1))
    return tckd * temperature**2, nckd * temperature**2


def _binary(log_probs: Tensor, is_target: Tensor) -> Tensor:
    """``log [p_target, 1 - p_target]`` computed stably from log-probabilities."""
    log_target = log_probs.masked_fill(~is_target, float("-inf")).logsumexp(1)
    log_rest = log_probs.masked_fill(is_target, float("-inf")).logsumexp(1)
    return torch.stack([log_target, log_rest], dim=1)


def _kl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Per-row ``KL(q || p)`` from log-probabilities."""
    return (log_q.exp() * (log_q - log_p)).sum(1)


@register_method(name="dkd")
class DKD(Distiller):
    """CE plus decoupled KD (alpha TCKD + beta NCKD) with a linear warm-up (DKD)."""

    teacher_graph_ok = True
    teacher_inference_mode = False  # its loss saves the teacher's probabilities for the backward pass
    option_bounds: ClassVar[dict[str, Bound]] = {
        "temperature": TEMPERATURE,
        "alpha": WEIGHT,
        "beta": WEIGHT,
        "warmup_epochs": EPOCHS,
        "ce_weight": WEIGHT,
    }

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        warmup_epochs: float = 20.0,
        ce_weight: float = 1.0,
    ):
        super().__init__(student, teacher)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.alpha = alpha
        self.beta = beta
        self.warmup_epochs = warmup_epochs
        self.ce_weight = ce_weight

    def losses(self, images, targets):
        logits = self.student(images)
        teacher_logits = self.teacher_logits(images)
        tckd, nckd = dkd_parts(logits, teacher_logits, targets, self.temperature)
        ramp = warmup_factor(self.progress, self.warmup_epochs)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, targets),
            "tckd": ramp * self.alpha * tckd.mean(),
            "nckd": ramp * self.beta * nckd.mean(),
        }
