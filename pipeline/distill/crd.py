"""CRD: contrast each student embedding with its teacher embedding against K negatives from a memory bank.

Paper: Y. Tian, D. Krishnan, P. Isola, "Contrastive Representation Distillation", ICLR 2020 -
https://arxiv.org/abs/1910.10699; official code HobbitLong/RepDistiller (``crd/criterion.py``,
``crd/memory.py``, ``dataset/cifar100.py``).

The pooled embeddings the classifiers read are projected by linear heads to ``feat_dim`` and
L2-normalised. Two memory banks hold one momentum-averaged embedding per training sample (the student's
and the teacher's, indexed by the sample's position in the training set). The student embedding is
scored against the teacher bank at its own index (positive) and at K other indices (negatives) as
``exp(v . m / T) / Z``, and symmetrically for the teacher embedding against the student bank; ``Z`` is
fixed from the first batch. The NCE loss of both directions is summed. Negatives are drawn from other
classes (RepDistiller's default ``--mode exact``): the bank also records each sample's label as it is
seen, and a negative whose recorded label equals the anchor's is redrawn (samples not yet seen count as
other-class). Scores are taken from the full bank product ``v @ bank.T`` and then gathered, which equals
RepDistiller's gather-then-``bmm`` and needs far less memory.

Banks, labels and ``Z`` are registered buffers, so they are saved in resume checkpoints. Defaults follow
the CIFAR-100 benchmark (RepDistiller ``--distill crd -r 1 -a 0 -b 0.8``, ``feat_dim 128``, ``nce_k 16384``,
``nce_t 0.07``, ``nce_m 0.5``; mdistiller ``CRD.*`` the same); ``kd_weight=1`` gives CRD+KD.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill import register_method
from pipeline.distill.base import TEMPERATURE, WEIGHT, Bound, Distiller
from pipeline.distill.features import embedding_tap, probe_shapes, tapped_forward
from pipeline.distill.kd import kd_loss

_EPS = 1e-7
_REDRAWS = 10  # rounds of redrawing same-class negatives; each leaves about 1/num_classes of them


def nce_loss(scores: Tensor, num_samples: int) -> Tensor:
    """NCE with column 0 the positive: ``-E[log h(pos)] - K E[log(1 - h(neg))]``, noise ``P_n = 1 / N``."""
    k = scores.shape[1] - 1
    noise = k / num_samples
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + _EPS))
    log_neg = torch.log(noise / (scores[:, 1:] + noise + _EPS))
    return -(log_pos.sum() + log_neg.sum()) / scores.shape[0]


class Embed(nn.Module):
    """Linear projection to ``feat_dim`` followed by L2 normalisation."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)).float(), dim=1)


@register_method(name="crd")
class CRD(Distiller):
    """CE plus contrastive representation distillation with a momentum memory bank (CRD)."""

    teacher_graph_ok = True
    teacher_inference_mode = False  # its loss saves the teacher's features for the backward pass

    option_bounds: ClassVar[dict[str, Bound]] = {
        "feat_dim": Bound(1, 65536),
        "nce_k": Bound(1, 1 << 20),
        "nce_t": TEMPERATURE,
        "nce_m": Bound(0.0, 1.0, high_open=True),
        "ce_weight": WEIGHT,
        "kd_weight": WEIGHT,
        "crd_weight": WEIGHT,
        "temperature": TEMPERATURE,
    }

    needs_indices = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        num_samples: int,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        crd_weight: float = 0.8,
        temperature: float = 4.0,
    ):
        super().__init__(student, teacher)
        if nce_k < 1 or feat_dim < 1 or nce_t <= 0 or not 0 <= nce_m < 1 or temperature <= 0:
            raise ValueError(
                "need nce_k >= 1, feat_dim >= 1, nce_t > 0, 0 <= nce_m < 1 and temperature > 0; got "
                f"nce_k={nce_k}, feat_dim={feat_dim}, nce_t={nce_t}, nce_m={nce_m}, temperature={temperature}"
            )
        self.student_tap, self.teacher_tap = embedding_tap(student), embedding_tap(teacher)
        s_dim = probe_shapes(student, [self.student_tap])[0][1:].numel()
        t_dim = probe_shapes(teacher, [self.teacher_tap])[0][1:].numel()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        # RepDistiller's bank init: uniform in [-1/sqrt(d/3), 1/sqrt(d/3)]
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(num_samples, feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_t", torch.rand(num_samples, feat_dim) * 2 * bound - bound)
        self.register_buffer("labels", torch.full((num_samples,), -1, dtype=torch.long))
        self.register_buffer("z", torch.full((2,), -1.0))  # normalisation constants (student, teacher); <0: unset
        self.num_samples = num_samples
        self.nce_k, self.nce_t, self.nce_m = nce_k, nce_t, nce_m
        self.ce_weight, self.kd_weight, self.crd_weight = ce_weight, kd_weight, crd_weight
        self.temperature = temperature

    def losses(self, images, targets, indices: Tensor | None = None):
        if indices is None:
            raise ValueError("crd needs each sample's dataset index (indices=) for its memory bank")
        if indices.min() < 0 or indices.max() >= self.num_samples:
            raise ValueError(f"crd was built for {self.num_samples} samples but got index {int(indices.max())}")
        logits, (s_feat,) = tapped_forward(self.student, [self.student_tap], images)
        t_logits, (t_feat,) = self.teacher_outputs(images, [self.teacher_tap])
        v_s, v_t = self.embed_s(s_feat), self.embed_t(t_feat)
        with torch.no_grad():
            sample = torch.cat([indices[:, None], self._negatives(targets)], dim=1)
        scores_s = self._scores(v_s, self.memory_t, sample, 0)
        scores_t = self._scores(v_t, self.memory_s, sample, 1)
        if self.training:
            # Every rank applies the whole global batch, so the banks stay identical under DDP.
            all_indices, all_targets, all_s, all_t = (_gather(t.detach()) for t in (indices, targets, v_s, v_t))
            self.labels[all_indices] = all_targets
            # Out of place: the scores above saved the old banks for the backward pass.
            self.memory_s = self._updated(self.memory_s, all_s, all_indices)
            self.memory_t = self._updated(self.memory_t, all_t, all_indices)
        losses = {
            "ce": self.ce_weight * F.cross_entropy(logits, targets),
            "crd": self.crd_weight * (nce_loss(scores_s, self.num_samples) + nce_loss(scores_t, self.num_samples)),
        }
        if self.kd_weight:
            losses["kd"] = self.kd_weight * kd_loss(logits, t_logits, self.temperature)
        return logits, losses

    def _negatives(self, targets: Tensor) -> Tensor:
        """K indices per anchor, redrawn while their recorded label equals the anchor's."""
        picks = torch.randint(0, self.num_samples, (len(targets), self.nce_k), device=targets.device)
        for _ in range(_REDRAWS):
            clash = self.labels[picks] == targets[:, None]
            if not clash.any():
                break
            picks = torch.where(clash, torch.randint_like(picks, 0, self.num_samples), picks)
        return picks

    def _scores(self, v: Tensor, memory: Tensor, sample: Tensor, side: int) -> Tensor:
        """``exp(v . memory[sample] / T) / Z`` for each row's sampled indices (in fp32 even under autocast)."""
        with torch.autocast(v.device.type, enabled=False):
            scores = torch.exp((v.float() @ memory.t()).gather(1, sample) / self.nce_t)
        if self.z[side] < 0:
            self.z[side] = scores.detach().mean() * self.num_samples
        return scores / self.z[side].clone()

    @torch.no_grad()
    def _updated(self, memory: Tensor, v: Tensor, indices: Tensor) -> Tensor:
        """The bank with rows ``indices`` moved towards ``v`` by momentum and renormalised."""
        mixed = memory[indices] * self.nce_m + v.detach() * (1 - self.nce_m)
        return memory.index_copy(0, indices, F.normalize(mixed, dim=1))


def _gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` over the ranks of a running process group (itself when there is none)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
