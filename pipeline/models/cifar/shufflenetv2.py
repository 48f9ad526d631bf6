"""ShuffleNet V2 1.0x for CIFAR, the KD benchmark's ``ShuffleV2`` student.

Paper: `ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design` (Ma et al., ECCV 2018) -
https://arxiv.org/abs/1807.11164. Layout and state_dict keys follow the CIFAR-100 KD benchmark
(HobbitLong/RepDistiller ``models/ShuffleNetv2.py``): a 1x1 stride-1 stem without max-pool, three stages that
each start with a down-sampling unit, then a 1x1 conv to 1024 channels.

A basic unit splits its input, transforms the second half and concatenates it after the first; the
concatenation *before* the ReLU is its pre-activation feature (spec §2.1, ``embed="concat_tail"``). The ReLU is
applied to the whole concatenation by the non-inplace ``act``: the untouched half is itself a ReLU output, so
this equals the benchmark's ReLU-then-concat, and a hook on ``act``'s input reads the feature directly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.models import ModelInfo, ReparamSite, Tap, register_model
from pipeline.models.cifar.common import cifar_info
from pipeline.models.layers import channel_shuffle

__all__ = ["BasicUnit", "DownUnit", "ShuffleNetV2"]

_STEM_CHS = 24


class BasicUnit(nn.Module):
    """Split channels in half; 1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN on the second half; concat, ReLU, shuffle."""

    def __init__(self, chs: int):
        super().__init__()
        half = chs // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=1)
        out = self.bn3(self.conv3(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x2)))))))
        return channel_shuffle(self.act(torch.cat([x1, out], 1)), 2)


class DownUnit(nn.Module):
    """Stride-2 unit: depthwise-BN, 1x1-BN-ReLU on one path; 1x1-BN-ReLU, depthwise-BN, 1x1-BN-ReLU on the other."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        mid = out_chs // 2
        self.conv1 = nn.Conv2d(in_chs, in_chs, 3, stride=2, padding=1, groups=in_chs, bias=False)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv2 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        left = self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(self.relu(self.bn3(self.conv3(x)))))
        right = self.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """1x1 stem, three stages (a down unit then basic units), 1x1 conv+BN, ReLU, GAP, linear.

    Args:
        stage_chs: Output channels of the three stages and of the last 1x1 conv.
        stage_repeats: Basic units per stage (after the down unit).
        num_classes: Classifier outputs.
    """

    def __init__(
        self,
        stage_chs: tuple[int, int, int, int] = (116, 232, 464, 1024),
        stage_repeats: tuple[int, int, int] = (3, 7, 3),
        num_classes: int = 100,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, _STEM_CHS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHS)
        self.relu = nn.ReLU(inplace=True)
        in_chs = _STEM_CHS
        for i, (out_chs, n) in enumerate(zip(stage_chs[:3], stage_repeats), start=1):
            units = [DownUnit(in_chs, out_chs)] + [BasicUnit(out_chs) for _ in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*units))
            in_chs = out_chs
        self.conv2 = nn.Conv2d(in_chs, stage_chs[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(stage_chs[3])
        self.act = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(stage_chs[3], num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(self.layer3(self.layer2(self.layer1(x)))))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.linear(self.avgpool(self.act(x)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _info(name: str, stage_repeats: tuple[int, int, int]) -> ModelInfo:
    """Stage taps at the end of each resolution (16, 8, 4 px at 32 px input); the 4 px stage ends with ``conv2``.

    Sites: the last basic unit's conv3+bn3 in the 16 and 8 px stages (the tail of the concatenation), and
    conv2+bn2 (spec §2.1 Single Layer).
    """
    r1, r2 = stage_repeats[0], stage_repeats[1]  # the down unit is index 0, so the last basic unit is index n
    stages = (Tap(f"layer1.{r1}.act", "input"), Tap(f"layer2.{r2}.act", "input"), Tap("act", "input"))
    sites = (
        ReparamSite(f"layer1.{r1}.conv3", f"layer1.{r1}.bn3", stages[0], embed="concat_tail"),
        ReparamSite(f"layer2.{r2}.conv3", f"layer2.{r2}.bn3", stages[1], embed="concat_tail"),
        ReparamSite("conv2", "bn2", stages[2]),
    )
    return cifar_info(
        name, stages, sites, "ShuffleNet V2 1.0x for CIFAR (KD benchmark)", f"models/ShuffleNetv2.py:{name}"
    )


@register_model(_info("ShuffleV2", (3, 7, 3)))
def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes)
