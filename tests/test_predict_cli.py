"""``python -m pipeline predict``: output on real images, and one-line errors (exit 2) for bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from exports.metadata import DeployMeta
from exports.onnx_export import export_onnx
from pipeline.cli import run_cli

META = DeployMeta(
    arch="brightness",
    num_classes=3,
    input_size=16,
    mean=[0.5] * 3,
    std=[0.25] * 3,
    resize=16,
    crop=16,
    class_names=["red", "green", "blue"],
)


class Brightness(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * 4.0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    export_onnx(Brightness(), folder / "model.onnx", 16, 18, False, META)
    pixels = np.zeros((20, 24, 3), dtype=np.uint8)
    pixels[..., 2] = 200
    Image.fromarray(pixels).save(folder / "blue.png")
    (folder / "junk.onnx").write_text("not a model")
    export_onnx(Brightness(), folder / "bare.onnx", 16, 18, False)
    (folder / "notes.txt").write_text("hello")
    return folder


def test_predict_prints_top_k(files, capsys):
    assert run_cli(["predict", str(files / "blue.png"), "--model", str(files / "model.onnx"), "--top-k", "2"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"{files / 'blue.png'}: blue ")
    assert out.count(",") == 1  # two classes shown


def test_predict_json(files, capsys):
    argv = ["predict", str(files / "blue.png"), str(files / "blue.png"), "--model", str(files / "model.onnx"), "--json"]
    assert run_cli(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and len(rows[0]["top"]) == 3
    assert rows[0]["top"][0]["label"] == "blue" and rows[0]["top"][0]["index"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["blue.png", "--model", "missing.onnx"], "model file"),
        (["blue.png", "--model", "junk.onnx"], "is not a loadable ONNX model"),
        (["blue.png", "--model", "bare.onnx"], "has no pipeline metadata"),
        (["blue.png", "--model", "notes.txt"], "neither an .onnx model nor a TensorRT .engine"),
        (["missing.png", "--model", "model.onnx"], "missing.png does not exist"),
        (["notes.txt", "--model", "model.onnx"], "is not a readable image"),
        (["blue.png", "--model", "model.onnx", "--top-k", "0"], "Invalid value for '--top-k'"),
        (["blue.png"], "Missing option '--model'"),
    ],
)
def test_predict_errors_exit_2_with_one_line(files, args, message, capsys, monkeypatch):
    monkeypatch.chdir(files)
    assert run_cli(["predict", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_predict_answers_every_good_image_and_fails_at_the_end(files, capsys):
    """One unreadable image must not cost the good ones their answer: each failure is one stderr line, exit 2."""
    good, bad = str(files / "blue.png"), str(files / "notes.txt")
    assert run_cli(["predict", good, bad, good, "--model", str(files / "model.onnx")]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines() == [line for line in out.splitlines() if line.startswith(f"{good}: blue ")]
    assert len(out.splitlines()) == 2
    assert f"error: {bad} is not a readable image" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: 1 of 3 images could not be classified (listed above)"


def test_predict_json_lists_errors_per_image(files, capsys):
    argv = ["predict", str(files / "notes.txt"), str(files / "blue.png"), "--model", str(files / "model.onnx")]
    assert run_cli([*argv, "--json"]) == 2
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == [str(files / "notes.txt"), str(files / "blue.png")]
    assert "is not a readable image" in rows[0]["error"] and "top" not in rows[0]
    assert rows[1]["top"][0]["label"] == "blue" and "error" not in rows[1]


def test_predict_reads_a_folder_in_sorted_order(files, tmp_path, capsys):
    """A folder's image files are classified in sorted order (other files skipped); --recursive descends."""
    blue = (files / "blue.png").read_bytes()
    for name in ("b.png", "a.png", "sub/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(blue)
    (tmp_path / "readme.txt").write_text("not an image")
    model = str(files / "model.onnx")
    assert run_cli(["predict", str(tmp_path), "--model", model]) == 0
    shown = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    assert shown == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert run_cli(["predict", str(tmp_path), "--model", model, "--recursive"]) == 0
    shown = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    assert shown == [str(tmp_path / "a.png"), str(tmp_path / "b.png"), str(tmp_path / "sub" / "c.png")]
    (tmp_path / "empty").mkdir()
    assert run_cli(["predict", str(tmp_path / "empty"), "--model", model]) == 2
    assert "holds no image files" in capsys.readouterr().err
