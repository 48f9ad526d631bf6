"""Property-based fuzzing of ImageFolder trees (``data.dataset=imagefolder``): random class folders and
splits, images of any size and mode, and the things real folders hold besides (empty classes, text files,
folders named like images, broken and looping links, names with spaces and accents). `run teacher` trains
on the tree (exit 0) or names what is wrong in one line (exit 2); it never changes the tree.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image

from pipeline.cli import run_cli
from pipeline.data.folders import listing_digest
from tests.test_fuzz import FUZZ, _snapshot

SETS = [
    a
    for item in (
        "data.dataset=imagefolder",
        "data.image_size=16",
        "data.batch_size=4",
        "data.workers=0",
        "teacher.arch=resnet20",
        "teacher.optim.epochs=1",
        "teacher.optim.milestones=[]",
    )
    for a in ("--set", item)
]
CLASS_NAMES = st.sampled_from(["cat", "dog", "with space", "ünï", "0", "Z", ".hidden"])
IMAGES = st.tuples(
    st.sampled_from(["RGB", "L", "RGBA", "P", "I;16", "CMYK"]),
    st.integers(1, 40),
    st.integers(1, 40),
    st.sampled_from(["png", "jpg", "JPEG", "bmp", "webp"]),
)
EXTRAS = st.sampled_from(
    ["notes.txt", "empty.jpg", "folder.png/", "broken-link.png", "loop/", "junk.png", "nested/deeper.png"]
)
# A valid tree (2-3 classes, a few images each in train/ and val/), then up to three changes of the kind real
# folders have: a stray file in a class, a class with no images, an evaluation class train/ lacks, a missing
# val/, a test/ beside val/.
TREES = st.tuples(
    st.lists(CLASS_NAMES, min_size=1, max_size=3, unique=True),
    st.lists(IMAGES, min_size=2, max_size=5),
    st.lists(IMAGES, min_size=1, max_size=2),
    st.lists(
        st.one_of(
            st.tuples(st.just("extra"), st.sampled_from(["train", "val"]), st.integers(0, 2), EXTRAS),
            st.tuples(st.just("empty class"), st.sampled_from(["train", "val"]), st.just(0), st.just("")),
            st.tuples(st.just("eval class"), st.just("val"), st.just(0), st.just("")),
            st.tuples(st.just("no val"), st.just("val"), st.just(0), st.just("")),
            st.tuples(st.just("test too"), st.just("test"), st.just(0), st.just("")),
        ),
        max_size=3,
    ),
)


def _write(folder: Path, images: list, extras: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (mode, width, height, suffix) in enumerate(images):
        image = Image.new("RGB", (width, height), (i * 50 % 256, 90, 200)).convert(mode)
        try:
            image.save(folder / f"{i}.{suffix}")
        except (OSError, ValueError, KeyError):  # a mode the format cannot hold
            Image.new("RGB", (width, height)).save(folder / f"{i}.png")
    for extra in extras:
        if extra == "notes.txt":
            (folder / extra).write_text("a note")
        elif extra == "empty.jpg":
            (folder / extra).write_bytes(b"")
        elif extra == "folder.png/":
            (folder / "folder.png").mkdir(exist_ok=True)
        elif extra == "broken-link.png" and not (folder / extra).is_symlink():
            (folder / extra).symlink_to(folder / "missing.png")
        elif extra == "loop/" and not (folder / "loop").is_symlink():
            (folder / "loop").symlink_to(folder)
        elif extra == "junk.png":
            (folder / extra).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
        elif extra == "nested/deeper.png":
            (folder / "nested").mkdir(exist_ok=True)
            Image.new("RGB", (8, 8)).save(folder / extra)


@pytest.mark.slow
@FUZZ
@given(tree=TREES)
def test_fuzz_an_image_folder_trains_or_is_one_error(tree, capsys):
    names, train_images, val_images, changes = tree
    workdir = Path(tempfile.mkdtemp(prefix="fuzz-folder-"))
    try:
        root = workdir / "data"
        for name in names:
            _write(root / "train" / name, train_images, [])
            _write(root / "val" / name, val_images, [])
        for change, split, index, extra in changes:
            folder = root / split / names[index % len(names)]
            if change == "extra" and folder.is_dir():
                _write(folder, [], [extra])
            elif change == "empty class":
                (root / split / "empty").mkdir(parents=True, exist_ok=True)
            elif change == "eval class":
                _write(root / "val" / "only-in-val", val_images, [])
            elif change == "no val":
                shutil.rmtree(root / "val", ignore_errors=True)
            elif change == "test too":
                _write(root / "test" / names[0], val_images, [])
        before = _snapshot(root)
        listing_digest.cache_clear()  # one process, many folders
        code = run_cli(["run", "teacher", "--data-root", str(root), "--out", str(workdir / "run"), *SETS])
        err = capsys.readouterr().err
        assert code in (0, 2) and "Traceback" not in err, (code, err)
        if code == 2:
            assert err.strip().splitlines()[-1].startswith("error: "), err
        event("trained" if code == 0 else err.strip().splitlines()[-1].split(":")[1].split("(")[0][:60])
        assert _snapshot(root) == before, "the run changed the data folder"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
