"""ShuffleNet V2 1.0x student at 224 px: torchvision's model with hookable pre-activation concatenations.

Paper: `ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design` (Ma et al., ECCV 2018) -
https://arxiv.org/abs/1807.11164.

In torchvision a stride-1 unit ends its branch with an in-place ReLU and then concatenates, so the unit's
pre-activation feature ``concat(x1, branch(x2))`` (spec §2.1, ``embed="concat_tail"``) never exists as a tensor.
:class:`InvertedResidual` here drops that last ReLU from ``branch2`` (it is the last, stateless entry, so
torchvision's state_dict keys are unchanged and its checkpoints load with ``strict=True``) and applies a
non-inplace ``act`` to the whole concatenation instead. That is the same function, because ``x1`` is the output
of an earlier ReLU and so non-negative. Likewise ``conv5`` keeps only its conv and BN and its ReLU becomes the
model's ``act``, so ``forward_features`` ends at the Single-Layer tap.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import shufflenetv2 as tv_shufflenetv2

from pipeline.models import ModelInfo, ReparamSite, Tap, register_model
from pipeline.models.imagenet.common import torchvision_info
from pipeline.models.layers import channel_shuffle

__all__ = ["InvertedResidual", "ShuffleNetV2"]


class InvertedResidual(tv_shufflenetv2.InvertedResidual):
    """torchvision's ShuffleNetV2 unit; at stride 1 the ReLU acts on the concatenation, as the module ``act``."""

    def __init__(self, inp: int, oup: int, stride: int):
        super().__init__(inp, oup, stride)
        if self.stride == 1:
            self.branch2 = nn.Sequential(*list(self.branch2)[:-1])
            self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = self.act(torch.cat((x1, self.branch2(x2)), dim=1))
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(tv_shufflenetv2.ShuffleNetV2):
    """torchvision's ShuffleNetV2 split into ``forward_features`` (ending at conv5's BN) and ``forward_head``.

    Args and keyword arguments are torchvision's ``ShuffleNetV2`` ones.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, inverted_residual=InvertedResidual, **kwargs)
        self.conv5 = nn.Sequential(self.conv5[0], self.conv5[1])
        self.act = nn.ReLU()

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        return self.conv5(self.stage4(self.stage3(self.stage2(x))))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.act(x).mean((2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _info(name: str, repeats: tuple[int, int, int]) -> ModelInfo:
    """Stage taps at the end of each resolution (28, 14, 7 px; the 7 px stage ends with conv5).

    Sites: the last unit's final 1x1 conv+BN (``branch2.5``/``branch2.6``, the tail of the concatenation) at 28
    and 14 px, then conv5 (spec §2.1 Single Layer).
    """
    last2, last3 = repeats[0] - 1, repeats[1] - 1
    stages = (Tap(f"stage2.{last2}.act", "input"), Tap(f"stage3.{last3}.act", "input"), Tap("act", "input"))
    sites = (
        ReparamSite(f"stage2.{last2}.branch2.5", f"stage2.{last2}.branch2.6", stages[0], embed="concat_tail"),
        ReparamSite(f"stage3.{last3}.branch2.5", f"stage3.{last3}.branch2.6", stages[1], embed="concat_tail"),
        ReparamSite("conv5.0", "conv5.1", stages[2]),
    )
    return torchvision_info(name, stages, sites)


@register_model(_info("shufflenet_v2_x1_0", (4, 8, 4)))
def shufflenet_v2_x1_0(num_classes: int = 100, **kwargs) -> ShuffleNetV2:
    return ShuffleNetV2([4, 8, 4], [24, 116, 232, 464, 1024], num_classes=num_classes, **kwargs)
