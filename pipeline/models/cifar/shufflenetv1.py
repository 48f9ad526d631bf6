"""ShuffleNet V1 (g=3) for CIFAR, the KD benchmark's ``ShuffleV1`` student.

Paper: `ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices` (Zhang et al.,
CVPR 2018) - https://arxiv.org/abs/1707.01083. Layout and state_dict keys follow the CIFAR-100 KD benchmark
(HobbitLong/RepDistiller ``models/ShuffleNetv1.py``), which departs from the paper in three places kept here:
a 1x1 stride-1 stem without max-pool, a ReLU after the depthwise conv, and bottlenecks of a quarter of the
*branch* width (so the first unit of a stage is narrower).

The sum (or concat) that ends each unit is the pre-activation feature; the last unit's ReLU is the head's
``act``, so ``forward_features`` ends at the spec §2.1 Single-Layer tap ``layer3[-1].bn3(...) + x``.
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.models import ModelInfo, ReparamSite, Tap, register_model
from pipeline.models.cifar.common import cifar_info
from pipeline.models.layers import ShuffleV1Unit

__all__ = ["ShuffleNetV1"]

_STEM_CHS = 24


class ShuffleNetV1(nn.Module):
    """1x1 stem, three stages of ShuffleNet units (the first of each at stride 2), ReLU, GAP, linear.

    Args:
        stage_chs: Output channels of the three stages.
        stage_repeats: Units per stage.
        groups: Groups of the pointwise convs.
        num_classes: Classifier outputs.
    """

    def __init__(
        self,
        stage_chs: tuple[int, int, int] = (240, 480, 960),
        stage_repeats: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, _STEM_CHS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHS)
        self.relu = nn.ReLU(inplace=True)
        in_chs = _STEM_CHS
        for i, (out_chs, n) in enumerate(zip(stage_chs, stage_repeats), start=1):
            units = []
            for j in range(n):
                branch_chs = out_chs - in_chs if j == 0 else out_chs
                first_groups = 1 if in_chs == _STEM_CHS else groups
                stride = 2 if j == 0 else 1
                units.append(ShuffleV1Unit(in_chs, out_chs, branch_chs // 4, stride, groups, first_groups, dw_act=True))
                in_chs = out_chs
            self.add_module(f"layer{i}", nn.Sequential(*units))
        self.layer3[-1].act = nn.Identity()
        self.act = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_chs, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.linear(self.avgpool(self.act(x)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def stage_points(stage_repeats: tuple[int, int, int]) -> tuple[tuple[Tap, ...], tuple[ReparamSite, ...]]:
    """Stage taps: each stage's last unit before its ReLU; sites: that unit's grouped 1x1 conv3+bn3.

    Shared with the 224 px ShuffleNet V1, whose module names follow this model's.
    """
    last = [n - 1 for n in stage_repeats]
    stages = (Tap(f"layer1.{last[0]}.act", "input"), Tap(f"layer2.{last[1]}.act", "input"), Tap("act", "input"))
    sites = tuple(
        ReparamSite(f"layer{i}.{last[i - 1]}.conv3", f"layer{i}.{last[i - 1]}.bn3", stages[i - 1]) for i in (1, 2, 3)
    )
    return stages, sites


def _info(name: str, stage_repeats: tuple[int, int, int]) -> ModelInfo:
    stages, sites = stage_points(stage_repeats)
    return cifar_info(
        name, stages, sites, "ShuffleNet V1 g=3 for CIFAR (KD benchmark)", f"models/ShuffleNetv1.py:{name}"
    )


@register_model(_info("ShuffleV1", (4, 8, 4)))
def ShuffleV1(num_classes: int = 100) -> ShuffleNetV1:
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes)
