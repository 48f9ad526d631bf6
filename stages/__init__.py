"""The pipeline's stages, one module each, found by discovery and ordered by what they read.

A stage declares what it reads (upstream stages and user-supplied files), what it writes, the parameters
that affect its result, and its checks; it writes only into the folder it is given. The runner
(:mod:`pipeline.cli.runner`) alone hashes, skips and writes manifests.

This package imports no stage module by name: :func:`load_stages` imports every module in it (each
registers its stage), and the run order is the topological order of the stages' ``requires()``. A stage's
code fingerprint covers the modules it imports (:mod:`pipeline.artifacts.code_version`), and this file is one of
them, so listing the stages here would tie every stage's fingerprint to every other stage's code.
"""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.config import Config
from stages.base import STAGES, Stage, StageContext, StageResult

__all__ = ["STAGES", "Stage", "StageContext", "StageResult", "get_stage", "load_stages", "stage_order"]


def load_stages() -> list[str]:
    """Import every module of this package, which registers its stages; the registered names. Subpackages
    (``stages.support``) hold helpers, not stages, and are left to the stages that import them."""
    for module in pkgutil.iter_modules(__path__):
        if not module.ispkg:
            importlib.import_module(f"{__name__}.{module.name}")
    return STAGES.names()


def get_stage(name: str) -> Stage:
    """A fresh instance of stage ``name``; an unknown name is a ConfigError listing the registered ones."""
    load_stages()
    return STAGES.get(name)()


def stage_order() -> tuple[str, ...]:
    """Every stage, each after the stages it ``requires()`` under the default configuration (ties by name).

    One fixed order for every run: a setting that drops a requirement (``export.checkpoint``) changes what a
    stage reads, not where it runs.
    """
    cfg = Config()
    needs = {name: set(get_stage(name).requires(cfg)) for name in load_stages()}
    order: list[str] = []
    while needs:
        ready = sorted(name for name, deps in needs.items() if deps <= set(order))
        if not ready:
            raise RuntimeError(f"the stages' requires() form a cycle among {sorted(needs)}")
        order.append(ready[0])
        del needs[ready[0]]
    return tuple(order)
