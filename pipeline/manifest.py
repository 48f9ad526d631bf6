"""The ``manifest.json`` every stage writes: what went in, what came out, what was checked.

Manifests are deterministic where it matters: artifact lists are sorted, keys are sorted, and the
fingerprint covers only result-affecting fields. Timestamps, hostnames and durations live in
``meta``, which no hash covers.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Literal

from pipeline.atomic import atomic_write_text
from pipeline.checks import Check
from pipeline.errors import ArtifactError
from pipeline.hashing import sha256_json

SCHEMA_VERSION = 1
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
    # sha256 of every source in the stage's import closure (pipeline.code_version); ``code_version`` hashes them.
    code_files: dict = field(default_factory=dict)
    # Upgrades the stage was kept across on purpose (``run --keep``): the code it was built with, and what changed.
    kept: list = field(default_factory=list)
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

    def to_dict(self) -> dict:
        data = asdict(self)
        data["inputs"] = sorted(data["inputs"], key=lambda a: a["path"])
        data["outputs"] = sorted(data["outputs"], key=lambda a: a["path"])
        data["fingerprint"] = self.fingerprint
        data["params_hash"] = self.params_hash
        data["inputs_hash"] = self.inputs_hash
        return data

    def write(self, folder: Path) -> Path:
        # Field order, not sorted: the stage's own order of metrics is how the run summary shows them.
        return atomic_write_text(folder / MANIFEST, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ArtifactError(f"{path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path} is not a readable manifest ({exc}); rerun the stage with --force") from None
        if data.get("schema") != SCHEMA_VERSION:
            raise ArtifactError(
                f"{path} has schema {data.get('schema')!r}, expected {SCHEMA_VERSION}; rerun with --force"
            )
        try:
            manifest = cls(
                stage=data["stage"],
                status=data["status"],
                params=data["params"],
                inputs=[Artifact(**a) for a in data["inputs"]],
                outputs=[Artifact(**a) for a in data["outputs"]],
                checks=[Check.from_dict(c) for c in data["checks"]],
                code_version=data["code_version"],
                reason=data.get("reason", ""),
                metrics=data.get("metrics", {}),
                environment=data.get("environment", {}),
                meta=data.get("meta", {}),
                code_files=data.get("code_files", {}),
                kept=data.get("kept", []),
            )
        except (KeyError, TypeError) as exc:
            raise ArtifactError(
                f"{path} is missing or has malformed field {exc}; rerun the stage with --force"
            ) from None
        if data.get("fingerprint") != manifest.fingerprint:
            raise ArtifactError(
                f"{path} was edited by hand (its fingerprint does not match its content); rerun with --force"
            )
        return manifest


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


def environment() -> dict:
    """Versions and devices that can change numbers; read without importing optional packages."""
    env: dict = {"python": platform.python_version(), "platform": platform.platform(), "executable": sys.executable}
    for name in _PACKAGES:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if "torch" in sys.modules:
        import torch

        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["cuda"] = torch.version.cuda
            env["gpu"] = torch.cuda.get_device_name()
            env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["torch_threads"] = torch.get_num_threads()
    return env
