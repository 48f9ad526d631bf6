"""What the torchvision students of the ImageNet-100 zoo share."""

from __future__ import annotations

from pipeline.models import ModelInfo, ReparamSite, Tap


def torchvision_info(name: str, stages: tuple[Tap, ...], sites: tuple[ReparamSite, ...]) -> ModelInfo:
    """A 224 px torchvision student whose stage taps were moved to pre-activation points."""
    return ModelInfo(
        name=name,
        family="imagenet",
        input_size=224,
        stages=stages,
        reparam_sites=sites,
        description=f"torchvision {name} with pre-activation taps",
        extra={"source": f"torchvision:{name}"},
    )
