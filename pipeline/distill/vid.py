"""VID: maximise a variational lower bound on the mutual information between paired stages.

Paper: S. Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019 -
https://arxiv.org/abs/1904.05835.

Each paired stage gets a Gaussian ``q(t | s)`` whose mean is a small 1x1-conv regressor of the student
feature and whose variance is learned per teacher channel; the loss is its negative log-likelihood (up
to a constant), averaged over elements and summed over stages. The variance is
``softplus(raw_variance) + eps``, a registered ``nn.Parameter`` per stage: it is trained with the
regressors and saved in the distiller's state_dict (mdistiller keeps it unregistered, so it never
trains). Defaults follow the CIFAR-100 benchmark (RepDistiller ``--distill vid -r 1 -a 0 -b 1`` with
``VIDLoss(s, t, t)`` over all stage features, ``init_pred_var=5.0``, ``eps=1e-5``; mdistiller
``VID.LOSS.FEAT_WEIGHT 1.0``, ``INIT_PRED_VAR 5.0``, ``EPS 1e-5``).
"""

from __future__ import annotations

import inspect
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill import register_method
from pipeline.distill.base import WEIGHT, Bound, Distiller
from pipeline.distill.features import match_spatial, paired_stage_taps, tap_channels, tapped_forward


class GaussianRegressor(nn.Module):
    """``q(t | s) = N(mu(s), diag(sigma^2))``: mu a 1x1 conv-ReLU-conv-ReLU-conv net, sigma^2 per channel."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, init_variance: float, eps: float):
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(in_chs, mid_chs, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_chs, mid_chs, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_chs, out_chs, 1, bias=False),
        )
        # softplus^-1(init_variance - eps), so the variance starts at init_variance
        raw = math.log(math.expm1(init_variance - eps))
        self.raw_variance = nn.Parameter(torch.full((out_chs,), raw))
        self.eps = eps

    def variance(self) -> Tensor:
        return F.softplus(self.raw_variance) + self.eps

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Mean negative log-likelihood of ``teacher`` (without the constant ``log(2 pi) / 2``)."""
        student, teacher = match_spatial(student, teacher)
        mean = self.mean(student).float()
        var = self.variance().view(1, -1, 1, 1)
        return 0.5 * ((mean - teacher.float()).pow(2) / var + var.log()).mean()


@register_method(name="vid")
class VID(Distiller):
    """CE plus variational information distillation on every paired stage (VID)."""

    teacher_graph_ok = True
    teacher_inference_mode = False  # its loss saves the teacher's features for the backward pass

    option_bounds: ClassVar[dict[str, Bound]] = {
        "init_variance": Bound(0.0, 1e6, low_open=True),
        "eps": Bound(0.0, 1.0, low_open=True),
        "ce_weight": WEIGHT,
        "vid_weight": WEIGHT,
    }

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        init_variance: float = 5.0,
        eps: float = 1e-5,
        ce_weight: float = 1.0,
        vid_weight: float = 1.0,
    ):
        super().__init__(student, teacher)
        self.check_args({"init_variance": init_variance, "eps": eps})
        self.student_taps, self.teacher_taps = paired_stage_taps(student, teacher, "vid")
        s_chs, t_chs = tap_channels(student, self.student_taps), tap_channels(teacher, self.teacher_taps)
        self.regressors = nn.ModuleList(GaussianRegressor(s, t, t, init_variance, eps) for s, t in zip(s_chs, t_chs))
        self.ce_weight = ce_weight
        self.vid_weight = vid_weight

    @classmethod
    def check_args(cls, args: dict) -> None:
        """The variance starts above its floor (checked before any stage runs, with the other defaults)."""
        defaults = inspect.signature(cls.__init__).parameters
        init_variance = args.get("init_variance", defaults["init_variance"].default)
        eps = args.get("eps", defaults["eps"].default)
        if not init_variance > eps > 0:
            raise ValueError(f"need init_variance > eps > 0, got init_variance={init_variance}, eps={eps}")

    def losses(self, images, targets):
        logits, feats = tapped_forward(self.student, self.student_taps, images)
        _, t_feats = self.teacher_outputs(images, self.teacher_taps)
        nll = sum(q(s, t) for q, s, t in zip(self.regressors, feats, t_feats))
        return logits, {"ce": self.ce_weight * F.cross_entropy(logits, targets), "vid": self.vid_weight * nll}
