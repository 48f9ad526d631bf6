"""KDiffusion's m-branch block: m parallel conv+BN copies of one student layer, averaged (spec §3, §9).

The block replaces an existing conv+BN pair *inside* the student [D1]: the conv's slot holds the block
and the BN's slot becomes ``Identity`` (or, for timm's norm-act layers, the activation they apply), so
everything downstream consumes the branch mean unchanged.
Each branch output ``BN_i(Conv_i(h))`` is one "student feature" of the diffusion chain; the distiller
reads them with forward hooks on ``<conv path>.branches.<i>.bn``.

At deployment :meth:`MultiBranchConvBN.fuse` folds each branch's BN, zero-pads smaller kernels and
averages the kernels into one conv with bias (eq. 7 with a_i = 1/m, RepVGG/DBB algebra [D18]); the
BN slot stays ``Identity``. The fused student therefore has exactly the keys, shapes, parameter count
and FLOPs of the vanilla student with its BatchNorms folded.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from pipeline.compare import diff_stats, magnitude
from pipeline.errors import ConfigError
from pipeline.models.hooks import FeatureTaps, submodule
from pipeline.models.spec import ReparamSite, Tap, model_name
from pipeline.reparam import REPARAMS
from pipeline.reparam.fold import norm_tail

__all__ = [
    "MultiBranchConvBN",
    "apply_multibranch",
    "block_fusion_errors",
    "branch_tap",
    "check_branchable",
    "multibranch_blocks",
]


class MultiBranchConvBN(nn.Module):
    """``y = (1/m) Σ_i BN_i(Conv_i(h))``, fusable into one conv.

    Every branch copies the template conv's hyper-parameters (stride, padding, dilation, groups) and
    the template BN's (eps, momentum, affine); a 1x1 conv stays 1x1 [D8]. Conv weights are drawn
    independently with the zoo's He fan-out init; each BN starts from the template's γ and β (1 and 0
    for a freshly built student), optionally γ·√m so the mean keeps the layer's initial scale.

    Args:
        conv: The replaced conv (its hyper-parameters are copied; its weights are not used).
        bn: The BatchNorm that consumed its output.
        m: Number of branches.
        mixed_kernels: Where the kernel is larger than 1x1, make the second half of the branches 1x1
            (zero-padded at fusion, so deploy cost is unchanged).
        scale_init: Initialise every branch's γ at √m times the template's.
        bias: Give branch convs a bias (redundant before a BN; the fusion handles it).
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        m: int = 4,
        mixed_kernels: bool = False,
        scale_init: bool = False,
        bias: bool = False,
    ):
        super().__init__()
        check_branchable(conv, bn)
        if m < 1:
            raise ValueError(f"an m-branch block needs m >= 1, got m={m}")
        self.m = m
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding, self.dilation = tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation)
        self.groups, self.in_channels, self.out_channels = conv.groups, conv.in_channels, conv.out_channels
        small = m // 2 if mixed_kernels and self.kernel_size != (1, 1) else 0
        if small:
            _check_mixable(conv)
        gamma = bn.weight.detach().clone() if bn.affine else None
        if gamma is not None and scale_init:
            gamma = gamma * math.sqrt(m)
        self.branches = nn.ModuleList()
        for i in range(m):
            kernel = (1, 1) if i >= m - small else self.kernel_size
            padding = tuple(p - d * (k - 1) // 2 for p, d, k in zip(self.padding, self.dilation, self.kernel_size))
            branch_conv = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                kernel,
                stride=self.stride,
                padding=self.padding if kernel == self.kernel_size else padding,
                dilation=self.dilation,
                groups=self.groups,
                bias=bias,
                device=conv.weight.device,
                dtype=conv.weight.dtype,
            )
            nn.init.kaiming_normal_(branch_conv.weight, mode="fan_out", nonlinearity="relu")
            if bias:
                nn.init.zeros_(branch_conv.bias)
            branch_bn = nn.BatchNorm2d(
                bn.num_features,
                eps=bn.eps,
                momentum=bn.momentum,
                affine=bn.affine,
                device=conv.weight.device,
                dtype=conv.weight.dtype,
            )
            if gamma is not None:
                with torch.no_grad():
                    branch_bn.weight.copy_(gamma)
                    branch_bn.bias.copy_(bn.bias.detach())
            self.branches.append(nn.Sequential(OrderedDict(conv=branch_conv, bn=branch_bn)))

    @property
    def branch_kernel_sizes(self) -> list[tuple[int, int]]:
        return [tuple(b.conv.kernel_size) for b in self.branches]

    def forward(self, x: Tensor) -> Tensor:
        # A fresh tensor even for m = 1: downstream in-place ops (``out += identity``) must not alter
        # a branch output that a hook has captured.
        return torch.stack([branch(x) for branch in self.branches]).mean(0)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """One conv with bias computing the eval-mode block output (BN running statistics)."""
        weight, bias = fused_weights(self)
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=True,
            device=weight.device,
            dtype=weight.dtype,
        )
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        return conv

    @torch.no_grad()
    def fuse_conv_bn(self) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        """The fused block as a bias-free conv and a BatchNorm that adds the bias exactly (eps 0, unit variance).

        For blocks that re-parameterize themselves (timm's RepVGG/MobileOne) and read a conv + BN at the
        slots the m-branch block took; ``norm_path`` is where the BN goes back.
        """
        fused = self.fuse()
        bias = fused.bias
        fused.bias = None
        bn = nn.BatchNorm2d(self.out_channels, eps=0.0, device=bias.device, dtype=bias.dtype).eval()
        bn.bias.copy_(bias)
        return fused, bn

    def extra_repr(self) -> str:
        return f"m={self.m}, kernels={self.branch_kernel_sizes}"


@torch.no_grad()
def fused_weights(block: MultiBranchConvBN) -> tuple[Tensor, Tensor]:
    """``(W, b)`` = the mean over branches of the BN-folded, zero-padded kernels and biases.

    Summed in float64 and rounded once, so the fused layer's error is that of a single fp32 conv.
    """
    kh, kw = block.kernel_size
    weight = torch.zeros(0)
    bias = torch.zeros(0)
    for i, branch in enumerate(block.branches):
        conv, bn = branch.conv, branch.bn
        w, b = fuse_conv_bn_weights(
            conv.weight.double(),
            None if conv.bias is None else conv.bias.double(),
            bn.running_mean.double(),
            bn.running_var.double(),
            bn.eps,
            None if bn.weight is None else bn.weight.double(),
            None if bn.bias is None else bn.bias.double(),
        )
        ph, pw = (kh - w.shape[2]) // 2, (kw - w.shape[3]) // 2
        w = F.pad(w, [pw, pw, ph, ph])
        weight = w if i == 0 else weight + w
        bias = b if i == 0 else bias + b
    dtype = block.branches[0].conv.weight.dtype
    return (weight / block.m).to(dtype), (bias / block.m).to(dtype)


def branch_tap(site: ReparamSite | str, index: int) -> Tap:
    """Where branch ``index``'s output ``BN_i(Conv_i(h))`` of the block at ``site`` is read."""
    conv = site.conv if isinstance(site, ReparamSite) else site
    return Tap(f"{conv}.branches.{index}.bn")


def multibranch_blocks(model: nn.Module) -> dict[str, MultiBranchConvBN]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiBranchConvBN)}


@REPARAMS.register(name="multibranch")
def apply_multibranch(
    model: nn.Module,
    sites: Iterable[ReparamSite | Sequence[str]],
    m: int = 4,
    mixed_kernels: bool = False,
    scale_init: bool = False,
) -> nn.Module:
    """Replace each site's conv by an m-branch block and its BN by ``Identity`` (in place).

    ``sites`` are :class:`ReparamSite` objects or ``(conv_path, bn_path)`` pairs (the form kept in
    checkpoint metadata, so :func:`pipeline.reparam.apply_reparam` can rebuild a trained student).
    """
    pairs = [(s.conv, s.bn) if isinstance(s, ReparamSite) else tuple(s) for s in sites]
    if not pairs:
        raise ConfigError(f"no re-parameterization sites given for model {model_name(model)!r}")
    for conv_path, bn_path in pairs:
        conv, bn = submodule(model, conv_path), submodule(model, bn_path)
        if isinstance(conv, MultiBranchConvBN):
            raise ConfigError(f"{conv_path} of model {model_name(model)!r} is already an m-branch block")
        try:
            block = MultiBranchConvBN(conv, bn, m=m, mixed_kernels=mixed_kernels, scale_init=scale_init)
        except ValueError as exc:
            raise ConfigError(f"cannot re-parameterize {conv_path} of model {model_name(model)!r}: {exc}") from None
        block.train(model.training)
        block.norm_path = bn_path  # where fuse_conv_bn's BatchNorm goes back (a plain attribute, not state)
        model.set_submodule(conv_path, block)
        model.set_submodule(bn_path, norm_tail(bn))
    return model


@torch.no_grad()
def block_fusion_errors(model: nn.Module, images: Tensor) -> dict[str, dict[str, float]]:
    """Per m-branch block: statistics of ``block.fuse()(h) - block(h)`` on the inputs ``h`` it sees, and ``scale``,
    max ``|block(h)|``.

    ``model`` runs once in eval mode on ``images`` (its output is discarded) to capture each block's
    real input; the comparison then runs block by block, so one bad block cannot hide behind another.
    """
    blocks = multibranch_blocks(model)
    if not blocks:
        return {}
    was_training = model.training
    model.eval()
    try:
        with FeatureTaps(model, {name: Tap(name, "input") for name in blocks}) as taps:
            model(images)
        errors = {}
        for name, block in blocks.items():
            reference = block(taps.features[name])
            errors[name] = {**diff_stats(reference, block.fuse()(taps.features[name])), "scale": magnitude(reference)}
        return errors
    finally:
        model.train(was_training)


def check_branchable(conv: nn.Module, bn: nn.Module) -> None:
    """Raise ``ValueError`` saying why ``conv`` + ``bn`` cannot become an m-branch block (nothing if they can)."""
    if type(conv) is not nn.Conv2d:
        raise ValueError(f"expected an nn.Conv2d, found {type(conv).__name__}")
    if type(bn) is not nn.BatchNorm2d and not (isinstance(bn, nn.BatchNorm2d) and hasattr(bn, "act")):
        raise ValueError(f"expected an nn.BatchNorm2d after the conv, found {type(bn).__name__}")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"the BatchNorm has {bn.num_features} features but the conv {conv.out_channels} outputs")
    if not bn.track_running_stats:
        raise ValueError("the BatchNorm keeps no running statistics, so it cannot be folded")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(
            f"only explicit zero padding can be fused, found padding={conv.padding!r} ({conv.padding_mode})"
        )


def _check_mixable(conv: nn.Conv2d) -> None:
    kernel, padding, dilation = conv.kernel_size, conv.padding, conv.dilation
    if any(k % 2 == 0 for k in kernel):
        raise ValueError(f"mixed kernels need an odd kernel, found {tuple(kernel)}")
    if any(p < d * (k - 1) // 2 for p, d, k in zip(padding, dilation, kernel)):
        raise ValueError(f"mixed kernels need 'same'-style padding, found padding {tuple(padding)} for {tuple(kernel)}")
