"""Cross-entropy training: the student alone, no teacher.

Its own module, apart from every distillation method, so the ``teacher`` stage that trains with it depends
on no method's code (pipeline.artifacts.code_version).
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F

from pipeline.distill.base import WEIGHT, Bound, Distiller, register_method


@register_method(name="vanilla")
class Vanilla(Distiller):
    """The student alone, trained with cross-entropy (also how the teacher stage trains a teacher)."""

    requires_teacher = False
    option_bounds: ClassVar[dict[str, Bound]] = {"ce_weight": WEIGHT}

    def __init__(self, student, teacher=None, ce_weight: float = 1.0):
        super().__init__(student, None)
        self.ce_weight = ce_weight

    def losses(self, images, targets):
        logits = self.student(images)
        return logits, {"ce": self.ce_weight * F.cross_entropy(logits, targets)}
