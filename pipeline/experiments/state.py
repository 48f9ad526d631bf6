"""Whether a sweep task (a cell or a shared teacher run) is finished and still up to date.

When a task's run exits 0, the sweep writes a small record beside its manifests: the arguments it ran
with, a hash of the project's sources, each stage's fingerprint and the hash of the teacher file it
imported. A rerun of the sweep skips the task only while all of these still hold, every output re-hashes
and an ImageFolder it read lists the same images; anything else is handed back to ``python -m pipeline run``,
which reruns only its stale stages and resumes training from its last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.artifacts.atomic import atomic_write_text
from pipeline.artifacts.code_version import combined_digest, project_sources
from pipeline.artifacts.hashing import sha256_file
from pipeline.artifacts.store import RunStore
from pipeline.errors import PipelineError

RECORD = "sweep-task.json"
_READERS = ("pipeline/experiments/", "pipeline/report/", "pipeline/cli")  # they read runs; they make none


def sources_digest() -> str:
    """One hash of every project source that can change a run (the sweep and report code left out).

    Coarser than the runner's own per-stage code check on purpose: any change sends the task back to
    ``python -m pipeline run``, which then decides stage by stage what is really stale. Each source counts by
    the same code digest as the runner's (comments and docstrings left out), so editing them reruns nothing.
    """
    return combined_digest({name: sha for name, sha in project_sources().items() if not name.startswith(_READERS)})


def _teacher_hash(args: list[str] | tuple[str, ...]) -> str:
    if "--teacher-checkpoint" not in args:
        return ""
    path = Path(args[list(args).index("--teacher-checkpoint") + 1])
    return sha256_file(path) if path.is_file() else "missing"


def _folder_changed(data: object) -> bool:
    """An ImageFolder whose images changed since the stage read it (its ``data.files``): the run decides what
    reruns."""
    if not isinstance(data, dict) or "files" not in data:
        return False
    from pipeline.data.folders import listing_digest

    return listing_digest(str(data.get("root"))) != data["files"]


def mark_finished(folder: Path, args: list[str] | tuple[str, ...]) -> None:
    """Record a run that exited 0 (the run's own manifests are already committed)."""
    store = RunStore(folder)
    record = {
        "args": list(args),
        "sources": sources_digest(),
        "fingerprints": {name: store.manifest(name).fingerprint for name in store.stages()},
        "teacher_sha256": _teacher_hash(args),
    }
    atomic_write_text(folder / RECORD, json.dumps(record, indent=2) + "\n")


def is_up_to_date(folder: Path, args: list[str] | tuple[str, ...], code: str | None = None) -> bool:
    """True when the task finished with these arguments and this code and nothing of it changed since."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return False
    if record.get("args") != list(args) or record.get("sources") != (code or sources_digest()):
        return False
    if record.get("teacher_sha256", "") != _teacher_hash(args):
        return False
    store = RunStore(folder)
    fingerprints = record.get("fingerprints") or {}
    if not fingerprints or set(fingerprints) != set(store.stages()):
        return False
    try:
        for name, fp in fingerprints.items():
            manifest = store.manifest(name)
            if manifest is None or manifest.fingerprint != fp or store.outputs_intact(name, manifest):
                return False
            if _folder_changed(manifest.params.get("data")):
                return False
    except PipelineError:  # an unreadable or hand-edited manifest: let the run say what is wrong
        return False
    return True
