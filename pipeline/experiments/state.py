"""Whether a sweep task (a cell or a shared teacher run) is finished and still up to date.

When a task's run exits 0, the sweep writes a small record beside its manifests: the arguments it ran
with, the code version, each stage's fingerprint and the hash of the teacher file it imported. A
rerun of the sweep skips the task only while all of these still hold and every output re-hashes;
anything else is handed back to ``python -m pipeline run``, which reruns only its stale stages and
resumes training from its last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.hashing import code_version, sha256_file
from pipeline.store import RunStore

RECORD = "sweep-task.json"


def _teacher_hash(args: list[str] | tuple[str, ...]) -> str:
    if "--teacher-checkpoint" not in args:
        return ""
    path = Path(args[list(args).index("--teacher-checkpoint") + 1])
    return sha256_file(path) if path.is_file() else "missing"


def mark_finished(folder: Path, args: list[str] | tuple[str, ...]) -> None:
    """Record a run that exited 0 (the run's own manifests are already committed)."""
    store = RunStore(folder)
    record = {
        "args": list(args),
        "code_version": code_version(),
        "fingerprints": {name: store.manifest(name).fingerprint for name in store.stages()},
        "teacher_sha256": _teacher_hash(args),
    }
    tmp = folder / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(folder / RECORD)


def is_up_to_date(folder: Path, args: list[str] | tuple[str, ...], code: str | None = None) -> bool:
    """True when the task finished with these arguments and this code and nothing of it changed since."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return False
    if record.get("args") != list(args) or record.get("code_version") != (code or code_version()):
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
    except PipelineError:  # an unreadable or hand-edited manifest: let the run say what is wrong
        return False
    return True
