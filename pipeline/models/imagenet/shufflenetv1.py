"""ShuffleNet V1 (g=3, 1.0x) student at 224 px, written after the paper.

Paper: `ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices` (Zhang et al.,
CVPR 2018) - https://arxiv.org/abs/1707.01083, Table 1: a 3x3 stride-2 stem of 24 channels and a max-pool,
then stages of 4, 8 and 4 units (240, 480, 960 channels at g=3), global pooling and a linear classifier.
Bottlenecks are a quarter of each stage's output width, the first pointwise conv of the first unit is not
grouped, and there is no ReLU after the depthwise conv. Module names follow the CIFAR ``ShuffleV1``.

The sum (or concat) ending each unit is its pre-activation feature; the last unit's ReLU is the head's ``act``,
so ``forward_features`` ends at the spec §2.1 Single-Layer tap (``bn3(...) + x``, 960@7x7).
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.models import ModelInfo, register_model
from pipeline.models.cifar.shufflenetv1 import stage_points
from pipeline.models.imagenet.common import imagenet_info
from pipeline.models.layers import ShuffleV1Unit, init_conv_bn_

__all__ = ["ShuffleNetV1"]

_STEM_CHS = 24


class ShuffleNetV1(nn.Module):
    """3x3 stride-2 stem, max-pool, three stages of ShuffleNet units, ReLU, GAP, linear.

    Args:
        stage_chs: Output channels of the three stages.
        stage_repeats: Units per stage (the first of each at stride 2).
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
        self.conv1 = nn.Conv2d(3, _STEM_CHS, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHS)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_chs = _STEM_CHS
        for i, (out_chs, n) in enumerate(zip(stage_chs, stage_repeats), start=1):
            units = []
            for j in range(n):
                first_groups = 1 if i == 1 and j == 0 else groups
                units.append(ShuffleV1Unit(in_chs, out_chs, out_chs // 4, 2 if j == 0 else 1, groups, first_groups))
                in_chs = out_chs
            self.add_module(f"layer{i}", nn.Sequential(*units))
        self.layer3[-1].act = nn.Identity()
        self.act = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_chs, num_classes)
        init_conv_bn_(self)
        nn.init.normal_(self.linear.weight, 0, 0.01)
        nn.init.zeros_(self.linear.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.linear(self.avgpool(self.act(x)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _info(name: str, stage_repeats: tuple[int, int, int]) -> ModelInfo:
    """The CIFAR ShuffleV1's taps and sites, here at 28, 14 and 7 px."""
    stages, sites = stage_points(stage_repeats)
    return imagenet_info(name, stages, sites, "ShuffleNet V1 g=3 1.0x (paper architecture)", "arXiv:1707.01083 Table 1")


@register_model(_info("shufflenet_v1_g3", (4, 8, 4)))
def shufflenet_v1_g3(num_classes: int = 100) -> ShuffleNetV1:
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes)
