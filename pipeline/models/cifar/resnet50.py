"""ResNet-50 for CIFAR: the ImageNet ResNet-50 with a 3x3 stride-1 stem and no max-pool (32 px in, 4x4 out).

Paper: `Deep Residual Learning for Image Recognition` (He et al., CVPR 2016) - https://arxiv.org/abs/1512.03385.
Layout and state_dict keys follow the CIFAR-100 KD benchmark (HobbitLong/RepDistiller ``models/resnetv2.py``,
itself after kuangliu/pytorch-cifar), so its teacher checkpoints load with ``strict=True``.

As in the other residual nets of the zoo, each block's post-addition ReLU is its own non-inplace module ``act``
(hooks on its input read the pre-activation feature) and the last block leaves its ReLU to the head.
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.models import ModelInfo, ReparamSite, Tap, register_model
from pipeline.models.cifar.common import cifar_info
from pipeline.models.layers import init_conv_bn_

__all__ = ["Bottleneck", "ResNetBottleneck"]


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4), each with BN, plus a projection shortcut when needed."""

    expansion = 4

    def __init__(self, in_chs: int, chs: int, stride: int = 1):
        super().__init__()
        out_chs = chs * self.expansion
        self.conv1 = nn.Conv2d(in_chs, chs, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(chs)
        self.conv2 = nn.Conv2d(chs, chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(chs)
        self.conv3 = nn.Conv2d(chs, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )
        self.act: nn.Module = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + self.shortcut(x)
        return self.act(out)


class ResNetBottleneck(nn.Module):
    """CIFAR stem and four bottleneck stages (64, 128, 256, 512 x4 channels) at strides 1, 2, 2, 2.

    Args:
        num_blocks: Blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
        num_classes: Classifier outputs.
    """

    def __init__(self, num_blocks: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        in_chs = 64
        for i, (chs, n, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)), start=1):
            blocks = [Bottleneck(in_chs, chs, stride)] + [Bottleneck(chs * 4, chs) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            in_chs = chs * 4
        self.layer4[-1].act = nn.Identity()
        self.act = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_chs, num_classes)
        init_conv_bn_(self)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.linear(self.avgpool(self.act(x)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _info(name: str, num_blocks: tuple[int, int, int, int]) -> ModelInfo:
    """Stage taps: each stage's last block before its ReLU; re-param sites in the deepest three stages."""
    last = [n - 1 for n in num_blocks]
    stages = (*(Tap(f"layer{i}.{last[i - 1]}.act", "input") for i in (1, 2, 3)), Tap("act", "input"))
    sites = tuple(
        ReparamSite(f"layer{i}.{last[i - 1]}.conv3", f"layer{i}.{last[i - 1]}.bn3", stages[i - 1]) for i in (2, 3, 4)
    )
    return cifar_info(name, stages, sites, "ResNet-50 with a CIFAR stem (KD benchmark)", f"models/resnetv2.py:{name}")


@register_model(_info("ResNet50", (3, 4, 6, 3)))
def ResNet50(num_classes: int = 100) -> ResNetBottleneck:
    return ResNetBottleneck((3, 4, 6, 3), num_classes)
