"""``python -m pipeline predict``: output on real images, and one-line errors (exit 2) for bad files."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
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


def test_an_image_too_long_to_resize_is_refused_by_name_and_the_others_answered(files, tmp_path, capsys):
    """1 x 6,000,000 resized to the model's 16 px would be 96M pixels (gigabytes): refused before resizing."""
    strip = tmp_path / "strip.png"
    Image.fromarray(np.zeros((6_000_000, 1), dtype=np.uint8)).save(strip)
    good = str(files / "blue.png")
    assert run_cli(["predict", str(strip), good, "--model", str(files / "model.onnx")]) == 2
    out, err = capsys.readouterr()
    assert out.startswith(f"{good}: blue ")
    assert f"error: {strip}: image of 1x6000000 would be resized to 16x96000000" in err and "Traceback" not in err


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


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F", "HSV", "LAB"]
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "TGA", "PCX", "EPS", "PDF"]


def _encode(mode: str, size: tuple[int, int], fmt: str, seed: int) -> bytes | None:
    """An image in ``mode`` and ``fmt``, or None where PIL cannot write that pair."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    try:
        image = image.convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, fmt)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return buffer.getvalue()


IMAGE_BYTES = st.one_of(
    st.builds(
        _encode,
        st.sampled_from(MODES),
        st.tuples(st.integers(1, 48), st.integers(1, 48)),
        st.sampled_from(FORMATS),
        st.integers(0, 2**16),
    ),
    st.binary(max_size=64),
)
DAMAGE = st.one_of(
    st.just(None),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=4)),
)


def _damage(data: bytes, damage) -> bytes:
    if damage is None or not data:
        return data
    if damage[0] == "truncate":
        return data[: int(len(data) * damage[1])]
    changed = bytearray(data)
    for where, value in damage[1]:
        changed[min(int(where * len(changed)), len(changed) - 1)] = value
    return bytes(changed)


@settings(max_examples=int(os.environ.get("KDPIPE_FUZZ_EXAMPLES", "40")), deadline=None, database=None,
          derandomize=not os.environ.get("KDPIPE_FUZZ_RANDOM"),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(images=st.lists(st.tuples(IMAGE_BYTES, DAMAGE, st.sampled_from(["png", "jpg", "gif", "webp"])), max_size=3))
def test_fuzz_any_file_gets_an_answer_or_one_error_line(files, tmp_path_factory, images, capsys):
    """Images of every mode and format PIL writes, damaged or not, and random bytes: each file gets a prediction
    or one `error:` line, and the exit status is 0 or 2, never a traceback."""
    folder = tmp_path_factory.mktemp("fuzz-images")
    paths = []
    for i, (data, damage, suffix) in enumerate(images):
        path = folder / f"{i}.{suffix}"
        path.write_bytes(_damage(data or b"", damage))
        paths.append(str(path))
    good = str(files / "blue.png")
    code = run_cli(["predict", good, *paths, "--model", str(files / "model.onnx"), "--json"])
    out, err = capsys.readouterr()
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err
    rows = json.loads(out)
    assert [r["image"] for r in rows] == [good, *paths]
    assert rows[0]["top"][0]["label"] == "blue"
    assert all(("top" in r) != ("error" in r) for r in rows)
    assert code == (2 if any("error" in r for r in rows) else 0)
    for r in rows[1:]:
        event("answered" if "top" in r else f"refused: {r['error'].split('(')[0].split(' is ')[-1].strip()}")
        if "top" in r:
            assert abs(sum(p["probability"] for p in r["top"]) - 1) < 1e-4


def _with_props(source: Path, changes: dict[str, str], folder: Path) -> Path:
    """A copy of the ONNX file ``source`` with some of its metadata values replaced."""
    import onnx

    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props} | changes
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"mean": '"abc"'}, "normalization must be three finite numbers"),  # min("abc") <= 0: a TypeError before
        ({"class_names": "null"}, "class_names must be a list of names"),
        ({"resize": "0"}, "resize must be positive integers"),
        ({"crop": "3"}, "metadata says 3 x 3 images, but its graph takes [None, 3, 16, 16]"),  # ORT's error before
        ({"input_name": "image"}, "names input 'image' and output 'logits', but the graph has inputs ['input']"),
        ({"num_classes": "4", "class_names": "[]"}, "metadata says 4 classes, but its graph gives ['batch', 3]"),
    ],
)
def test_metadata_that_does_not_fit_the_graph_is_one_line(files, tmp_path, changes, message, capsys):
    path = _with_props(files / "model.onnx", changes, tmp_path)
    assert run_cli(["predict", str(files / "blue.png"), "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


PROP_VALUES = st.one_of(
    st.sampled_from(['"abc"', "[]", "[0.5, 0.5]", "[0, 0, 0]", "[-1, 1, 1]", '["a", "b", "c"]', "null", "{}", "0",
                     "-16", "16", "1e9", "3", "true", '"gray"', "gray", "rgb", '"16"', "NaN", "[NaN, 1, 1]", "x"]),
    st.integers(-(2**40), 2**40).map(str),
    st.text(max_size=6),
)  # fmt: skip


@settings(max_examples=int(os.environ.get("KDPIPE_FUZZ_EXAMPLES", "40")), deadline=None, database=None,
          derandomize=not os.environ.get("KDPIPE_FUZZ_RANDOM"),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(changes=st.dictionaries(st.sampled_from([*META.to_props(), "bogus"]), PROP_VALUES, min_size=1, max_size=3))
def test_fuzz_a_models_metadata_is_used_or_refused_in_one_line(files, tmp_path_factory, changes, capsys):
    """The metadata an ONNX file carries (preprocessing, classes, names), edited: predict answers, or says in one
    line what is wrong with the model file (exit 2); never a traceback."""
    path = _with_props(files / "model.onnx", changes, tmp_path_factory.mktemp("fuzz-meta"))
    code = run_cli(["predict", str(files / "blue.png"), "--model", str(path)])
    out, err = capsys.readouterr()
    assert code in (0, 2) and "Traceback" not in err, (code, err)
    if code == 2:
        assert err.strip().splitlines()[-1].startswith("error: "), err
    else:
        assert out.startswith(f"{files / 'blue.png'}: ")
