"""The run folder: the only way stages read and write artifacts.

Every read goes through :meth:`RunStore.load`, which re-hashes the producer's outputs against its
manifest, so a modified, missing or failed artifact is refused instead of silently consumed. Every
write is atomic: a stage builds its folder under a temporary name, the manifest is written last, and
the folder is renamed into place, so a crash never leaves a half-written stage that looks complete.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ArtifactError, ConfigError
from pipeline.hashing import sha256_file
from pipeline.manifest import MANIFEST, Artifact, Manifest

_STAGING = ".staging"
_SCRATCH = ".scratch"
_LOGS = "tensorboard"
_LOCK = ".lock"


@dataclass(frozen=True)
class StageArtifacts:
    """A verified stage folder: its manifest and the paths of its outputs."""

    stage: str
    folder: Path
    manifest: Manifest

    def path(self, name: str) -> Path:
        self.manifest.output(name)
        return self.folder / name

    def as_input(self, name: str, run: Path) -> Artifact:
        artifact = self.manifest.output(name)
        return Artifact(str((self.folder / name).relative_to(run)), artifact.sha256, artifact.bytes, self.stage)


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def ensure_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as exc:
            raise ConfigError(
                f"run folder {self.root} is not writable ({exc.strerror}); choose another with --out"
            ) from None

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run folder for one run: a second run into it would resume from the first's scratch
        state while the first still writes it. An flock dies with its process, so a crash never leaves
        the folder locked; where the file system has no locks (some network mounts), runs are not locked."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks
            yield
            return
        with open(self.root / _LOCK, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    yield
                    return
                handle.seek(0)
                owner = handle.read().strip()
                raise ConfigError(
                    f"run folder {self.root} is in use by another run{f' (pid {owner})' if owner else ''}; "
                    "wait for it to finish or choose another --out"
                ) from None
            handle.truncate(0)
            handle.write(str(os.getpid()))
            handle.flush()
            yield

    def folder(self, stage: str) -> Path:
        return self.root / stage

    def manifest(self, stage: str) -> Manifest | None:
        """The stage's manifest if the stage has run, else ``None``; unreadable manifests raise."""
        if not (self.folder(stage) / MANIFEST).exists():
            return None
        return Manifest.read(self.folder(stage))

    def stages(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file()) if self.root.is_dir() else []

    def load(self, stage: str) -> StageArtifacts:
        """Open a stage's outputs for a consumer, refusing anything that does not re-hash."""
        folder = self.folder(stage)
        manifest = self.manifest(stage)
        if manifest is None:
            raise ArtifactError(
                f"stage {stage!r} has no artifacts in {self.root}; "
                f"run `python -m pipeline run {stage} --out {self.root}` first"
            )
        if manifest.status != "ok":
            why = f": {manifest.reason}" if manifest.reason else ""
            raise ArtifactError(
                f"stage {stage!r} in {self.root} is {manifest.status}{why}; fix it and rerun that stage"
            )
        for artifact in manifest.outputs:
            problem = modified(folder, artifact)
            if problem:
                raise ArtifactError(
                    f"{folder / artifact.path} is {problem} since stage {stage!r} wrote it; "
                    f"rerun `python -m pipeline run {stage} --force --out {self.root}`"
                )
        return StageArtifacts(stage, folder, manifest)

    def outputs_intact(self, stage: str, manifest: Manifest) -> str:
        """Empty string if every output re-hashes, else why not (for skip decisions)."""
        for artifact in manifest.outputs:
            problem = modified(self.folder(stage), artifact)
            if problem:
                return f"{artifact.path} is {problem}"
        return ""

    def staging(self, stage: str) -> Path:
        """A fresh, empty folder for a stage to write into before it is committed."""
        base = self.root / _STAGING
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{stage}-", dir=base))

    def scratch(self, stage: str, key: str) -> Path:
        """A folder that survives a crash (resume state), keyed so a changed stage never reuses it."""
        path = self.root / _SCRATCH / f"{stage}-{key[:16]}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def logs(self, stage: str) -> Path:
        """Where a stage's TensorBoard events go: outside its hashed folder, and kept across crashes and reruns."""
        return self.root / _LOGS / stage

    def drop_scratch(self, stage: str) -> None:
        for path in (self.root / _SCRATCH).glob(f"{stage}-*"):
            shutil.rmtree(path, ignore_errors=True)

    def commit(self, staged: Path, manifest: Manifest) -> Path:
        """Write the manifest last, then swap the staged folder into place."""
        manifest.write(staged)
        _fsync_tree(staged)
        target = self.folder(manifest.stage)
        if target.exists():
            old = self.root / _STAGING / f"{manifest.stage}-replaced-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            # Invalidate the old folder first: once its manifest is gone it can never look complete.
            (target / MANIFEST).unlink(missing_ok=True)
            target.rename(old)
            staged.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staged.rename(target)
        return target

    def amend(self, manifest: Manifest) -> Path:
        """Replace a committed stage's manifest (atomically), leaving its outputs as they are."""
        return manifest.write(self.folder(manifest.stage))

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)


def modified(folder: Path, artifact: Artifact) -> str:
    path = folder / artifact.path
    if not path.is_file():
        return "missing"
    if path.stat().st_size != artifact.bytes or sha256_file(path) != artifact.sha256:
        return "modified"
    return ""


def describe_file(folder: Path, name: str) -> Artifact:
    path = folder / name
    return Artifact(name, sha256_file(path), path.stat().st_size)


def external_input(path: str | Path) -> Artifact:
    """Hash a user-supplied file so it takes part in the fingerprint like any stage output."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist or is not a file")
    return Artifact(str(path.resolve()), sha256_file(path), path.stat().st_size, "external")


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
