"""What the pipeline needs to know about an architecture, declared once next to its builder.

Distillation reads features through forward hooks at the places named here, so model ``forward``
methods stay plain (logits only) and exportable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Tap:
    """A feature read by a forward hook on ``path`` (a ``get_submodule`` path).

    ``io="input"`` reads the module's first positional input: hooking an activation module's input
    gives the pre-activation feature. Activation modules used as taps must not be in-place.
    ``layout`` says how the tensor is laid out so the hook can hand every method an NCHW map:
    ``nhwc`` (timm's Swin stages), ``nlc`` tokens after ``prefix_tokens`` class/register tokens on a
    square grid (ViT blocks), ``nc`` a pooled vector (read as ``N x C x 1 x 1``).
    """

    path: str
    io: Literal["input", "output"] = "output"
    layout: Literal["nchw", "nhwc", "nlc", "nc"] = "nchw"
    prefix_tokens: int = 0


@dataclass(frozen=True)
class ReparamSite:
    """A conv+BN pair that KDiffusion may replace with an m-branch block (spec §2.1).

    ``tap`` reads the block's downstream pre-activation feature (after the residual add or concat
    that follows the BN). ``embed`` says how a branch output enters that feature: ``identity`` (it is
    added, or it is the feature) or ``concat_tail`` (it is the last channels of a concatenation).
    """

    conv: str
    bn: str
    tap: Tap
    embed: Literal["identity", "concat_tail"] = "identity"


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about one registered architecture.

    ``stages`` are the distillation taps, shallow to deep, pre-activation where the spec asks; the
    last one is the feature ``forward_features`` returns, so ``forward_head`` is the head that
    follows it. ``reparam_sites`` pairs each of the deepest stages with the conv+BN to re-parameterize,
    in the same order; the last site is the Single-Layer site. ``head`` is the teacher head the
    target guide applies to the last stage tap: ``""`` for the model's ``forward_head``, the path of the
    ``nn.Linear`` classifier when the last tap is its (pooled, ``nc``) input, ``None`` when there is none.
    """

    name: str
    family: Literal["cifar", "imagenet", "timm", "torchvision"]
    input_size: int
    stages: tuple[Tap, ...] = ()
    reparam_sites: tuple[ReparamSite, ...] = ()
    description: str = ""
    head: str | None = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)


def model_name(model: object) -> str:
    """A built model's architecture name (its ``info.name``), or its class name when it has none: for messages."""
    return getattr(getattr(model, "info", None), "name", type(model).__name__)
