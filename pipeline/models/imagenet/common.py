"""What the ImageNet-100 zoo's models share: their ModelInfo, built one way."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.models import ModelInfo, ReparamSite, Tap


def imagenet_info(
    name: str, stages: tuple[Tap, ...], sites: Sequence[ReparamSite], description: str, source: str
) -> ModelInfo:
    """A 224 px ImageNet-side model; ``source`` is where its architecture is defined (``library:name``)."""
    return ModelInfo(
        name=name,
        family="imagenet",
        input_size=224,
        stages=stages,
        reparam_sites=tuple(sites),
        description=description,
        extra={"source": source},
    )


def torchvision_info(name: str, stages: tuple[Tap, ...], sites: tuple[ReparamSite, ...]) -> ModelInfo:
    """A 224 px torchvision student whose stage taps were moved to pre-activation points."""
    return imagenet_info(name, stages, sites, f"torchvision {name} with pre-activation taps", f"torchvision:{name}")
