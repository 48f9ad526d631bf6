"""ResNet-18 student at 224 px: torchvision's model with a hookable pre-activation after each residual sum.

Paper: `Deep Residual Learning for Image Recognition` (He et al., CVPR 2016) - https://arxiv.org/abs/1512.03385.

torchvision's ``BasicBlock`` applies one in-place ``relu`` module both inside the block and after the residual
sum, so neither a hook nor ``forward_features`` can reach the sum itself. :class:`BasicBlock` here gives the
post-sum ReLU its own non-inplace module ``act`` (stateless, so torchvision's state_dict keys are unchanged and
its checkpoints load with ``strict=True``); the last block leaves that ReLU to the head, so ``forward_features``
ends at ``layer4[1].bn2(...) + identity``, the KDiffusion Single-Layer tap (spec §2.1).
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

from pipeline.models import ModelInfo, ReparamSite, Tap, register_model
from pipeline.models.imagenet.common import torchvision_info

__all__ = ["BasicBlock", "ResNet"]


class BasicBlock(tv_resnet.BasicBlock):
    """torchvision's basic block with the post-sum ReLU in its own non-inplace ``act`` module."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.act: nn.Module = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + identity)


class ResNet(tv_resnet.ResNet):
    """torchvision's ResNet split into ``forward_features`` (ending pre-activation) and ``forward_head``.

    Args and keyword arguments are torchvision's ``ResNet`` ones.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer4[-1].act = nn.Identity()
        self.act = nn.ReLU()

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(self.act(x)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _info(name: str, layers: tuple[int, int, int, int]) -> ModelInfo:
    """Stage taps: each stage's last block after the sum, before its ReLU (56, 28, 14, 7 px); sites: the deepest 3."""
    last = [n - 1 for n in layers]
    stages = (*(Tap(f"layer{i}.{last[i - 1]}.act", "input") for i in (1, 2, 3)), Tap("act", "input"))
    sites = tuple(
        ReparamSite(f"layer{i}.{last[i - 1]}.conv2", f"layer{i}.{last[i - 1]}.bn2", stages[i - 1]) for i in (2, 3, 4)
    )
    return torchvision_info(name, stages, sites)


@register_model(_info("resnet18", (2, 2, 2, 2)))
def resnet18(num_classes: int = 100, **kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kwargs)
