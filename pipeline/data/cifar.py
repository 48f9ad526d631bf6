"""CIFAR-100 from the official "python version" files, read locally and checked against their md5.

The release is ``cifar-100-python.tar.gz`` (https://www.cs.toronto.edu/~kriz/cifar.html); it holds
``cifar-100-python/{train,test,meta}``, Python 2 pickles of dicts of lists and uint8 arrays.
``data.root`` may name the folder that holds ``cifar-100-python/`` (as torchvision's ``root``), that
folder itself, or the archive (read in place, never extracted). Nothing is downloaded.

The files are pickles, so they are never handed to plain ``pickle.load``: :class:`_ArrayUnpickler`
resolves only the few globals a pickled numpy array needs. That holds even when the md5 check is
turned off (``data.verify_checksums=false``) or does not apply, as with a re-packed copy; the md5 check
proves the files are the official release, the restricted unpickler makes any file safe to read.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib
import io
import pickle
import tarfile
from pathlib import Path
from typing import BinaryIO, ClassVar

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.data import DATASETS, DataInfo, RawData
from pipeline.data.synthetic import TensorImages
from pipeline.errors import ConfigError, DatasetError

FOLDER = "cifar-100-python"
ARCHIVE = "cifar-100-python.tar.gz"
DEFAULT_ROOT = "data"
NUM_CLASSES = 100
MEAN = (0.5071, 0.4867, 0.4408)  # the RepDistiller recipe (spec §10)
STD = (0.2675, 0.2565, 0.2761)

# md5 of the official release. Archive, train and test: design §5; meta: torchvision.datasets.CIFAR100.
MD5 = {
    ARCHIVE: "eb9058c3a382ffc7106e4002c42a8d85",
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
_FILES = ("train", "test", "meta")
_SOURCE = "the CIFAR-100 python version from https://www.cs.toronto.edu/~kriz/cifar.html; nothing is downloaded"


def _expected(root: Path) -> str:
    return (
        f"expected {root / FOLDER}/ holding the files train, test and meta, or {root / ARCHIVE} ({_SOURCE}); "
        "point --data-root at the folder that holds them"
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Builds only dicts, lists, strings, numbers and numpy arrays; any other global is refused."""

    _ALLOWED: ClassVar[dict[tuple[str, str], tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy", "_reconstruct"),  # Python 2 / numpy 1 files
        ("numpy._core.multiarray", "_reconstruct"): ("numpy", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"): ("numpy", "_frombuffer"),  # protocol 5 writers
        ("numpy._core.numeric", "_frombuffer"): ("numpy", "_frombuffer"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("_codecs", "encode"): ("codecs", "encode"),  # bytes in protocol 2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR file")
        if target[0] == "codecs":
            return codecs.encode
        if target[1] == "_reconstruct":
            return _numpy_internal("multiarray", "_reconstruct")
        if target[1] == "_frombuffer":
            return _numpy_internal("numeric", "_frombuffer")
        return getattr(np, target[1])


def _numpy_internal(module: str, name: str):
    """``numpy._core.<module>.<name>`` (numpy 2), or ``numpy.core.<module>.<name>`` (numpy 1)."""
    try:
        return getattr(importlib.import_module(f"numpy._core.{module}"), name)
    except ImportError:
        return getattr(importlib.import_module(f"numpy.core.{module}"), name)


def load_pickle(stream: BinaryIO, source: str) -> dict:
    try:
        data = _ArrayUnpickler(stream, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DatasetError(f"{source} is not a readable CIFAR pickle ({exc})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{source} is not a CIFAR pickle (it holds a {type(data).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def check_md5(name: str, digest: str, source: str, md5: dict[str, str]) -> None:
    expected = md5[name]
    if digest != expected:
        raise DatasetError(
            f"{source} has md5 {digest}, but the official CIFAR-100 {name!r} file has md5 {expected}: it is "
            f"corrupt, truncated or not the official release; extract {ARCHIVE} (md5 {md5[ARCHIVE]}) again, "
            "or pass --set data.verify_checksums=false to use it anyway"
        )


def read_files(cfg: DataConfig, md5: dict[str, str] | None = None) -> tuple[dict[str, bytes], str]:
    """The raw bytes of train/test/meta and where they came from, md5-checked unless turned off."""
    md5 = MD5 if md5 is None else md5
    root = Path(cfg.root or DEFAULT_ROOT).expanduser()
    archive = root if root.is_file() else root / ARCHIVE
    folder = root if root.name == FOLDER else root / FOLDER
    if root.is_dir() and (folder / "train").exists():
        present = [n for n in _FILES if (folder / n).is_file()]
        if len(present) < len(_FILES):
            missing = ", ".join(n for n in _FILES if n not in present)
            raise DatasetError(f"CIFAR-100 in {folder} is incomplete ({missing} missing): {_expected(folder.parent)}")
        files = {n: (folder / n).read_bytes() for n in _FILES}
        if cfg.verify_checksums:
            for name, data in files.items():
                check_md5(name, md5_bytes(data), str(folder / name), md5)
        return files, str(folder)
    if archive.is_file():
        return _read_archive(archive, cfg.verify_checksums, md5), str(archive)
    looked = f"{root} does not exist" if not root.exists() else f"{root} holds neither {FOLDER}/ nor {ARCHIVE}"
    raise DatasetError(f"CIFAR-100 not found ({looked}): {_expected(root)}")


MAX_MEMBER_BYTES = 1 << 30


def _read_archive(path: Path, verify: bool, md5: dict[str, str]) -> dict[str, bytes]:
    raw = path.read_bytes()
    if verify:
        check_md5(ARCHIVE, md5_bytes(raw), str(path), md5)
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
            out = {}
            for name in _FILES:
                try:
                    info = tar.getmember(f"{FOLDER}/{name}")
                except KeyError:
                    raise KeyError(name) from None
                if info.size > MAX_MEMBER_BYTES:  # unchecked (verify off), an archive may claim any size
                    raise DatasetError(f"{path}: {info.name} is {info.size} bytes; CIFAR-100's largest file is 155 MB")
                member = tar.extractfile(info)
                if member is None:
                    raise KeyError(name)
                out[name] = member.read()
    except KeyError as exc:
        raise DatasetError(f"{path} does not hold {FOLDER}/{exc.args[0]}; is it {ARCHIVE} ({_SOURCE})?") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError(f"{path} is not a readable {ARCHIVE} ({exc})") from None
    return out


def _split(data: dict, source: str) -> TensorImages:
    try:
        images, labels = data["data"], data["fine_labels"]
    except KeyError as exc:
        raise DatasetError(f"{source} lacks the {exc.args[0]!r} entry of a CIFAR-100 file") from None
    # Checked before numpy converts anything: a pickle of nested, shared lists would expand without bound.
    if not isinstance(images, np.ndarray):
        raise DatasetError(f"{source}: 'data' is a {type(images).__name__}, not the array of a CIFAR-100 file")
    if isinstance(labels, list) and not all(type(v) is int for v in labels):
        raise DatasetError(f"{source}: 'fine_labels' holds values that are not integers")
    if not isinstance(labels, list | np.ndarray) or (isinstance(labels, np.ndarray) and labels.ndim != 1):
        raise DatasetError(f"{source}: 'fine_labels' is not a list of integers")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DatasetError(f"{source}: 'fine_labels' is not a list of integers") from None
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{source}: images are {images.dtype} {images.shape}, expected uint8 (N, 3072)")
    if len(labels) != len(images) or (len(labels) and not 0 <= labels.min() <= labels.max() < NUM_CLASSES):
        raise DatasetError(f"{source}: {len(labels)} fine labels for {len(images)} images, or labels outside 0..99")
    # rows are 1024 red, 1024 green, 1024 blue values: CHW once reshaped; from_numpy shares the memory
    return TensorImages(torch.from_numpy(images.reshape(-1, 3, 32, 32)), torch.from_numpy(labels))


@DATASETS.register(name="cifar100")
def cifar100(cfg: DataConfig, md5: dict[str, str] | None = None) -> RawData:
    if cfg.num_classes not in (None, NUM_CLASSES):
        raise ConfigError(f"cifar100 has {NUM_CLASSES} classes; data.num_classes={cfg.num_classes} cannot apply")
    if cfg.image_size not in (None, 32):
        raise ConfigError(f"cifar100 images are 32 px; data.image_size={cfg.image_size} cannot apply")
    files, where = read_files(cfg, md5)
    train = _split(load_pickle(io.BytesIO(files["train"]), f"{where}/train"), f"{where}/train")
    test = _split(load_pickle(io.BytesIO(files["test"]), f"{where}/test"), f"{where}/test")
    meta = load_pickle(io.BytesIO(files["meta"]), f"{where}/meta")
    names = meta.get("fine_label_names")
    if not isinstance(names, list) or len(names) != NUM_CLASSES or not all(isinstance(n, bytes | str) for n in names):
        raise DatasetError(f"{where}/meta lacks the {NUM_CLASSES} 'fine_label_names'")
    info = DataInfo(
        name="cifar100",
        num_classes=NUM_CLASSES,
        class_names=tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names),
        input_size=32,
        mean=MEAN,
        std=STD,
        recipe="cifar",
    )
    return RawData(train, test, info)
