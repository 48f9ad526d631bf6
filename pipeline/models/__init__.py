"""Model zoo: registered builders with their :class:`ModelInfo`.

Every builder has the signature ``builder(num_classes: int, **kwargs) -> nn.Module`` and the built
module carries ``model.info`` (a :class:`ModelInfo`). Names ``timm:<name>`` and ``torchvision:<name>``
build any classifier of those libraries (:mod:`pipeline.models.external`) with a probed ``info``.
Zoo models implement ``forward_features`` (ending at the last tap, pre-activation), ``forward_head`` and
``forward`` (logits only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.models.spec import ModelInfo, ReparamSite, Tap
from pipeline.registry import Registry

__all__ = [
    "MODELS",
    "ModelInfo",
    "ReparamSite",
    "Tap",
    "build_model",
    "check_model_name",
    "count_parameters",
    "list_models",
    "model_info",
    "register_model",
]


@dataclass(frozen=True)
class _Entry:
    builder: Callable
    info: ModelInfo


MODELS: Registry[_Entry] = Registry("model")


def register_model(info: ModelInfo) -> Callable[[Callable], Callable]:
    """Register ``builder`` under ``info.name``; the built model gets ``model.info = info``."""

    def decorate(builder: Callable) -> Callable:
        MODELS.register(_Entry(builder, info), name=info.name)
        return builder

    return decorate


def _load_zoo() -> None:
    # Importing the zoo modules runs their @register_model decorators.
    from pipeline.models import cifar, imagenet  # noqa: F401


def list_models() -> list[str]:
    _load_zoo()
    return MODELS.names()


def check_model_name(name: str) -> None:
    """A one-line :class:`ConfigError` for a name that is neither in the zoo nor a known timm/torchvision model."""
    from pipeline.models.external import check_external, is_external

    if is_external(name):
        check_external(name)
        return
    if name not in list_models():
        raise ConfigError(
            f"unknown model {name!r}; choose one of: {', '.join(list_models())}, or timm:<name> / torchvision:<name>"
        )


def model_info(name: str, input_size: int | None = None) -> ModelInfo:
    """A zoo model's declared info; for ``timm:``/``torchvision:`` names, the info probed at ``input_size``."""
    from pipeline.models.external import build_external, is_external

    if is_external(name):
        return build_external(name, 2, input_size).info
    _load_zoo()
    return MODELS.get(name).info


def build_model(name: str, num_classes: int, input_size: int | None = None, **kwargs) -> torch.nn.Module:  # noqa: F821
    """Build a registered model; unknown names raise a :class:`ConfigError` listing the valid ones.

    ``input_size`` matters only for ``timm:``/``torchvision:`` models (token grids, probed taps); a zoo model
    has its declared size.
    """
    from pipeline.models.external import build_external, is_external

    if num_classes < 1:
        raise ConfigError(f"num_classes must be positive, got {num_classes}")
    if is_external(name):
        return build_external(name, num_classes, input_size)
    _load_zoo()
    entry = MODELS.get(name)
    model = entry.builder(num_classes=num_classes, **{k: v for k, v in kwargs.items() if v is not None})
    model.info = entry.info
    return model


def count_parameters(model: torch.nn.Module) -> int:  # noqa: F821
    return sum(p.numel() for p in model.parameters())
