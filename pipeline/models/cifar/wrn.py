"""Wide ResNet for CIFAR (wrn_16_2, wrn_40_1, wrn_40_2).

Paper: `Wide Residual Networks` (Zagoruyko & Komodakis, BMVC 2016) - https://arxiv.org/abs/1605.07146.
Layout and state_dict keys follow the CIFAR-100 KD benchmark (HobbitLong/RepDistiller ``models/wrn.py``), so
its teacher checkpoints load with ``strict=True``.

The blocks are pre-activation (BN-ReLU-conv), so a stage's distillation feature is the *next* BN's output:
``block2.layer[0].bn1(f1)``, ``block3.layer[0].bn1(f2)`` and the final ``bn1(f3)`` (KDiffusion spec §2.2). The
ReLUs right after those BNs are non-inplace, so hooks on their inputs read them intact. The conv+BN pair that
can be re-parameterized is ``conv1``+``bn2`` inside a block (``conv2`` feeds an addition, not a BN).
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.models import ModelInfo, ReparamSite, Tap, register_model
from pipeline.models.cifar.common import cifar_info
from pipeline.models.layers import init_conv_bn_

__all__ = ["NetworkBlock", "WideBasicBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; where the shape changes, the shortcut is a 1x1 conv of the *activated* input."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.convShortcut: nn.Module | None = None
        if in_chs != out_chs:
            self.convShortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class NetworkBlock(nn.Module):
    """One resolution stage: ``layer`` holds its blocks (a key level the benchmark's checkpoints have)."""

    def __init__(self, num_blocks: int, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        blocks = [WideBasicBlock(in_chs, out_chs, stride)]
        blocks += [WideBasicBlock(out_chs, out_chs, 1) for _ in range(num_blocks - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: a 3x3 stem, three stages of ``(depth - 4) / 6`` blocks (16k, 32k, 64k channels), BN-ReLU head.

    Args:
        depth: 6n+4.
        widen_factor: k.
        num_classes: Classifier outputs.
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a WideResNet has depth 6n+4, got {depth}")
        n = (depth - 4) // 6
        chs = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, chs[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, chs[0], chs[1], 1)
        self.block2 = NetworkBlock(n, chs[1], chs[2], 2)
        self.block3 = NetworkBlock(n, chs[2], chs[3], 2)
        self.bn1 = nn.BatchNorm2d(chs[3])
        self.act = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chs[3], num_classes)
        init_conv_bn_(self)
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.bn1(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(self.act(x)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _info(name: str, depth: int, widen_factor: int) -> ModelInfo:
    """Stage taps: the BN that follows each stage, before its ReLU; sites: conv1+bn2 of each stage's last block."""
    last = (depth - 4) // 6 - 1
    stages = (Tap("block2.layer.0.relu1", "input"), Tap("block3.layer.0.relu1", "input"), Tap("act", "input"))
    sites = tuple(
        ReparamSite(f"{block}.conv1", f"{block}.bn2", Tap(f"{block}.relu2", "input"))
        for block in (f"block{i}.layer.{last}" for i in (1, 2, 3))
    )
    return cifar_info(name, stages, sites, f"WRN-{depth}-{widen_factor} (KD benchmark)", f"models/wrn.py:{name}")


@register_model(_info("wrn_16_2", 16, 2))
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


@register_model(_info("wrn_40_1", 40, 1))
def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


@register_model(_info("wrn_40_2", 40, 2))
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)
