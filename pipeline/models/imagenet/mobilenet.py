"""MobileNetV2 and MobileNetV3-Large students at 224 px: torchvision's models with a hookable last activation.

Papers: `MobileNetV2: Inverted Residuals and Linear Bottlenecks` (Sandler et al., CVPR 2018) -
https://arxiv.org/abs/1801.04381; `Searching for MobileNetV3` (Howard et al., ICCV 2019) -
https://arxiv.org/abs/1905.02244.

In torchvision the last 1x1 conv is a ``Conv2dNormActivation`` whose activation (ReLU6 / Hardswish) is in-place,
so it would overwrite the BN output a hook had captured. Here ``features[-1]`` keeps only its conv and BN
(indices 0 and 1, so torchvision's state_dict keys and checkpoints still load with ``strict=True``) and the
activation becomes the model's non-inplace ``act``: ``forward_features`` ends at the BN, the KDiffusion
Single-Layer tap (spec §2.1). The inverted residuals end linearly, so their outputs are pre-activation already;
MobileNetV3's adds its shortcut in place, onto the project BN's output (a re-parameterization site), so
:class:`InvertedResidualV3` adds it out of place.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import mobilenetv2 as tv_mobilenetv2
from torchvision.models import mobilenetv3 as tv_mobilenetv3

from pipeline.models import ModelInfo, ReparamSite, Tap, register_model
from pipeline.models.imagenet.common import torchvision_info

__all__ = ["InvertedResidualV3", "MobileNetV2", "MobileNetV3"]


def _end_at_last_bn(features: nn.Sequential) -> None:
    """Keep only the conv and BN of the last conv-BN-activation; the model's own ``act`` replaces the activation."""
    features[-1] = nn.Sequential(features[-1][0], features[-1][1])


class MobileNetV2(tv_mobilenetv2.MobileNetV2):
    """torchvision's MobileNetV2 split into ``forward_features`` (ending at the last BN) and ``forward_head``.

    Keyword arguments are torchvision's ``MobileNetV2`` ones.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        _end_at_last_bn(self.features)
        self.act = nn.ReLU6()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.classifier(nn.functional.adaptive_avg_pool2d(self.act(x), 1).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class InvertedResidualV3(tv_mobilenetv3.InvertedResidual):
    """torchvision's MobileNetV3 block with an out-of-place shortcut, so a hook on its last BN's output stays valid."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3(tv_mobilenetv3.MobileNetV3):
    """torchvision's MobileNetV3 split into ``forward_features`` (ending at the last BN) and ``forward_head``.

    Args:
        arch: ``mobilenet_v3_large`` or ``mobilenet_v3_small``.
        **kwargs: torchvision's ``MobileNetV3`` keyword arguments (``num_classes``, ``dropout``, ...).
    """

    def __init__(self, arch: str = "mobilenet_v3_large", **kwargs):
        # torchvision keeps the block table in this helper; its public builders call it the same way.
        setting, last_channel = tv_mobilenetv3._mobilenet_v3_conf(arch)
        super().__init__(setting, last_channel, block=InvertedResidualV3, **kwargs)
        _end_at_last_bn(self.features)
        self.act = nn.Hardswish()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.act(x)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _info(name: str, stage_ends: tuple[int, ...], sites: tuple[tuple[str, str], ...]) -> ModelInfo:
    """Stage taps at the end of each resolution (112, 56, 28, 14, 7 px); one site in each of the deepest three.

    Args:
        name: Registry name.
        stage_ends: Index in ``features`` of the last inverted residual at 112, 56, 28 and 14 px; their outputs
            are residual sums of a linear projection, hence pre-activation.
        sites: (conv, BN) paths: the project conv+BN of the 28 and 14 px stage ends, then the final 1x1 conv+BN.
    """
    stages = (*(Tap(f"features.{i}") for i in stage_ends), Tap("act", "input"))
    return torchvision_info(name, stages, tuple(ReparamSite(c, b, tap) for (c, b), tap in zip(sites, stages[-3:])))


_MOBILENET_V2_SITES = (
    ("features.6.conv.2", "features.6.conv.3"),
    ("features.13.conv.2", "features.13.conv.3"),
    ("features.18.0", "features.18.1"),
)
_MOBILENET_V3_LARGE_SITES = (
    ("features.6.block.3.0", "features.6.block.3.1"),
    ("features.12.block.3.0", "features.12.block.3.1"),
    ("features.16.0", "features.16.1"),
)


@register_model(_info("mobilenet_v2", (1, 3, 6, 13), _MOBILENET_V2_SITES))
def mobilenet_v2(num_classes: int = 100, **kwargs) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, **kwargs)


@register_model(_info("mobilenet_v3_large", (1, 3, 6, 12), _MOBILENET_V3_LARGE_SITES))
def mobilenet_v3_large(num_classes: int = 100, **kwargs) -> MobileNetV3:
    return MobileNetV3("mobilenet_v3_large", num_classes=num_classes, **kwargs)
