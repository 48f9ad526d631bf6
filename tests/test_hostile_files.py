"""Malicious and broken input files (issue 13): images, checkpoint metadata, dataset pickles.

Each ends in one line naming the file and exit status 2, without allocating what the file claims and
without leaving a stage that looks complete.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline.artifacts.checkpoint import read_meta
from pipeline.cli import run_cli
from pipeline.errors import CheckpointError


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data needed to trip the bomb check)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _image_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), (seed * 40 % 256, 80, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def _strip(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_IMAGES = {
    "corrupt": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    "truncated": _image_bytes(1)[:40],
    "zero-byte": b"",
    "bomb": _png(100_000, 100_000),
    "strip": _strip(1, 5000),  # decodable, but resizing such strips (damaged headers) takes gigabytes
}


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_a_bad_image_in_an_imagefolder_is_one_line_naming_it(tmp_path, kind, workers, capsys):
    root = tmp_path / "images"
    for split, count in (("train", 6), ("val", 2)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.png").write_bytes(_image_bytes(i))
    bad = root / "train" / "dog" / "bad.png"
    bad.write_bytes(BAD_IMAGES[kind])
    out = tmp_path / "run"
    sets = [
        "data.dataset=imagefolder",
        "data.image_size=16",
        "data.batch_size=4",
        f"data.workers={workers}",
        "data.val_fraction=0",
        "teacher.arch=resnet20",
        "teacher.optim.epochs=1",
        "teacher.optim.milestones=[]",
    ]
    argv = ["run", "teacher", "--data-root", str(root), "--out", str(out)]
    assert run_cli([*argv, *(a for s in sets for a in ("--set", s))]) == 2
    message = _error(capsys)
    assert str(bad) in message and "is not a readable image" in message
    assert not (out / "teacher").exists() and not any((out / ".staging").iterdir())


@pytest.mark.parametrize("link", ["loop", "twice"])
def test_an_image_folder_reached_twice_through_links_is_refused(tmp_path, link, capsys):
    """A link back up (train/cat/loop -> train/cat) made 4 cat images 164, as the walk follows links; a second
    link to one folder counts its images in two places."""
    from pipeline.data.folders import listing_digest

    root = tmp_path / "images"
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                (root / split / label / f"{i}.png").write_bytes(_image_bytes(i))
    cat = root / "train" / "cat"
    (cat / "loop").symlink_to(cat if link == "loop" else root / "train" / "dog")
    if link == "twice":
        (root / "train" / "dog" / "again").symlink_to(root / "train" / "dog")
    listing_digest.cache_clear()
    sets = ["data.dataset=imagefolder", "data.image_size=16", "teacher.arch=resnet20", "teacher.optim.epochs=1"]
    argv = ["run", "teacher", "--data-root", str(root), "--out", str(tmp_path / "run")]
    assert run_cli([*argv, *(a for s in sets for a in ("--set", s))]) == 2
    assert "again, through a symbolic link" in _error(capsys)
    assert not (tmp_path / "run" / "teacher").exists()


def _safetensors(path: Path, meta: object) -> Path:
    save_file({"w": torch.zeros(1)}, str(path), metadata={"pipeline": json.dumps(meta)})
    return path


GOOD_META = {
    "arch": "resnet20",
    "num_classes": 4,
    "input_size": 32,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "class_names": ["a", "b", "c", "d"],
    "form": "train",
    "reparam": {},
    "recipe": "cifar",
    "extra": {},
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_classes": 10**15}, "num_classes must be an integer in [1, 1048576]"),
        ({"num_classes": "ten"}, "num_classes must be an integer"),
        ({"input_size": 10**9}, "input_size must be an integer in [8, 8192]"),
        ({"mean": "grey"}, "mean and std must be three finite numbers"),
        ({"class_names": [1, 2, 3, 4]}, "class_names must be a list of strings"),
        ({"form": "other"}, "form must be 'train' or 'fused'"),
        ({"reparam": {"sites": [["a", "b"]], "m": 4}}, "reparam has no 'kind'"),
        ({"reparam": {"kind": "multibranch", "sites": "all"}}, "reparam.sites must be a list"),
        ({"reparam": {"kind": "multibranch", "sites": [["a", "b"]], "m": 10**9}}, "reparam.m must be an integer"),
        ({"surprise": 1}, "unexpected keyword argument 'surprise'"),
        ({"recipe": "mine"}, "recipe must be 'cifar' or 'imagenet' and color 'rgb' or 'gray'"),
        ({"color": "purple"}, "got 'cifar' and 'purple'"),  # read as rgb before
        ({"reparam": {"kind": "multibranch", "sites": [["a", "b"]], "mixed_kernels": "yes"}}, "must be true or false"),
    ],
)
def test_crafted_checkpoint_metadata_is_refused_before_any_allocation(tmp_path, change, message):
    path = _safetensors(tmp_path / "crafted.safetensors", {**GOOD_META, **change})
    with pytest.raises(CheckpointError, match="has malformed pipeline metadata") as raised:
        read_meta(path)
    assert message in str(raised.value)


def test_a_reparam_setting_the_code_does_not_know_is_one_error():
    """A record with a setting this version's apply function lacks was torch's TypeError (a traceback)."""
    from pipeline.errors import ConfigError
    from pipeline.models import build_model, model_info
    from pipeline.reparam import apply_reparam

    sites = [[s.conv, s.bn] for s in model_info("resnet20").reparam_sites]
    with pytest.raises(ConfigError, match="unknown re-parameterization setting 'bogus'; known: sites, m"):
        apply_reparam(build_model("resnet20", 4), {"kind": "multibranch", "sites": sites, "bogus": 1})


@pytest.mark.parametrize("meta", [[1, 2], "text", None])
def test_metadata_that_is_not_an_object_is_refused(tmp_path, meta):
    path = _safetensors(tmp_path / "crafted.safetensors", meta)
    with pytest.raises(CheckpointError, match="malformed pipeline metadata"):
        read_meta(path)


def test_exporting_a_crafted_checkpoint_is_one_line(tmp_path, capsys):
    path = _safetensors(tmp_path / "crafted.safetensors", {**GOOD_META, "num_classes": 10**15})
    assert run_cli(["run", "export", "--checkpoint", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "num_classes must be an integer" in _error(capsys)
    assert not (tmp_path / "run" / "export").exists()


def _nested(depth: int) -> list:
    """A list that pickles in a few hundred bytes (shared references) but expands to 2**depth leaves."""
    node: list = [0] * 8
    for _ in range(depth):
        node = [node, node]
    return node


def test_a_cifar_pickle_of_nested_lists_is_bounded(tmp_path, capsys):
    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    split = {b"data": _nested(40), b"fine_labels": [0]}
    for name in ("train", "test"):
        (folder / name).write_bytes(pickle.dumps(split, protocol=2))
    names = [f"c{i}".encode() for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}, protocol=2))
    assert len((folder / "train").read_bytes()) < 2000
    argv = ["run", "teacher", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    sets = ["data.dataset=cifar100", "data.verify_checksums=false", "teacher.source=train", "teacher.arch=resnet20"]
    assert run_cli([*argv, *(a for s in sets for a in ("--set", s))]) == 2
    message = _error(capsys)
    assert "cifar-100-python/train: 'data' is a list, not the array of a CIFAR-100 file" in message
