"""Reading what runs left behind: manifests, ``history.json`` and the stages' JSON reports.

Nothing here recomputes a result; every figure comes from a file a stage wrote, so a run folder
copied from another machine reports exactly what that machine measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.artifacts.manifest import Manifest
from pipeline.artifacts.store import RunStore, modified
from pipeline.errors import ArtifactError, ConfigError
from pipeline.experiments.grid import is_sweep, read_sweep
from pipeline.stage_files import HISTORY, REPORT, TEACHER_CHECKPOINT


def _json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class RunData:
    """One run folder, as its files describe it."""

    root: Path
    manifests: dict[str, Manifest]  # in the order the stages ran
    labels: dict = field(default_factory=dict)  # a sweep cell's preset, method, seed and axis values
    name: str = ""

    @classmethod
    def read(cls, root: str | Path, labels: dict | None = None, name: str = "") -> RunData:
        store = RunStore(root)
        manifests = {stage: store.manifest(stage) for stage in store.stages()}
        ordered = sorted(manifests.items(), key=lambda kv: (kv[1].meta.get("started", ""), kv[0]))
        return cls(Path(root), dict(ordered), dict(labels or {}), name or Path(root).name)

    def metric(self, stage: str, key: str):
        m = self.manifests.get(stage)
        return m.metrics.get(key) if m else None

    def history(self, stage: str) -> list[dict]:
        data = self._output(stage, HISTORY)
        return data if isinstance(data, list) else []

    def stage_report(self, stage: str, name: str = REPORT) -> dict:
        data = self._output(stage, name)
        return data if isinstance(data, dict) else {}

    def _output(self, stage: str, name: str) -> dict | list | None:
        """A JSON file the stage wrote, re-hashed against its manifest as every stage reads its inputs; an edited
        one is refused. One that is missing (a partial copy of the folder) reads as absent."""
        manifest = self.manifests.get(stage)
        artifact = next((a for a in manifest.outputs if a.path == name), None) if manifest else None
        if artifact is None:
            return None
        problem = modified(self.root / stage, artifact)
        if problem == "missing":
            return None
        if problem:
            raise ArtifactError(
                f"{self.root / stage / name}: {problem} (it does not match the {stage} stage's manifest); rerun "
                "the stage with --force"
            )
        return _json(self.root / stage / name)

    @property
    def method(self) -> str | None:
        m = self.manifests.get("train")
        return m.params.get("method") if m else self.labels.get("method")

    @property
    def seed(self):
        m = self.manifests.get("train") or self.manifests.get("teacher")
        return m.params.get("seed") if m else self.labels.get("seed")

    @property
    def pair(self) -> tuple[str, str, str] | None:
        """(dataset, teacher, student) of a run that distilled a student."""
        teacher, train = self.manifests.get("teacher"), self.manifests.get("train")
        if not teacher or not train:
            return None
        return (train.params.get("data", {}).get("dataset", "?"), teacher.params["arch"], train.params["arch"])

    @property
    def teacher_sha256(self) -> str:
        m = self.manifests.get("teacher")
        return next((a.sha256 for a in m.outputs if a.path == TEACHER_CHECKPOINT), "") if m else ""

    @property
    def axes(self) -> dict:
        """Sweep axis values other than preset, method and seed (they tell apart rows of one method)."""
        return {k: v for k, v in self.labels.items() if k not in ("preset", "method", "seed")}


def read_runs(paths: list[str | Path], notes: list[str] | None = None) -> tuple[list[RunData], list[Path]]:
    """Every run under ``paths`` (run folders or sweep folders) and the sweep folders among them.

    A run met twice (a folder named twice, a sweep and one of its cells, a copied folder: the same ``train``
    manifest) is counted once, as its sweep cell where it is one, and ``notes`` gets a line saying so: a
    second copy would pass for a second seed.
    """
    runs: dict[tuple[str, str], RunData] = {}
    sweeps = []

    def add(run: RunData) -> None:
        train = run.manifests.get("train")
        key = ("train", train.digest) if train else ("folder", str(run.root.resolve()))
        first = runs.get(key)
        if first is None:
            runs[key] = run
            return
        if run.labels and not first.labels:  # keep the sweep's cell, with its labels
            runs[key] = run
            first, run = run, first
        if notes is None:
            return
        if run.root.resolve() == first.root.resolve():
            notes.append(f"{first.root}: named more than once (itself, or as a cell of a sweep); counted once")
        else:
            notes.append(f"{run.root} is a copy of {first.root} (the same train manifest); counted once")

    for path in map(Path, paths):
        if is_sweep(path):
            sweeps.append(path)
            for cell in read_sweep(path).cells:
                folder = cell.folder(path)
                if RunStore(folder).stages():
                    add(RunData.read(folder, cell.labels, cell.name))
        elif RunStore(path).stages():
            add(RunData.read(path))
        else:
            raise ConfigError(f"{path} is neither a run folder (stage manifests) nor a sweep folder (sweep.json)")
    return list(runs.values()), sweeps
