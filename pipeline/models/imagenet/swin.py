"""Swin Transformer teachers (swin_t, swin_s, swin_b) at 224 px, from timm.

Paper: `Swin Transformer: Hierarchical Vision Transformer using Shifted Windows` (Liu et al., ICCV 2021) -
https://arxiv.org/abs/2103.14030.

:class:`SwinTeacher` *is* timm's ``SwinTransformer`` (a subclass), so its state_dict keys are timm's and a timm
checkpoint of the same variant loads with ``strict=True``; it is always built with ``pretrained=False``, so
nothing is downloaded. timm keeps features channels-last (B, H, W, C) while the distillation taps of KDiffusion
spec §2.2 are channels-first, so stateless :class:`NchwView` modules in the forward path give hooks an NCHW view
(no copy): ``stage_out.1`` (stage-2, 2C@28x28), ``stage_out.2`` (stage-3, 4C@14x14) and ``norm_out`` (stage-4
after the final LayerNorm, 8C@7x7), which is also what ``forward_features`` returns.
"""

from __future__ import annotations

from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg
from timm.models.swin_transformer import SwinTransformer
from torch import Tensor, nn

from pipeline.models import ModelInfo, Tap, register_model
from pipeline.models.imagenet.common import imagenet_info

__all__ = ["NchwView", "SwinTeacher"]


class NchwView(nn.Module):
    """(B, H, W, C) -> (B, C, H, W) as a view: a hook point that yields channels-first features."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)


class SwinTeacher(SwinTransformer):
    """timm's SwinTransformer with an NCHW ``forward_features`` that passes through the tap modules.

    Keyword arguments are timm's ``SwinTransformer`` arguments.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stage_out = nn.ModuleList(NchwView() for _ in range(len(self.layers) - 1))
        self.norm_out = NchwView()
        # Pool the NCHW feature directly; ``input_fmt`` is updated too so that timm's reset_classifier agrees.
        self.head.input_fmt = "NCHW"
        self.head.global_pool = SelectAdaptivePool2d(pool_type=self.global_pool, flatten=True, input_fmt="NCHW")

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i < len(self.stage_out):
                self.stage_out[i](x)  # the result is unused: the call is there for hooks on stage_out.i
        return self.norm_out(self.norm(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# registry name -> (timm variant, architecture arguments as in timm's registered builders)
_CFGS: dict[str, tuple[str, dict]] = {
    "swin_t": (
        "swin_tiny_patch4_window7_224",
        dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    ),
    "swin_s": (
        "swin_small_patch4_window7_224",
        dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    ),
    "swin_b": (
        "swin_base_patch4_window7_224",
        dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    ),
}


def _create_swin(name: str, num_classes: int, **kwargs) -> SwinTeacher:
    variant, arch = _CFGS[name]
    # pretrained=False: timm only attaches its config table (mean, std, input size); it fetches nothing.
    return build_model_with_cfg(SwinTeacher, variant, pretrained=False, num_classes=num_classes, **{**arch, **kwargs})


def _info(name: str) -> ModelInfo:
    variant = _CFGS[name][0]
    stages = (Tap("stage_out.1"), Tap("stage_out.2"), Tap("norm_out"))
    return imagenet_info(name, stages, (), f"Swin Transformer teacher (timm {variant})", f"timm:{variant}")


@register_model(_info("swin_t"))
def swin_t(num_classes: int = 100, **kwargs) -> SwinTeacher:
    return _create_swin("swin_t", num_classes, **kwargs)


@register_model(_info("swin_s"))
def swin_s(num_classes: int = 100, **kwargs) -> SwinTeacher:
    return _create_swin("swin_s", num_classes, **kwargs)


@register_model(_info("swin_b"))
def swin_b(num_classes: int = 100, **kwargs) -> SwinTeacher:
    return _create_swin("swin_b", num_classes, **kwargs)
