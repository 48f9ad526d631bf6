"""The stage contract."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from pipeline.artifacts.checks import Check
from pipeline.artifacts.manifest import Artifact
from pipeline.artifacts.store import RunStore, StageArtifacts
from pipeline.config import Config
from pipeline.registry import Registry


@dataclass
class StageResult:
    """What a stage reports back; the runner turns it into the manifest."""

    checks: list[Check] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    status: Literal["ok", "skipped"] = "ok"
    reason: str = ""


@dataclass
class StageContext:
    cfg: Config
    store: RunStore
    out: Path  # staging folder: the only place the stage writes
    scratch: Path  # survives a crash; for resume state
    inputs: dict[str, StageArtifacts]  # verified upstream stages
    external: dict[str, Artifact]  # verified user-supplied files
    log: Callable[[str], None] = print
    logdir: Path | None = None  # for logs that are not artifacts (TensorBoard); None on non-zero ranks

    def external_path(self, name: str) -> Path:
        return Path(self.external[name].path)

    @functools.cached_property
    def device(self):
        from pipeline.training import resolve_device

        return resolve_device(self.cfg.device)


class Stage:
    """Subclasses set ``name`` and implement :meth:`params` and :meth:`run`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    # The files every successful run of the stage writes (others may come with some settings); consumers
    # name them through the constants in pipeline.stage_files, never by importing the producing stage.
    outputs: ClassVar[tuple[str, ...]] = ()
    # Part of the stage's code version (pipeline.artifacts.code_version): bump it when the stage's results change for a
    # reason its sources' hashes cannot see, e.g. a data file it reads or a dependency whose behaviour changed.
    version: ClassVar[int] = 1
    # Under torchrun: True runs the stage on every rank (it trains with DDP; rank 0 alone commits its
    # folder), False runs it on rank 0 alone as a single process.
    distributed: ClassVar[bool] = False

    def requires(self, cfg: Config) -> tuple[str, ...]:
        """Upstream stages whose outputs this stage reads (they are verified before it runs)."""
        return ()

    def externals(self, cfg: Config) -> dict[str, str]:
        """User-supplied files this stage reads, by role (hashed into the fingerprint)."""
        return {}

    def validate(self, cfg: Config) -> None:
        """Raise a ConfigError for settings this stage cannot use; runs before any stage of the run starts."""

    def params(self, cfg: Config) -> dict:
        """The result-affecting configuration; anything not here must not change the outputs."""
        raise NotImplementedError

    def run(self, ctx: StageContext) -> StageResult:
        raise NotImplementedError


STAGES: Registry[type[Stage]] = Registry("stage")


def register_stage(cls: type[Stage]) -> type[Stage]:
    return STAGES.register(cls, name=cls.name)
