"""The run folder: the only way stages read and write artifacts.

Every read goes through :meth:`RunStore.load`, which re-hashes the producer's outputs against its
manifest, so a modified, missing or failed artifact is refused instead of silently consumed. Every
write is atomic: a stage builds its folder under a temporary name, the manifest is written last, and
the folder is renamed into place, so a crash never leaves a half-written stage that looks complete.

The store owns its run folder and nothing else: it refuses a non-empty folder it did not make, never
follows a symbolic link it finds where it keeps its own files, and reads artifacts only inside their
stage folder.
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

from pipeline.artifacts.atomic import plain_mode
from pipeline.artifacts.hashing import sha256_file
from pipeline.artifacts.manifest import MANIFEST, Artifact, Manifest, unsafe_path
from pipeline.errors import ArtifactError, ConfigError, clipped, no_space, one_line, short_path

_STAGING = ".staging"
_SCRATCH = ".scratch"
_LOGS = "tensorboard"
LOCK = ".lock"
_CACHE = ".cache"
MARKER = ".kdpipe-run"  # says "a run folder": the pipeline may write and delete in it
_OWN = (MARKER, LOCK, _STAGING, _SCRATCH, _LOGS, _CACHE)


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
        """Claim the run folder: create it, or check that an existing one is a run folder, then mark it."""
        self.check_owned()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
            marker = self.root / MARKER
            if not marker.exists():
                marker.write_text("a kdiffusion-pipeline run folder: its stages may be rewritten and deleted\n")
        except OSError as exc:
            raise ConfigError(
                f"run folder {self.root} is not writable ({exc.strerror}); choose another with --out"
            ) from None

    def is_run_folder(self) -> bool:
        """Marked as one, or (made before the marker existed) holding only stage folders with a manifest
        and the store's own files."""
        if (self.root / MARKER).is_file():
            return True
        entries = list(self.root.iterdir())
        stages = [p for p in entries if p.name not in _OWN and not p.name.startswith(".probe-")]
        return all(p.is_dir() and not p.is_symlink() and (p / MANIFEST).is_file() for p in stages)

    def check_owned(self, stages: tuple[str, ...] = ()) -> None:
        """Refuse to work in a folder the pipeline does not own, or where a link would lead it outside.

        A non-empty ``--out`` that is not a run folder could hold anything (``teacher/thesis.txt``), and a
        rerun replaces stage folders; a symbolic link in place of the lock, staging, scratch or a stage
        folder would make the store write or delete elsewhere.
        """
        if not self.root.exists():
            return
        if not self.root.is_dir():
            raise ConfigError(f"run folder {self.root} is not a folder; choose another with --out")
        try:
            if any(self.root.iterdir()) and not self.is_run_folder():
                raise ConfigError(
                    f"{self.root} is not empty and is not a run folder; the pipeline replaces and deletes what is "
                    "in its run folders, so choose an empty or new folder with --out"
                )
        except OSError as exc:
            raise ConfigError(f"run folder {self.root} is not readable ({exc.strerror})") from None
        for name in (*_OWN, *stages):
            path = self.root / name
            if path.is_symlink():
                raise ArtifactError(
                    f"{path} is a symbolic link; the pipeline follows no links out of its run folder, "
                    "so remove it (or choose another --out)"
                )
            if name in stages and path.exists() and not path.is_dir():
                raise ArtifactError(f"{path} is not a stage folder (a file is in its place); move it away and rerun")

    def clean_leftovers(self) -> list[str]:
        """Remove what killed runs left in staging (only while holding the lock, so no run is using it)."""
        staging = self.root / _STAGING
        if not staging.is_dir() or staging.is_symlink():
            return []
        removed = []
        for path in sorted(staging.iterdir()):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
        return removed

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run folder for one run: a second run into it would resume from the first's scratch
        state while the first still writes it."""
        with hold_folder(self.root, "run folder", "run"):
            yield

    def folder(self, stage: str) -> Path:
        return self.root / stage

    def manifest(self, stage: str) -> Manifest | None:
        """The stage's manifest if the stage has run, else ``None``; unreadable manifests raise."""
        folder = self.folder(stage)
        if folder.is_symlink():
            raise ArtifactError(f"{folder} is a symbolic link; the pipeline follows no links out of its run folder")
        if folder.exists() and not folder.is_dir():
            raise ArtifactError(f"{folder} is not a stage folder (a file is in its place); move it away and rerun")
        if not (folder / MANIFEST).exists() and not (folder / MANIFEST).is_symlink():
            return None
        return Manifest.read(folder)

    def stages(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file() or (p / MANIFEST).is_symlink())

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
        self.check_chain(stage, manifest)
        return StageArtifacts(stage, folder, manifest)

    def check_chain(self, stage: str, manifest: Manifest, seen: set[str] | None = None) -> None:
        """Every upstream manifest ``stage`` consumed is still the one it recorded, all the way up the chain."""
        problem = self.broken_link(stage, manifest, seen if seen is not None else set())
        if problem:
            raise ArtifactError(f"{problem}; rerun `python -m pipeline run {stage} --force --out {self.root}`")

    def broken_link(self, stage: str, manifest: Manifest, seen: set[str]) -> str:
        """Why the chain above ``stage`` no longer matches what it recorded, or ``""``."""
        for upstream, digest in sorted(manifest.upstream.items()):
            if upstream in seen:
                continue
            seen.add(upstream)
            current = self.manifest(upstream)
            if current is None:
                return f"stage {stage!r} consumed {upstream!r}, whose manifest is gone"
            if digest not in current.accepted_digests:
                return (
                    f"{self.folder(upstream) / MANIFEST} changed after stage {stage!r} consumed it "
                    f"(digest {digest[:12]} recorded, {current.digest[:12]} now): {upstream!r} was edited or rerun"
                )
            problem = self.broken_link(upstream, current, seen)
            if problem:
                return problem
        return ""

    def audit(self, stage: str) -> tuple[Manifest | None, list[str]]:
        """A stage's manifest (if readable) and every problem with it: edited, outputs modified, chain broken."""
        try:
            manifest = self.manifest(stage)
        except ArtifactError as exc:
            return None, [str(exc)]
        if manifest is None:
            return None, [f"{self.folder(stage) / MANIFEST} is missing"]
        problems = []
        intact = self.outputs_intact(stage, manifest)
        if intact:
            problems.append(f"{self.folder(stage) / intact} since the stage wrote it")
        try:
            link = self.broken_link(stage, manifest, set())
        except ArtifactError as exc:
            link = str(exc)
        if link:
            problems.append(link)
        return manifest, problems

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
        return plain_mode(tempfile.mkdtemp(prefix=f"{stage}-", dir=base))

    def scratch(self, stage: str, key: str) -> Path:
        """A folder that survives a crash (resume state), keyed so a changed stage never reuses it."""
        path = self.root / _SCRATCH / f"{stage}-{key[:16]}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def cache(self, kind: str) -> Path:
        """A folder of keyed caches (INT8 calibration, TensorRT timing): outside stage folders, kept across reruns."""
        return self.root / _CACHE / kind

    def logs(self, stage: str) -> Path:
        """Where a stage's TensorBoard events go: outside its hashed folder, and kept across crashes and reruns."""
        return self.root / _LOGS / stage

    def drop_scratch(self, stage: str) -> None:
        scratch = self.root / _SCRATCH
        if scratch.is_symlink():
            return
        for path in scratch.glob(f"{stage}-*"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def commit(self, staged: Path, manifest: Manifest) -> Path:
        """Write the manifest last, then swap the staged folder into place."""
        manifest.write(staged)
        _fsync_tree(staged)
        target = self.folder(manifest.stage)
        self.check_owned((manifest.stage,))
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


@contextmanager
def hold_folder(root: Path, kind: str, user: str) -> Iterator[None]:
    """An exclusive lock on ``root`` (its ``.lock`` file, holding our pid) for one ``user`` at a time. An flock
    dies with its process, so a crash never leaves the folder locked; where the file system has no locks (some
    network mounts), nothing is locked."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks
        yield
        return
    try:  # O_NOFOLLOW: a symbolic link in place of the lock must not make us overwrite its target
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        raise ArtifactError(f"cannot open the {user} lock {root / LOCK} ({exc.strerror}); remove it") from None
    with open(fd, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                yield
                return
            handle.seek(0)
            owner = handle.read().strip()
            raise ConfigError(
                f"{kind} {root} is in use by another {user}{f' (pid {owner})' if owner else ''}; "
                "wait for it to finish or choose another --out"
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def modified(folder: Path, artifact: Artifact) -> str:
    path = folder / artifact.path
    if unsafe_path(artifact.path) or path.is_symlink():
        return "outside its stage folder"
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except OSError:
        inside = False
    if not inside:
        return "outside its stage folder"
    if not path.is_file():
        return "missing"
    if path.stat().st_size != artifact.bytes or sha256_file(path) != artifact.sha256:
        return "modified"
    return ""


def describe_file(folder: Path, name: str) -> Artifact:
    path = folder / name
    return Artifact(name, sha256_file(path), path.stat().st_size)


def external_input(path: str | Path, what: str = "") -> Artifact:
    """Hash a user-supplied file so it takes part in the fingerprint like any stage output."""
    path = check_external(path, what)
    try:
        return Artifact(str(path.resolve()), sha256_file(path), path.stat().st_size, "external")
    except OSError as exc:
        raise ArtifactError(f"cannot read {short_path(path)}: {exc.strerror}") from None


def check_external(path: str | Path, what: str = "") -> Path:
    """A user-supplied file (``what``: its setting) must be a readable file; checked without reading it, as a
    sweep checks every cell's before the first starts."""
    path = Path(path).expanduser()
    named = f"{what} {short_path(path)}" if what else short_path(path)
    try:
        if not path.is_file():
            raise ArtifactError(f"{named} does not exist or is not a file")
        if not os.access(path, os.R_OK):
            raise ArtifactError(f"cannot read {named}: permission denied")
    except OSError as exc:  # a name too long for the system, a loop of links
        raise ArtifactError(f"cannot read {named}: {exc.strerror}") from None
    return path


@contextmanager
def disk_errors(what: str, root: Path) -> Iterator[None]:
    """A full disk (or a quota, exhausted inodes, a read-only file system) as one line instead of a traceback."""
    try:
        yield
    except Exception as exc:
        if not no_space(exc):
            raise
        if isinstance(exc, OSError):
            cause = f"{exc.strerror} ({exc.filename or free_space(root)})"
        else:
            cause = (
                f"a file could not be written, the disk is likely full ({clipped(one_line(exc))}; {free_space(root)})"
            )
        raise ArtifactError(f"{what} failed: {cause}; nothing was committed, free space and rerun") from None


LOW_SPACE = 64 * 2**20


def free_space(root: Path, below: float = float("inf")) -> str:
    """What the disks of the run folder and of the temporary folder have free (those with less than ``below``)."""
    places = {}
    for label, folder in (("the run folder", root), ("the temporary folder", Path(tempfile.gettempdir()))):
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            continue
        if free < below:
            places.setdefault(free, f"{free / 2**20:.1f} MiB free for {label} {folder}")
    return ", ".join(places.values())


def low_space(root: Path) -> str:
    """A note for a stage that failed on a nearly full disk: some libraries (ONNX's shape inference) write a
    truncated file there without an error and then fail to read it, saying nothing of space."""
    low = free_space(root, below=LOW_SPACE)
    return f"only {low}; if a disk filled up, free space and rerun" if low else ""


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
