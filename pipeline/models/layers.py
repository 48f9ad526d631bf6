"""Small parts shared by the zoo: channel shuffle, the ShuffleNet V1 unit, and the benchmark's weight init.

ShuffleNet V1 comes from `ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices`
(Zhang et al., CVPR 2018) - https://arxiv.org/abs/1707.01083. Its unit is shared by the CIFAR variant (whose
state_dict keys follow the CIFAR-100 KD benchmark, HobbitLong/RepDistiller) and the ImageNet variant.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ShuffleV1Unit", "channel_shuffle", "init_conv_bn_"]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` groups (ShuffleNet §3.1).

    Written with ``unflatten``/``flatten`` instead of unpacking ``x.size()`` so that it traces with
    ``torch.fx`` and exports without shape arithmetic.
    """
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class ShuffleV1Unit(nn.Module):
    """ShuffleNet V1 unit: grouped 1x1, shuffle, depthwise 3x3, grouped 1x1, then add (stride 1) or concat (stride 2).

    The sum or concatenation before the final ReLU is the unit's pre-activation feature, so the ReLU is
    its own non-inplace module ``act``: a hook on ``act``'s input reads it intact. A network's last unit
    gets ``act=nn.Identity()`` and applies the ReLU in its head.

    Args:
        in_chs: Input channels.
        out_chs: Output channels of the unit (for stride 2 this includes the ``in_chs`` concatenated ones).
        mid_chs: Bottleneck channels.
        stride: 1 (residual add) or 2 (concat with a 3x3 average-pooled shortcut).
        groups: Groups of the second 1x1 conv, and of the first unless ``first_groups`` is given.
        first_groups: Groups of the first 1x1 conv (1 where its input has too few channels to split).
        dw_act: Apply a ReLU after the depthwise conv; the paper does not, the CIFAR benchmark code does.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        mid_chs: int,
        stride: int = 1,
        groups: int = 3,
        first_groups: int | None = None,
        dw_act: bool = False,
    ):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        branch_chs = out_chs - in_chs if stride == 2 else out_chs
        self.stride = stride
        self.first_groups = groups if first_groups is None else first_groups
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_chs)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, stride=stride, padding=1, groups=mid_chs, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.dw_act = nn.ReLU(inplace=True) if dw_act else nn.Identity()
        self.conv3 = nn.Conv2d(mid_chs, branch_chs, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_chs)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.act: nn.Module = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        if self.first_groups > 1:
            out = channel_shuffle(out, self.first_groups)
        out = self.dw_act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = torch.cat([out, self.shortcut(x)], 1) if self.stride == 2 else out + x
        return self.act(out)


@torch.no_grad()
def init_conv_bn_(model: nn.Module) -> None:
    """He-normal (fan-out) convs with zero bias, unit-gain zero-shift norms: the KD benchmark's init.

    RepDistiller writes it as ``normal_(0, sqrt(2 / (k * k * out_channels)))``, which is
    ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
