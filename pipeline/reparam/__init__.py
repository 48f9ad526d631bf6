"""Deploy-time rewrites that keep a model's function and remove training-only structure.

One protocol: a module that can be rewritten implements ``fuse() -> nn.Module`` (under
``torch.no_grad``), and :func:`fuse_model` walks a model, replaces every such module, then folds
each remaining conv -> BatchNorm pair. The result is the plain student with its BatchNorms folded.

Training-time structure changes (such as KDiffusion's m-branch blocks) register an ``apply``
function in :data:`REPARAMS` under a ``kind``; checkpoints record ``{"kind": ..., **settings}`` so
the same structure can be rebuilt before loading the weights.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from pipeline.errors import ConfigError
from pipeline.registry import Registry
from pipeline.reparam.fold import conv_bn_pairs, fold_batchnorm, fuse_model

__all__ = ["REPARAMS", "apply_reparam", "conv_bn_pairs", "fold_batchnorm", "fuse_model"]

REPARAMS: Registry[Callable[..., nn.Module]] = Registry("re-parameterization")


def _load_kinds() -> None:
    import pipeline.reparam.multibranch  # noqa: F401


def apply_reparam(model: nn.Module, settings: dict) -> nn.Module:
    """Rebuild the training-time structure recorded in a checkpoint (in place); ``{}`` is a no-op."""
    if not settings:
        return model
    _load_kinds()
    settings = dict(settings)
    apply = REPARAMS.get(settings.pop("kind"))
    known = inspect.signature(apply).parameters
    unknown = sorted(set(settings) - set(known) - {"model"})
    if unknown:  # a record edited, or written by a newer version
        raise ConfigError(f"unknown re-parameterization setting {unknown[0]!r}; known: {', '.join(list(known)[1:])}")
    return apply(model, **settings)
