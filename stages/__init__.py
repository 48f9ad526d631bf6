"""The pipeline's stages, one module each, registered in run order.

A stage declares what it reads (upstream stages and user-supplied files), the parameters that
affect its result, and its checks; it writes only into the folder it is given. The runner
(:mod:`pipeline.runner`) alone hashes, skips and writes manifests.
"""

from __future__ import annotations

from stages.base import STAGES, Stage, StageContext, StageResult

__all__ = ["ORDER", "STAGES", "Stage", "StageContext", "StageResult", "get_stage"]

ORDER = ("teacher", "train", "fuse", "verify", "export", "engine")


def _load_stages() -> None:
    from stages import engine, export, fuse, teacher, train, verify  # noqa: F401


def get_stage(name: str) -> Stage:
    _load_stages()
    return STAGES.get(name)()
