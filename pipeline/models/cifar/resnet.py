"""ResNet for CIFAR: the 6n+2 family (resnet20/56/110) and its 4x-wide variants (resnet8x4, resnet32x4).

Paper: `Deep Residual Learning for Image Recognition` (He et al., CVPR 2016) - https://arxiv.org/abs/1512.03385,
§4.2. Widths, depths and state_dict keys follow the CIFAR-100 KD benchmark (HobbitLong/RepDistiller
``models/resnet.py``), so its teacher checkpoints (``{'model': state_dict}``) load with ``strict=True``.

Each block's post-addition ReLU is its own non-inplace module ``act`` so that a hook on its input reads the
pre-activation stage feature (the benchmark's ``preact=True`` features). The network's last block has no
activation: ``forward_features`` ends at that pre-activation feature and ``forward_head`` applies the ReLU.
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.models import ModelInfo, ReparamSite, Tap, register_model
from pipeline.models.cifar.common import cifar_info
from pipeline.models.layers import init_conv_bn_

__all__ = ["BasicBlock", "ResNet"]


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a (1x1 conv+BN when the shape changes) shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )
        self.act: nn.Module = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        # Not in-place: a hook on bn2's output (a re-parameterized branch) must see it unchanged.
        out = self.bn2(self.conv2(out)) + shortcut
        return self.act(out)


class ResNet(nn.Module):
    """3x3 stem and three stages of ``(depth - 2) / 6`` basic blocks at strides 1, 2, 2.

    Args:
        depth: 6n+2.
        widths: Channels of the stem and of the three stages.
        num_classes: Classifier outputs.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _make_stage(widths[0], widths[1], n, stride=1)
        self.layer2 = _make_stage(widths[1], widths[2], n, stride=2)
        self.layer3 = _make_stage(widths[2], widths[3], n, stride=2)
        self.layer3[-1].act = nn.Identity()
        self.act = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_conv_bn_(self)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(self.act(x)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _make_stage(in_chs: int, out_chs: int, num_blocks: int, stride: int) -> nn.Sequential:
    blocks = [BasicBlock(in_chs, out_chs, stride)]
    blocks += [BasicBlock(out_chs, out_chs) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def _info(name: str, depth: int) -> ModelInfo:
    """Stage taps: each stage's last block before its ReLU (the head's ReLU for the last stage)."""
    last = (depth - 2) // 6 - 1
    stages = (Tap(f"layer1.{last}.act", "input"), Tap(f"layer2.{last}.act", "input"), Tap("act", "input"))
    sites = tuple(
        ReparamSite(f"layer{i}.{last}.conv2", f"layer{i}.{last}.bn2", tap) for i, tap in zip((1, 2, 3), stages)
    )
    return cifar_info(name, stages, sites, f"CIFAR ResNet-{depth} (KD benchmark)", f"models/resnet.py:{name}")


@register_model(_info("resnet20", 20))
def resnet20(num_classes: int = 100) -> ResNet:
    return ResNet(20, (16, 16, 32, 64), num_classes)


@register_model(_info("resnet56", 56))
def resnet56(num_classes: int = 100) -> ResNet:
    return ResNet(56, (16, 16, 32, 64), num_classes)


@register_model(_info("resnet110", 110))
def resnet110(num_classes: int = 100) -> ResNet:
    return ResNet(110, (16, 16, 32, 64), num_classes)


@register_model(_info("resnet8x4", 8))
def resnet8x4(num_classes: int = 100) -> ResNet:
    return ResNet(8, (32, 64, 128, 256), num_classes)


@register_model(_info("resnet32x4", 32))
def resnet32x4(num_classes: int = 100) -> ResNet:
    return ResNet(32, (32, 64, 128, 256), num_classes)
