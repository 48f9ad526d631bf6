"""Model zoo: registered builders with their :class:`ModelInfo`.

Every builder has the signature ``builder(num_classes: int, **kwargs) -> nn.Module`` and the built
module carries ``model.info`` (a :class:`ModelInfo`). Models implement ``forward_features`` (ending at
the last tap, pre-activation), ``forward_head`` and ``forward`` (logits only).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.models.spec import ModelInfo, ReparamSite, Tap
from pipeline.registry import Registry

__all__ = ["MODELS", "ModelInfo", "ReparamSite", "Tap", "build_model", "count_parameters", "list_models", "model_info", "register_model"]


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
    from pipeline.models import cifar  # noqa: F401

    # The ImageNet zoo is merged from another branch; until then this branch has only the CIFAR one.
    if importlib.util.find_spec("pipeline.models.imagenet") is not None:
        importlib.import_module("pipeline.models.imagenet")


def list_models() -> list[str]:
    _load_zoo()
    return MODELS.names()


def model_info(name: str) -> ModelInfo:
    _load_zoo()
    return MODELS.get(name).info


def build_model(name: str, num_classes: int, **kwargs) -> torch.nn.Module:  # noqa: F821
    """Build a registered model; unknown names raise a :class:`ConfigError` listing the valid ones."""
    _load_zoo()
    entry = MODELS.get(name)
    if num_classes < 1:
        raise ConfigError(f"num_classes must be positive, got {num_classes}")
    model = entry.builder(num_classes=num_classes, **{k: v for k, v in kwargs.items() if v is not None})
    model.info = entry.info
    return model


def count_parameters(model: torch.nn.Module) -> int:  # noqa: F821
    return sum(p.numel() for p in model.parameters())
