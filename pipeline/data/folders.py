"""Image datasets stored as one folder per class: any ImageFolder tree, and ImageNet-100.

Layout (``data.root``)::

    root/train/<class>/<image>      training images; the held-out ``val`` split is cut from these
    root/val/<class>/<image>        evaluation images (``root/test/`` is used instead when it exists)

Class names are the sorted subfolder names of ``train/``, and the evaluation folder is labelled
with that same mapping, so a class missing from ``val/`` never shifts the labels of the others.
ImageNet's ``val/`` must already be sorted into synset folders (as torchvision's ``ImageNet`` and
the common ``valprep.sh`` leave it). Images are decoded with PIL in the loader's worker processes.

ImageNet-100 is the ImageNet subset of the CMC paper: the 100 synsets in ``imagenet100.txt``
(shipped beside this file, pinned by :data:`IMAGENET100_SHA256`), about 1300 training and 50
validation images each.
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

from PIL import Image
from torchvision.datasets import DatasetFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from pipeline.artifacts.hashing import sha256_bytes
from pipeline.config import DataConfig
from pipeline.data import DATASETS, DataInfo, RawData
from pipeline.errors import ConfigError, DatasetError, UnreadableImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224

# The CMC 100-class list, byte for byte as published in HobbitLong/CMC (file imagenet100.txt,
# commit bc687a26de7ae350d98f671d25d164b65336b8c2): one synset per line, 100 lines.
IMAGENET100_FILE = "imagenet100.txt"
IMAGENET100_SHA256 = "79f3f1552ccc478ce24bd934b4573625db584ddc1f4643ae23c994a94cb11397"


@functools.lru_cache(maxsize=4)
def listing_digest(root: str) -> str | None:
    """A hash of an ImageFolder's file list: the relative path and size of every image under ``train/``,
    ``val/`` and ``test/``. Images added, removed, replaced by another size or moved to another class change it,
    so runs made from the folder before are stale, as after a change of a data setting. Contents are not read
    (0.7 s for 70,000 files); an image edited in place at the same size goes unseen. ``None`` where there is no
    folder to list (the loader then names the problem); a folder reached twice through links is refused. Cached
    for the process, which is one run from the CLI; a program that changes a folder between two runs in one
    process calls ``listing_digest.cache_clear()``."""
    base = Path(root).expanduser()
    if not base.is_dir():
        return None
    lines = []
    for split in ("train", "val", "test"):
        seen: dict[str, str] = {}  # each real folder once: a link back up (a loop) counted its images 41 times
        for folder, subfolders, files in os.walk(base / split, followlinks=True):  # as DatasetFolder walks it
            real = os.path.realpath(folder)
            if real in seen:
                raise DatasetError(
                    f"{folder} is {seen[real]} again, through a symbolic link (a loop, or two links to one "
                    "folder): its images would be counted more than once; remove the link"
                )
            seen[real] = folder
            subfolders.sort()
            for name in sorted(files):
                if name.lower().endswith(IMG_EXTENSIONS):
                    path = Path(folder) / name
                    try:
                        size = path.stat().st_size
                    except OSError:  # a broken link: the loader will name it
                        size = -1
                    lines.append(os.fsencode(path.relative_to(base)) + b"\t" + str(size).encode())
    return sha256_bytes(b"\n".join(lines))


MAX_ASPECT = 1000  # a longer strip is a damaged header's size; resized it takes gigabytes (256 x 256,000 at 1000)


def _load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            width, height = image.size
            if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
                raise ValueError(f"{width}x{height}: one side is over {MAX_ASPECT} times the other")
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # corrupt, truncated, empty, bomb
        raise UnreadableImageError.of(path, str(exc)) from None


class ClassFolder(DatasetFolder):
    """A DatasetFolder labelled with a given class list instead of the folder's own subfolders."""

    def __init__(self, root: Path, classes: list[str], allow_empty: bool):
        self._classes = list(classes)
        super().__init__(str(root), loader=_load_rgb, extensions=IMG_EXTENSIONS, allow_empty=allow_empty)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._classes, {name: i for i, name in enumerate(self._classes)}


def imagenet100_classes() -> list[str]:
    """The CMC list, refused if the shipped file was altered."""
    data = (resources.files("pipeline.data") / IMAGENET100_FILE).read_bytes()
    digest = sha256_bytes(data)
    if digest != IMAGENET100_SHA256:
        raise DatasetError(
            f"pipeline/data/{IMAGENET100_FILE} has sha256 {digest}, expected {IMAGENET100_SHA256}; "
            "restore the file from the repository"
        )
    return data.decode().split()


_LAYOUT = {
    "imagefolder": "train/<class>/<image> and val/<class>/<image> (or test/<class>/<image>)",
    "imagenet100": "an ImageNet (ILSVRC-2012) folder with train/<synset>/*.JPEG and val/<synset>/*.JPEG "
    "(val sorted into synset folders, e.g. by valprep.sh)",
}


def _root(cfg: DataConfig, what: str) -> Path:
    if not cfg.root:
        raise DatasetError(f"{what} needs --data-root DIR (or data.root) holding {_LAYOUT[what]}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{what}: {root} is not a folder; expected {_LAYOUT[what]}")
    return root


def _eval_folder(root: Path, what: str) -> Path:
    for name in ("test", "val"):
        if (root / name).is_dir():
            return root / name
    raise DatasetError(f"{what}: {root} has no val/ (or test/) folder; expected {_LAYOUT[what]}")


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def _folder(root: Path, classes: list[str], allow_empty: bool, what: str) -> ClassFolder:
    try:
        dataset = ClassFolder(root, classes, allow_empty=allow_empty)
    except FileNotFoundError as exc:
        raise DatasetError(f"{what}: {exc}") from None
    if not len(dataset):
        raise DatasetError(f"{what}: no images in {root}/<class>/ (extensions: {', '.join(IMG_EXTENSIONS)})")
    return dataset


def _info(name: str, classes: list[str], cfg: DataConfig) -> DataInfo:
    if cfg.num_classes not in (None, len(classes)):
        raise ConfigError(f"{name} has {len(classes)} classes; data.num_classes={cfg.num_classes} cannot apply")
    return DataInfo(
        name=name,
        num_classes=len(classes),
        class_names=tuple(classes),
        input_size=cfg.image_size or DEFAULT_SIZE,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        recipe="imagenet",
    )


@DATASETS.register(name="imagefolder")
def imagefolder(cfg: DataConfig) -> RawData:
    what = "imagefolder"
    root = _root(cfg, what)
    if not (root / "train").is_dir():
        raise DatasetError(f"{what}: {root} has no train/ folder; expected {_LAYOUT[what]}")
    classes = _subfolders(root / "train")
    if not classes:
        raise DatasetError(f"{what}: {root / 'train'} has no class subfolders (expected train/<class>/<image>)")
    evaluation = _eval_folder(root, what)
    extra = sorted(set(_subfolders(evaluation)) - set(classes))
    if extra:
        raise DatasetError(
            f"{what}: {evaluation} has classes that train/ lacks ({', '.join(extra[:5])}); "
            "every evaluation class needs training images"
        )
    train = _folder(root / "train", classes, allow_empty=False, what=what)
    test = _folder(evaluation, classes, allow_empty=True, what=what)
    return _with_recipe(RawData(train, test, _info("imagefolder", classes, cfg)), cfg)


@DATASETS.register(name="imagenet100")
def imagenet100(cfg: DataConfig) -> RawData:
    what = "imagenet100"
    classes = sorted(imagenet100_classes())  # ImageFolder order, as CMC's loader saw the subset
    root = _root(cfg, what)
    splits = {}
    for split in ("train", "val"):
        folder = root / split
        missing = [c for c in classes if not (folder / c).is_dir()]
        if missing:
            raise DatasetError(
                f"{what}: {folder} lacks {len(missing)} of the 100 CMC synset folders (e.g. {', '.join(missing[:3])}); "
                f"expected {_LAYOUT[what]}"
            )
        splits[split] = _folder(folder, classes, allow_empty=False, what=what)
    return _with_recipe(RawData(splits["train"], splits["val"], _info("imagenet100", classes, cfg)), cfg)


def _with_recipe(raw: RawData, cfg: DataConfig) -> RawData:
    """The ImageNet recipe unless ``data.recipe=cifar`` asks for the small-image one."""
    from pipeline.data.small_images import with_small_image_recipe

    return with_small_image_recipe(raw, cfg) if cfg.recipe == "cifar" else raw
