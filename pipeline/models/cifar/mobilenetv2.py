"""MobileNetV2 for CIFAR at width 0.5 (``mobile_half``), the KD benchmark's MobileNet student.

Paper: `MobileNetV2: Inverted Residuals and Linear Bottlenecks` (Sandler et al., CVPR 2018) -
https://arxiv.org/abs/1801.04381. Layout and state_dict keys follow the CIFAR-100 KD benchmark
(HobbitLong/RepDistiller ``models/mobilenetv2.py``): a stride-2 3x3 stem, seven groups of inverted residuals
(every one with an expansion conv, even at t=1), and a 1x1 conv to 1280 channels at 2x2.

The inverted residuals end linearly, so a group's output is already a pre-activation feature. The final 1x1
conv's ReLU is the model's ``act`` (non-inplace): ``forward_features`` ends at its BN, the KDiffusion
Single-Layer site (spec §2.1).
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.models import ModelInfo, ReparamSite, Tap, register_model
from pipeline.models.cifar.common import cifar_info
from pipeline.models.layers import init_conv_bn_

__all__ = ["InvertedResidual", "MobileNetV2"]

# (expansion t, output channels c, repeats n, first stride s) at width 1.0
_SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN (``conv.0``-``conv.7``); residual if shapes match."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int):
        super().__init__()
        mid_chs = in_chs * expand_ratio
        self.use_res_connect = stride == 1 and in_chs == out_chs
        self.conv = nn.Sequential(
            nn.Conv2d(in_chs, mid_chs, 1, bias=False),
            nn.BatchNorm2d(mid_chs),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_chs, mid_chs, 3, stride=stride, padding=1, groups=mid_chs, bias=False),
            nn.BatchNorm2d(mid_chs),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_chs, out_chs, 1, bias=False),
            nn.BatchNorm2d(out_chs),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32 px inputs (overall stride 16).

    Args:
        num_classes: Classifier outputs.
        width_mult: Channel multiplier of the stem and the inverted residuals; the last conv keeps 1280
            channels unless the multiplier exceeds 1.
        expand_ratio: Expansion t of every group but the first.
    """

    def __init__(self, num_classes: int = 100, width_mult: float = 1.0, expand_ratio: int = 6):
        super().__init__()
        in_chs = int(32 * width_mult)
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, in_chs, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(in_chs), nn.ReLU(inplace=True)
        )
        groups = []
        for t, c, n, s in _SETTING:
            out_chs = int(c * width_mult)
            units = []
            for stride in [s] + [1] * (n - 1):
                units.append(InvertedResidual(in_chs, out_chs, stride, expand_ratio if t != 1 else 1))
                in_chs = out_chs
            groups.append(nn.Sequential(*units))
        self.blocks = nn.Sequential(*groups)
        last_chs = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = nn.Sequential(nn.Conv2d(in_chs, last_chs, 1, bias=False), nn.BatchNorm2d(last_chs))
        self.act = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_chs, num_classes))
        init_conv_bn_(self)
        nn.init.normal_(self.classifier[0].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[0].bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.conv2(self.blocks(self.conv1(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.act(x)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _info(name: str) -> ModelInfo:
    """Stage taps at the end of each resolution (16, 8, 4, 2 px at 32 px input); sites in the deepest three.

    The 16/8/4 px stages end with groups 1, 2 and 4, whose last unit's project conv+BN (``conv.6``/``conv.7``)
    feeds the residual sum the group outputs; the 2 px stage ends with ``conv2``.
    """
    stages = (Tap("blocks.1"), Tap("blocks.2"), Tap("blocks.4"), Tap("act", "input"))
    sites = (
        ReparamSite("blocks.2.2.conv.6", "blocks.2.2.conv.7", stages[1]),
        ReparamSite("blocks.4.2.conv.6", "blocks.4.2.conv.7", stages[2]),
        ReparamSite("conv2.0", "conv2.1", stages[3]),
    )
    return cifar_info(
        name, stages, sites, "MobileNetV2 width 0.5 for CIFAR (KD benchmark)", f"models/mobilenetv2.py:{name}"
    )


@register_model(_info("mobile_half"))
def mobile_half(num_classes: int = 100) -> MobileNetV2:
    return MobileNetV2(num_classes, width_mult=0.5, expand_ratio=6)
