"""VGG with BatchNorm for CIFAR (vgg8, vgg13): five conv blocks, global average pooling, one linear layer.

Paper: `Very Deep Convolutional Networks for Large-Scale Image Recognition` (Simonyan & Zisserman, ICLR 2015) -
https://arxiv.org/abs/1409.1556. Block layout and state_dict keys follow the CIFAR-100 KD benchmark
(HobbitLong/RepDistiller ``models/vgg.py``, ``vgg8_bn``/``vgg13_bn``), so its teacher checkpoints load with
``strict=True``; as there, the convs keep their (redundant) bias.

Each ``blockN`` ends with a BN whose output is the stage's pre-activation feature (the benchmark's ``fN_pre``);
the ReLUs between blocks are non-inplace, so a hook on a block's output reads it intact. At 32 px the benchmark
skips the fourth max-pool (it applies it only to 64 px inputs), so blocks 3 and 4 both run at 4x4.
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.models import ModelInfo, ReparamSite, Tap, register_model
from pipeline.models.cifar.common import cifar_info
from pipeline.models.layers import init_conv_bn_

__all__ = ["VGG"]

_CFGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class VGG(nn.Module):
    """Conv blocks 0-4 (max-pool after blocks 0-2), ReLU, global average pool, linear classifier.

    Args:
        cfg: Output channels of each 3x3 conv, grouped by block.
        num_classes: Classifier outputs.
    """

    def __init__(self, cfg: tuple[tuple[int, ...], ...], num_classes: int = 100):
        super().__init__()
        in_chs = 3
        for i, widths in enumerate(cfg):
            self.add_module(f"block{i}", _make_block(in_chs, widths))
            in_chs = widths[-1]
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2, stride=2)
        self.act = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_chs, num_classes)
        init_conv_bn_(self)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu(self.block0(x)))
        x = self.pool(self.relu(self.block1(x)))
        x = self.pool(self.relu(self.block2(x)))
        return self.block4(self.relu(self.block3(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.act(x)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _make_block(in_chs: int, widths: tuple[int, ...]) -> nn.Sequential:
    """conv-BN-ReLU repeated, without the last ReLU (the network applies it, so the BN output can be tapped)."""
    layers: list[nn.Module] = []
    for out_chs in widths:
        layers += [nn.Conv2d(in_chs, out_chs, 3, padding=1), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True)]
        in_chs = out_chs
    return nn.Sequential(*layers[:-1])


def _info(name: str) -> ModelInfo:
    """Stage taps f2_pre, f3_pre, f4_pre (spec §2.2); sites: each of those blocks' last conv+BN."""
    stages = tuple(Tap(f"block{i}") for i in (2, 3, 4))
    sites = []
    for i, tap in zip((2, 3, 4), stages):
        last_conv = 3 * (len(_CFGS[name][i]) - 1)  # each conv adds conv, BN, ReLU; the block drops its last ReLU
        sites.append(ReparamSite(f"block{i}.{last_conv}", f"block{i}.{last_conv + 1}", tap))
    return cifar_info(name, stages, sites, f"{name.upper()} with BatchNorm (KD benchmark)", f"models/vgg.py:{name}_bn")


@register_model(_info("vgg8"))
def vgg8(num_classes: int = 100) -> VGG:
    return VGG(_CFGS["vgg8"], num_classes)


@register_model(_info("vgg13"))
def vgg13(num_classes: int = 100) -> VGG:
    return VGG(_CFGS["vgg13"], num_classes)
