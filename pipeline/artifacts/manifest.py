"""The ``manifest.json`` every stage writes: what went in, what came out, what was checked.

Manifests are deterministic where it matters: artifact lists are sorted, keys are sorted, and the
fingerprint covers only result-affecting fields (it decides whether a stage is up to date). Timestamps,
hostnames and durations live in ``meta``, which the fingerprint does not cover.

Manifests are chained (docs/reliability.md, "What the manifest chain guarantees"): each records the ``digest`` of every
upstream manifest it consumed, and its own ``digest`` covers all of its content (outputs, status, checks,
metrics, the upstream digests). Reading a manifest re-computes its digest, so an edit is refused; an edit
whose digest was recomputed still breaks the link its downstream stages recorded. With a key in
``KDPIPE_MANIFEST_KEY`` each digest is also signed (HMAC-SHA256), so only a holder of the key can forge one.
"""

from __future__ import annotations

import functools
import hmac
import json
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Literal

from pipeline.artifacts.atomic import atomic_write_text
from pipeline.artifacts.checks import Check
from pipeline.artifacts.hashing import canonical_json, sha256_json
from pipeline.artifacts.machine import cpu_record
from pipeline.errors import ArtifactError

SCHEMA_VERSION = 2
KEY_ENV = "KDPIPE_MANIFEST_KEY"
_UNSIGNED = ("digest", "signature")  # the fields the digest cannot cover
MANIFEST = "manifest.json"
Status = Literal["ok", "failed", "skipped"]

_PACKAGES = ("torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy")


@dataclass(frozen=True)
class Artifact:
    """A file and its content hash. ``path`` is relative to the stage folder for outputs; for inputs
    it is relative to the run folder, or absolute for files from outside the run."""

    path: str
    sha256: str
    bytes: int = 0
    source: str = ""  # for inputs: the producing stage, or "external"


@dataclass
class Manifest:
    stage: str
    status: Status
    params: dict
    inputs: list[Artifact]
    outputs: list[Artifact]
    checks: list[Check]
    code_version: str
    reason: str = ""
    metrics: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    # sha256 of every source in the stage's import closure (pipeline.artifacts.code_version);
    # ``code_version`` hashes them.
    code_files: dict = field(default_factory=dict)
    # Upgrades the stage was kept across on purpose (``run --keep``): the code it was built with, and what changed.
    kept: list = field(default_factory=list)
    upstream: dict[str, str] = field(default_factory=dict)  # upstream stage -> digest of the manifest consumed
    schema: int = SCHEMA_VERSION

    @property
    def params_hash(self) -> str:
        return sha256_json(self.params)

    @property
    def inputs_hash(self) -> str:
        return sha256_json(sorted((a.path, a.sha256) for a in self.inputs))

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.stage, self.params, self.inputs, self.code_version)

    @property
    def passed(self) -> bool:
        return all(self.checks)

    def output(self, name: str) -> Artifact:
        for artifact in self.outputs:
            if artifact.path == name:
                return artifact
        raise ArtifactError(f"stage {self.stage!r} has no output {name!r}; it has: {[a.path for a in self.outputs]}")

    @property
    def digest(self) -> str:
        """A hash of everything the manifest says (outputs, status, checks, metrics, upstream digests, ...)."""
        return sha256_json(self._content())

    @property
    def accepted_digests(self) -> set[str]:
        """Its digest and those it had before ``run --keep`` rewrote it: a downstream stage may have consumed any."""
        return {self.digest} | {r["digest"] for r in self.kept if isinstance(r, dict) and "digest" in r}

    def _content(self) -> dict:
        data = asdict(self)
        data["inputs"] = sorted(data["inputs"], key=lambda a: a["path"])
        data["outputs"] = sorted(data["outputs"], key=lambda a: a["path"])
        data["fingerprint"] = self.fingerprint
        data["params_hash"] = self.params_hash
        data["inputs_hash"] = self.inputs_hash
        # Through JSON once, so the digest of a manifest read back equals the one computed before writing.
        return json.loads(json.dumps(data))

    def to_dict(self) -> dict:
        data = self._content()
        data["digest"] = sha256_json(data)
        key = manifest_key()
        if key:
            data["signature"] = sign(data["digest"], key)
        return data

    def write(self, folder: Path) -> Path:
        # Field order, not sorted: the stage's own order of metrics is how the run summary shows them.
        return atomic_write_text(folder / MANIFEST, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        if path.is_symlink() or folder.is_symlink():
            raise ArtifactError(f"{path} is a symbolic link; a stage's manifest must be a file in its stage folder")
        try:
            with open(path, "rb") as handle:
                raw = handle.read(MAX_MANIFEST_BYTES + 1)
            if len(raw) > MAX_MANIFEST_BYTES:
                raise ValueError(f"larger than {MAX_MANIFEST_BYTES >> 20} MiB")
            data = json.loads(raw)
        except FileNotFoundError:
            raise ArtifactError(f"{path} does not exist") from None
        except (OSError, ValueError, RecursionError) as exc:
            detail = str(exc)[:120]
            raise ArtifactError(f"{path} is not a readable manifest ({detail}); rerun the stage with --force") from None
        if not isinstance(data, dict):
            raise ArtifactError(f"{path} is not a manifest (a JSON {type(data).__name__}, not an object)")
        if data.get("schema") != SCHEMA_VERSION:
            raise ArtifactError(
                f"{path} has schema {repr(data.get('schema'))[:20]}, expected {SCHEMA_VERSION}; rerun with --force"
            )
        try:
            manifest = cls(
                stage=_typed(data["stage"], str, "stage"),
                status=_typed(data["status"], str, "status"),
                params=_typed(data["params"], dict, "params"),
                inputs=[_artifact(a, "inputs") for a in _typed(data["inputs"], list, "inputs")],
                outputs=[_artifact(a, "outputs") for a in _typed(data["outputs"], list, "outputs")],
                checks=[Check.from_dict(_typed(c, dict, "checks")) for c in _typed(data["checks"], list, "checks")],
                code_version=_typed(data["code_version"], str, "code_version"),
                reason=_typed(data.get("reason", ""), str, "reason"),
                metrics=_typed(data.get("metrics", {}), dict, "metrics"),
                environment=_typed(data.get("environment", {}), dict, "environment"),
                meta=_typed(data.get("meta", {}), dict, "meta"),
                upstream=_typed(data.get("upstream", {}), dict, "upstream"),
                code_files=_typed(data.get("code_files", {}), dict, "code_files"),
                kept=_typed(data.get("kept", []), list, "kept"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"{path} is missing or has malformed field {str(exc)[:120]}; rerun the stage with --force"
            ) from None
        if manifest.status not in ("ok", "failed", "skipped") or manifest.stage != folder.name:
            raise ArtifactError(f"{path} is not the manifest of stage {folder.name!r}; rerun the stage with --force")
        for artifact in manifest.outputs:
            problem = unsafe_path(artifact.path)
            if problem:
                raise ArtifactError(f"{path} lists the output {artifact.path[:120]!r}, which {problem}")
        for artifact in manifest.inputs:
            problem = unsafe_path(artifact.path) if artifact.source != "external" else ""
            if problem:
                raise ArtifactError(f"{path} lists the input {artifact.path[:120]!r}, which {problem}")
        stored = canonical_json({k: v for k, v in data.items() if k not in _UNSIGNED})
        if stored != canonical_json(manifest._content()) or data.get("digest") != manifest.digest:
            raise ArtifactError(
                f"{path} was edited after the stage wrote it (its digest does not match its content); "
                "rerun the stage with --force"
            )
        key = manifest_key()
        if key and not hmac.compare_digest(str(data.get("signature", "")), sign(manifest.digest, key)):
            what = "is not signed" if "signature" not in data else "has a signature that does not match"
            raise ArtifactError(f"{path} {what} with the key in {KEY_ENV}; rerun the stage with --force")
        return manifest


MAX_MANIFEST_BYTES = 64 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _typed(value, kind: type, name: str):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{name!r} (expected {kind.__name__})")
    return value


def _artifact(data, where: str) -> Artifact:
    _typed(data, dict, where)
    artifact = Artifact(**data)
    _typed(artifact.path, str, f"{where}.path")
    _typed(artifact.bytes, int, f"{where}.bytes")
    _typed(artifact.source, str, f"{where}.source")
    if not isinstance(artifact.sha256, str) or not _HEX64.fullmatch(artifact.sha256):
        raise ValueError(f"{where}.sha256 (expected 64 hex digits)")
    return artifact


def unsafe_path(path: str) -> str:
    """Why a manifest path could point outside its folder (absolute, ``..``, empty), or ``""`` if it cannot."""
    pure = PurePosixPath(path)
    if not path or path != path.strip() or "\0" in path or "\\" in path:
        return "is not a plain relative path"
    if pure.is_absolute() or ".." in pure.parts or path.startswith("~"):
        return "points outside its stage folder"
    if str(pure) != path:
        return "is not a normalized relative path"
    return ""


def manifest_key() -> bytes:
    """The signing key from the environment (empty: manifests are chained but not signed)."""
    return os.environ.get(KEY_ENV, "").encode()


def sign(digest: str, key: bytes) -> str:
    return hmac.new(key, digest.encode(), "sha256").hexdigest()


def fingerprint(stage: str, params: dict, inputs: list[Artifact], code: str) -> str:
    return sha256_json(
        {
            "stage": stage,
            "schema": SCHEMA_VERSION,
            "params": params,
            "inputs": sorted((a.path, a.sha256) for a in inputs),
            "code": code,
        }
    )


@functools.lru_cache(maxsize=1)
def _package_versions() -> dict[str, str]:
    """Installed versions (read once per process: parsing package metadata costs tens of milliseconds)."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def environment() -> dict:
    """Versions and devices that can change numbers; read without importing optional packages."""
    env: dict = {"python": platform.python_version(), "platform": platform.platform(), "executable": sys.executable}
    env.update(_package_versions())
    if "torch" in sys.modules:
        import torch

        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["cuda"] = torch.version.cuda
            env["gpu"] = torch.cuda.get_device_name()
            env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["torch_threads"] = torch.get_num_threads()
    env.update(cpu_record())
    return env
