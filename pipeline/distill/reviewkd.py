"""ReviewKD: each teacher stage is matched by a fusion of the same and all deeper student stages.

Paper: P. Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021 -
https://arxiv.org/abs/2104.09044; official code dvlab-research/ReviewKD (``CIFAR-100/model/reviewkd.py``,
``CIFAR-100/train.py``).

The levels are every paired stage (all of the student's declared stages where the teacher has as many)
plus the pooled embedding the classifier reads, as a 1x1 map (the official code's last feature). From
the deepest level up, an attention-based fusion (ABF) block reduces the student feature to ``mid``
channels, blends it with the upsampled result of the level below through two sigmoid attention maps,
resizes it to the teacher's spatial size and projects it to the teacher's channels (3x3 conv + BN). The
loss is the hierarchical context loss (HCL): the MSE at full size plus the MSEs after 4x4, 2x2 and 1x1
average pooling at halving weights, normalised, summed over levels.

Defaults: ``mid = min(512, embedding channels)``, ABF convs initialised with ``kaiming_uniform_(a=1)``, a
20-epoch linear warm-up of the review loss (official ``--kd-warm-up 20``; mdistiller ``REVIEWKD.WARMUP_EPOCHS
20``), CE weight 1 and review weight 1 (official ``--kd-loss-weight`` default and mdistiller
``REVIEWKD_WEIGHT``; the official CIFAR script uses 5.0 for resnet32x4->resnet8x4 and the WRN/ShuffleNetV1
pairs, 8.0 for ShuffleNetV2, 0.6 for resnet56->resnet20). The zoo's stage taps are pre-activation for
the student too (the official student features are post-ReLU; its teacher's are pre-ReLU).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill import register_method
from pipeline.distill.base import EPOCHS, WEIGHT, Bound, Distiller
from pipeline.distill.features import embedding_tap, paired_stage_taps, tap_channels, tapped_forward, warmup_factor


class ABF(nn.Module):
    """Attention-based fusion: reduce, blend with the deeper level's output, resize, project to the teacher."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_chs, mid_chs, 1, bias=False), nn.BatchNorm2d(mid_chs))
        self.project = nn.Sequential(nn.Conv2d(mid_chs, out_chs, 3, padding=1, bias=False), nn.BatchNorm2d(out_chs))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_chs, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.project[0].weight, a=1)

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: torch.Size) -> tuple[Tensor, Tensor]:
        """Returns (the prediction of the teacher feature, the fused map the next shallower level blends in)."""
        x = self.reduce(x)
        if self.attention is not None:
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            weights = self.attention(torch.cat([x, deeper], dim=1))
            x = x * weights[:, :1] + deeper * weights[:, 1:]
        if x.shape[-2:] != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.project(x), x


def hcl_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Hierarchical context loss of one level: full-size MSE plus pooled MSEs at weights 1/2, 1/4, 1/8."""
    student, teacher = student.float(), teacher.float()
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= student.shape[-2]:
            continue
        weight /= 2
        pooled = F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size))
        loss = loss + weight * pooled
        total += weight
    return loss / total


@register_method(name="reviewkd")
class ReviewKD(Distiller):
    """CE plus knowledge review: ABF-fused student stages against every teacher stage, with the HCL loss."""

    teacher_graph_ok = True
    teacher_inference_mode = False  # its loss saves the teacher's features for the backward pass

    option_bounds: ClassVar[dict[str, Bound]] = {
        "max_mid_channels": Bound(1, 65536),
        "warmup_epochs": EPOCHS,
        "ce_weight": WEIGHT,
        "review_weight": WEIGHT,
    }

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        max_mid_channels: int = 512,
        warmup_epochs: float = 20.0,
        ce_weight: float = 1.0,
        review_weight: float = 1.0,
    ):
        super().__init__(student, teacher)
        if max_mid_channels < 1:
            raise ValueError(f"max_mid_channels must be positive, got {max_mid_channels}")
        s_taps, t_taps = paired_stage_taps(student, teacher, "reviewkd")
        self.student_taps = [*s_taps, embedding_tap(student)]
        self.teacher_taps = [*t_taps, embedding_tap(teacher)]
        s_chs, t_chs = tap_channels(student, self.student_taps), tap_channels(teacher, self.teacher_taps)
        mid = min(max_mid_channels, s_chs[-1])
        # Shallow to deep; the deepest level (the embedding) has nothing deeper to fuse.
        self.abfs = nn.ModuleList(ABF(s, mid, t, fuse=i < len(s_chs) - 1) for i, (s, t) in enumerate(zip(s_chs, t_chs)))
        self.warmup_epochs = warmup_epochs
        self.ce_weight = ce_weight
        self.review_weight = review_weight

    def losses(self, images, targets):
        logits, feats = tapped_forward(self.student, self.student_taps, images)
        _, t_feats = self.teacher_outputs(images, self.teacher_taps)
        feats, t_feats = _as_maps(feats), _as_maps(t_feats)
        deeper, loss = None, 0.0
        for abf, feat, target in reversed(list(zip(self.abfs, feats, t_feats))):
            pred, deeper = abf(feat, deeper, target.shape[-2:])
            loss = loss + hcl_loss(pred, target)
        ramp = warmup_factor(self.progress, self.warmup_epochs)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, targets),
            "review": self.review_weight * ramp * loss,
        }


def _as_maps(feats: list[Tensor]) -> list[Tensor]:
    """The pooled embedding ``N x C`` becomes an ``N x C x 1 x 1`` map like the stages."""
    return [f if f.dim() == 4 else f.reshape(f.shape[0], -1, 1, 1) for f in feats]
