"""What the CIFAR-100 zoo's models share: their ModelInfo, built one way."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.models import ModelInfo, ReparamSite, Tap


def cifar_info(
    name: str, stages: tuple[Tap, ...], sites: Sequence[ReparamSite], description: str, source: str
) -> ModelInfo:
    """A 32 px CIFAR model; ``source`` is where RepDistiller defines it (``models/<file>.py:<function>``)."""
    return ModelInfo(
        name=name,
        family="cifar",
        input_size=32,
        stages=stages,
        reparam_sites=tuple(sites),
        description=description,
        extra={"source": f"RepDistiller:{source}"},
    )
