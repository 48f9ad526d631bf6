"""Small datasets on disk in the real formats, written by the tests themselves."""

from __future__ import annotations

import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def cifar_pickle(obj: dict) -> bytes:
    """A protocol-2 pickle with the numpy global names of the official (Python 2, numpy 1) files."""
    data = pickle.dumps(obj, protocol=2)
    return data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar100(
    root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0, labels: dict[str, list[int]] | None = None
) -> dict[str, str]:
    """``root/cifar-100-python/{train,test,meta}`` with random images (the same for the same seed) and
    labels ``i % 100`` unless given; returns the md5 of each file."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    md5 = {}
    for name, n in (("train", n_train), ("test", n_test)):
        labels_here = (labels or {}).get(name) or [int(i % 100) for i in range(n)]
        content = {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{name} batch 1 of 1".encode(),
            b"fine_labels": list(labels_here),
            b"coarse_labels": [label // 5 for label in labels_here],
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        }
        md5[name] = _write(folder / name, cifar_pickle(content))
    meta = {
        b"fine_label_names": [f"fine_{i:02d}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)],
    }
    md5["meta"] = _write(folder / "meta", cifar_pickle(meta))
    return md5


def tar_cifar100(root: Path, archive: Path) -> str:
    """Pack ``root/cifar-100-python`` as the official archive does; returns the archive's md5."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "cifar-100-python", arcname="cifar-100-python")
    return hashlib.md5(archive.read_bytes()).hexdigest()


def write_image_tree(root: Path, classes: list[str], per_class: int, size: int = 40, suffix: str = ".png") -> None:
    """``root/<class>/<i><suffix>``: solid-colour RGB images whose red channel encodes the class index."""
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour = (index * 10 % 256, i * 20 % 256, 128)
            Image.new("RGB", (size, size + 8), colour).save(root / name / f"{i}{suffix}")


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return hashlib.md5(data).hexdigest()
