"""KDiffusion's feature losses for one tapped layer, and the target-guided term (spec §2.3-2.4, §6-7).

Student side: each branch's tapped feature s̃_i (the block's downstream pre-activation feature as if
the block had output branch i alone, :func:`branch_features`), the larger of the student and teacher
maps average-pooled to the smaller [D5], then a shared linear 1x1 bridge into teacher space [D6].
Teacher side: the per-channel, per-batch standardized feature x^T_0 [D7]. Pooling and the bridge are
linear, so the mean of the bridged branches is the bridged deployed feature (I11).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill.kdiffusion.chain import TARGET_MODES, batched_chain_loss, reverse_chain_loss, step_weights
from pipeline.distill.kdiffusion.schedule import Schedule

__all__ = [
    "FEATURE_LOSSES",
    "DiffusionLayerLoss",
    "LayerLossOutput",
    "align_spatial",
    "branch_features",
    "guided_loss",
    "standardize",
]

FEATURE_LOSSES = ("chain", "average", "branch_average")
Embed = Literal["identity", "concat_tail"]


def branch_features(tapped: Tensor, block_out: Tensor, branches: Sequence[Tensor], embed: Embed) -> Tensor:
    """The tapped feature s̃_i of each branch, stacked to ``(m, B, C, H, W)``.

    Between the block and its tap the student applies only branch-independent affine ops (a residual
    add, a concatenation), so s̃_i is the tapped feature with the block's output ``block_out`` (the
    branch mean) exchanged for branch i's output: ``tapped + (x_i - block_out)`` for ``identity``, and
    the tap's last channels replaced by x_i for ``concat_tail``. The mean over i is ``tapped`` itself.
    """
    stacked = torch.stack(list(branches))
    if embed == "identity":
        if block_out.shape != tapped.shape:
            raise ValueError(
                f"an identity-embedded branch {tuple(block_out.shape)} must match its tap {tuple(tapped.shape)}"
            )
        return stacked + (tapped - block_out)
    if embed == "concat_tail":
        c = block_out.shape[1]
        if tapped.shape[1] < c or tapped.shape[2:] != block_out.shape[2:] or tapped.shape[0] != block_out.shape[0]:
            raise ValueError(
                f"a concat_tail branch {tuple(block_out.shape)} does not fit its tap {tuple(tapped.shape)}"
            )
        head = tapped[:, : tapped.shape[1] - c].unsqueeze(0).expand(len(branches), -1, -1, -1, -1)
        return torch.cat([head, stacked], 2)
    raise ValueError(f"unknown embed {embed!r}; use 'identity' or 'concat_tail'")


def align_spatial(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool whichever map is larger (per dimension) to the smaller size; the VID rule [D5].

    ``student`` may carry a leading branch dimension; pooling is linear, so it commutes with the mean.
    """
    size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
    if tuple(student.shape[-2:]) != size:
        student = F.adaptive_avg_pool2d(student.flatten(0, -4), size).unflatten(0, student.shape[:-3])
    if tuple(teacher.shape[-2:]) != size:
        teacher = F.adaptive_avg_pool2d(teacher, size)
    return student, teacher


@torch.no_grad()
def standardize(teacher: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """``(x0, mu, sd)``: x0 = (t - mu) / sd with per-channel batch statistics over (B, H, W) [D7]."""
    mu = teacher.mean((0, 2, 3), keepdim=True)
    sd = (teacher.var((0, 2, 3), unbiased=False, keepdim=True) + eps).sqrt()
    return (teacher - mu) / sd, mu, sd


def guided_loss(
    x_hat: Tensor, mu: Tensor, sd: Tensor, head: Callable[[Tensor], Tensor], teacher_logits: Tensor
) -> Tensor:
    """Eq. 14 at the final tap [D16]: MSE(h_T(x̂ ⊙ sd + mu), z^T), through the frozen teacher head.

    ``x_hat`` is the fused prediction mean_i s_i in standardized teacher space; de-normalizing with the
    batch statistics of :func:`standardize` puts it where the head expects the teacher feature.
    """
    return F.mse_loss(head(x_hat * sd + mu), teacher_logits)


@dataclass
class LayerLossOutput:
    loss: Tensor
    x_hat: Tensor  # mean_i s_i: the bridged deployed feature, standardized teacher space
    mu: Tensor
    sd: Tensor


class DiffusionLayerLoss(nn.Module):
    """One tapped layer's feature loss with its own training-only bridge (spec §6.4).

    ``feature_loss``:
        - ``chain``: the K = m reverse chain of :func:`reverse_chain_loss` under a fresh random branch
          permutation per call (shuffle sampling, one permutation per iteration and layer [D17]);
        - ``average``: MSE(mean_i s_i, x^T_0), Single Layer Average [D22] (feed the fused feature alone);
        - ``branch_average``: mean_i MSE(s_i, x^T_0), the alternative reading of "Average".

    Args:
        student_channels: Channels of the student's tapped feature.
        teacher_channels: Channels of the paired teacher feature.
        schedule: The chain's schedule (``schedule.steps`` must equal the number of branches fed).
        target_mode: One of :data:`~pipeline.distill.kdiffusion.chain.TARGET_MODES`.
        step_weight: One of :data:`~pipeline.distill.kdiffusion.chain.STEP_WEIGHTS`.
        feature_loss: One of :data:`FEATURE_LOSSES`.
        batched: Compute the chain with :func:`batched_chain_loss` (fewer GPU kernels, same loss up to rounding).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        schedule: Schedule,
        target_mode: str = "mean",
        step_weight: str = "uniform",
        feature_loss: str = "chain",
        batched: bool = False,
    ):
        super().__init__()
        if target_mode not in TARGET_MODES:
            raise ValueError(f"unknown target_mode {target_mode!r}; choose one of: {', '.join(TARGET_MODES)}")
        if feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"unknown feature_loss {feature_loss!r}; choose one of: {', '.join(FEATURE_LOSSES)}")
        self.bridge = nn.Conv2d(student_channels, teacher_channels, 1, bias=True)
        self.schedule = schedule
        self.target_mode = target_mode
        self.feature_loss = feature_loss
        self.weights = step_weights(schedule, step_weight)
        self.batched = batched  # the chain as a few batched kernels (batched_chain_loss), not step by step

    def forward(self, student: Tensor, teacher: Tensor, perm: Sequence[int] | None = None) -> LayerLossOutput:
        """Loss for ``student`` features ``(m, B, C_s, H, W)`` against the raw teacher feature ``(B, C_t, H', W')``.

        Runs in the bridge's precision (fp32 under AMP) with autocast off: the chain's coefficients are small
        and the targets are differences.
        """
        dtype = self.bridge.weight.dtype
        with torch.autocast(student.device.type, enabled=False):
            student, teacher = align_spatial(student.to(dtype), teacher.to(dtype))
            x0, mu, sd = standardize(teacher)
            bridged = self.bridge(student.flatten(0, 1)).unflatten(0, student.shape[:2])
            x_hat = bridged.mean(0)
            if self.feature_loss == "average":
                loss = F.mse_loss(x_hat, x0)
            elif self.feature_loss == "branch_average":
                loss = torch.stack([F.mse_loss(s, x0) for s in bridged]).mean()
            else:
                m = len(bridged)
                perm = torch.randperm(m).tolist() if perm is None else list(perm)
                chain = batched_chain_loss if self.batched else reverse_chain_loss
                steps = bridged if self.batched else list(bridged)
                loss = chain(steps, x0, self.schedule, perm, self.target_mode, self.weights)
        return LayerLossOutput(loss, x_hat, mu, sd)
