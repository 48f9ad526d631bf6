"""Content hashes for artifacts and for the result-affecting parts of a stage definition."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: object) -> str:
    """JSON with sorted keys and no whitespace, so equal content always hashes equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_json(obj: object) -> str:
    return sha256_bytes(canonical_json(obj).encode())


_PRESENTATION_ONLY = {"pipeline/cli.py", "pipeline/__main__.py"}


def code_version() -> str:
    """Package version plus a hash of the project's own sources.

    A stage's result depends on the code that made it, so a code change makes every stage stale, as
    a changed command does in DVC. The command-line layer is left out: it parses and prints, and
    changes nothing a stage computes.
    """
    import importlib.util

    import pipeline

    digest = hashlib.sha256()
    for package in ("pipeline", "stages", "exports"):
        # Located, not imported: this low-level module must not import the layers above it.
        root = Path(importlib.util.find_spec(package).origin).parent
        for source in sorted(root.rglob("*.py")):
            if source.relative_to(root.parent).as_posix() in _PRESENTATION_ONLY:
                continue
            digest.update(str(source.relative_to(root.parent)).encode())
            digest.update(source.read_bytes())
    return f"{pipeline.__version__}+{digest.hexdigest()[:12]}"
