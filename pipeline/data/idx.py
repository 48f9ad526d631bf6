"""Fashion-MNIST and MNIST from their four official IDX files, read locally and checked by content.

Both releases are ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` files, gzipped (as published and as
Debian's ``dataset-fashion-mnist`` installs them in ``/usr/share/datasets/fashion-mnist``) or not. A file
is accepted when its bytes match the upstream ``.gz`` md5 or its decompressed bytes match the official
content's md5: Debian recompressed the archives, so only the content check fits its copy. Nothing is
downloaded.

The images are 28 x 28 grayscale. So that every model of the CIFAR zoo trains on them unchanged (a
3-channel 32 px stem, the CIFAR recipe), they are resized once, at load time, to 32 x 32 (bilinear,
antialiased) and replicated to three identical channels; the models' metadata records the conversion
(``color: gray``), so ``predict`` turns any photo into the same input: grayscale, then the usual
resize and center crop. Resizing rather than zero-padding keeps that one geometry step the edge runtime
already performs, instead of adding a second (pad) one to every deployed model.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import DataConfig
from pipeline.data import DATASETS, DataInfo, RawData
from pipeline.data.cifar import md5_bytes
from pipeline.data.synthetic import TensorImages
from pipeline.errors import ConfigError, DatasetError

SIZE = 32  # the CIFAR zoo's input size; the 28 px images are resized to it once, at load time
NATIVE = 28
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IMAGE_MAGIC, _LABEL_MAGIC = 0x00000803, 0x00000801


@dataclass(frozen=True, eq=False)
class IdxRelease:
    """One IDX release: where it comes from and the md5s that identify its files."""

    name: str
    title: str
    source: str
    class_names: tuple[str, ...]
    mean: float  # pixel mean / std of the training images, in [0, 1]
    std: float
    gz_md5: dict[str, str]  # upstream .gz archives
    raw_md5: dict[str, str]  # decompressed content (empty where unknown: then only the .gz can be checked)
    default_root: str


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat")
FASHION_CLASSES += ("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

FASHION_MNIST = IdxRelease(
    name="fashion_mnist",
    title="Fashion-MNIST",
    source="https://github.com/zalandoresearch/fashion-mnist, or Debian's package dataset-fashion-mnist "
    "(/usr/share/datasets/fashion-mnist)",
    class_names=FASHION_CLASSES,
    mean=0.2854,  # measured on the 32 px training split (0.2860 / 0.3530 at 28 px)
    std=0.3384,
    gz_md5={
        "train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
        "test_images": "bef4ecab320f06d8554ea6380940ec79",
        "test_labels": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    raw_md5={
        "train_images": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train_labels": "9018921c3c673c538a1fc5bad174d6f9",
        "test_images": "8181f5470baa50b63fa0f6fddb340f0a",
        "test_labels": "15d484375f8d13e6eb1aabb0c3f46965",
    },
    default_root="/usr/share/datasets/fashion-mnist",
)

MNIST = IdxRelease(
    name="mnist",
    title="MNIST",
    source="the four files of http://yann.lecun.com/exdb/mnist/ (or a mirror)",
    class_names=tuple(str(i) for i in range(10)),
    mean=0.1307,  # the customary 28 px figures
    std=0.3081,
    gz_md5={  # as torchvision.datasets.MNIST pins them
        "train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
        "test_images": "9fb629c4189551a2d022fa330f9573f3",
        "test_labels": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    raw_md5={},
    default_root="data/mnist",
)


def _expected(release: IdxRelease, root: Path) -> str:
    names = ", ".join(f"{n}[.gz]" for n in FILES.values())
    return f"expected {root}/ holding {names} ({release.source}); point --data-root at that folder"


def _read(release: IdxRelease, root: Path, key: str, verify: bool) -> bytes:
    """The decompressed bytes of one file, content-checked unless ``verify`` is off."""
    name = FILES[key]
    gz, raw = root / f"{name}.gz", root / name
    if gz.is_file():
        packed = gz.read_bytes()
        data = _gunzip(packed, gz)
        if verify and md5_bytes(packed) != release.gz_md5[key]:
            _check_content(release, key, data, str(gz))
        return data
    if raw.is_file():
        data = raw.read_bytes()
        if verify:
            _check_content(release, key, data, str(raw))
        return data
    looked = f"{root} does not exist" if not root.exists() else f"{root} holds neither {name} nor {name}.gz"
    raise DatasetError(f"{release.title} not found ({looked}): {_expected(release, root)}")


MAX_IDX_BYTES = 1 << 30  # decompressed; EMNIST's largest split is 0.55 GiB, Fashion-MNIST's 45 MiB


def _gunzip(packed: bytes, gz: Path) -> bytes:
    """``gzip.decompress``, stopped at :data:`MAX_IDX_BYTES`: 10 MB of gzip can hold 10 GB of zeros."""
    parts, size = [], 0
    while packed:
        stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            part = stream.decompress(packed, MAX_IDX_BYTES + 1 - size)
        except zlib.error as exc:
            raise DatasetError(f"{gz} is not a readable gzip file ({exc}); replace it with the official file") from None
        size += len(part)
        if size > MAX_IDX_BYTES:
            raise DatasetError(f"{gz} decompresses to more than {MAX_IDX_BYTES >> 30} GiB, more than an IDX file of "
                               "this loader holds (a gzip bomb, or not an MNIST-like release)")  # fmt: skip
        if not stream.eof:
            raise DatasetError(f"{gz} is not a readable gzip file (truncated); replace it with the official file")
        parts.append(part)
        packed = stream.unused_data.lstrip(b"\0")  # the next member, as gzip.decompress reads them; padding ends it
    return b"".join(parts)


def _check_content(release: IdxRelease, key: str, data: bytes, where: str) -> None:
    expected = release.raw_md5.get(key)
    digest = md5_bytes(data)
    if expected is None:
        raise DatasetError(
            f"{where} cannot be checked: only the official {FILES[key]}.gz (md5 {release.gz_md5[key]}) is known for "
            f"{release.title}; use that file, or pass --set data.verify_checksums=false to use it anyway"
        )
    if digest != expected:
        raise DatasetError(
            f"{where} holds content with md5 {digest}, but the official {release.title} {FILES[key]} has md5 "
            f"{expected}: it is corrupt, truncated or not the official release; replace it, or pass "
            "--set data.verify_checksums=false to use it anyway"
        )


def parse_idx(data: bytes, magic: int, where: str) -> np.ndarray:
    """An IDX array of unsigned bytes (magic ``0x0000080N``: N dimensions, big-endian sizes)."""
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise DatasetError(f"{where} is not an IDX file of {ndim}-dimensional unsigned bytes")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise DatasetError(f"{where} is truncated or padded: {len(data) - header} bytes for shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def to_cifar_input(images: np.ndarray) -> torch.Tensor:
    """``N x 28 x 28`` grayscale -> ``N x 3 x 32 x 32`` uint8: bilinear resize, three equal channels."""
    out = torch.empty(len(images), 3, SIZE, SIZE, dtype=torch.uint8)
    for start in range(0, len(images), 4096):  # bounded float memory on the 60,000-image split
        chunk = torch.tensor(images[start : start + 4096], dtype=torch.float32).unsqueeze(1)
        resized = F.interpolate(chunk, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + len(chunk)] = resized.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    return out


def _split(release: IdxRelease, root: Path, part: str, verify: bool) -> TensorImages:
    images = parse_idx(_read(release, root, f"{part}_images", verify), _IMAGE_MAGIC, f"{root}/{part} images")
    labels = parse_idx(_read(release, root, f"{part}_labels", verify), _LABEL_MAGIC, f"{root}/{part} labels")
    if images.shape[1:] != (NATIVE, NATIVE) or len(labels) != len(images):
        raise DatasetError(f"{root}: {part} has images {images.shape} and {len(labels)} labels, expected N x 28 x 28")
    if len(labels) and labels.max() >= len(release.class_names):
        raise DatasetError(f"{root}: {part} labels reach {labels.max()}, beyond the {len(release.class_names)} classes")
    return TensorImages(to_cifar_input(images), torch.from_numpy(labels.astype(np.int64)))


@functools.lru_cache(maxsize=1)
def _splits(release: IdxRelease, root: Path, verify: bool) -> tuple[TensorImages, TensorImages]:
    # Kept for the process: a benchmark's many runs (and a run's stages) decode and resize the files once.
    return _split(release, root, "train", verify), _split(release, root, "test", verify)


def load_idx(release: IdxRelease, cfg: DataConfig) -> RawData:
    classes = len(release.class_names)
    if cfg.num_classes not in (None, classes):
        raise ConfigError(f"{release.name} has {classes} classes; data.num_classes={cfg.num_classes} cannot apply")
    if cfg.image_size not in (None, SIZE):
        raise ConfigError(f"{release.name} is served at {SIZE} px; data.image_size={cfg.image_size} cannot apply")
    root = Path(cfg.root or release.default_root).expanduser()
    train, test = _splits(release, root, cfg.verify_checksums)
    info = DataInfo(
        name=release.name,
        num_classes=classes,
        class_names=release.class_names,
        input_size=SIZE,
        mean=(release.mean,) * 3,
        std=(release.std,) * 3,
        recipe="cifar",
        color="gray",
    )
    return RawData(train, test, info)


@DATASETS.register(name="fashion_mnist")
def fashion_mnist(cfg: DataConfig) -> RawData:
    return load_idx(FASHION_MNIST, cfg)


@DATASETS.register(name="mnist")
def mnist(cfg: DataConfig) -> RawData:
    return load_idx(MNIST, cfg)
