"""The edge runtime: preprocessing identical to the pipeline's, top-k on a saved image, no torch needed,
and clear errors for files it cannot use."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from exports.metadata import DeployMeta
from exports.onnx_export import export_onnx
from exports.runners import run_onnx
from exports.runtime import (
    EDGE_FILES,
    EDGE_REQUIREMENTS,
    Classifier,
    ImageError,
    ModelFileError,
    load_image,
    preprocess,
    top_classes,
)
from stages.export import deploy_transform

META = DeployMeta(
    arch="brightness",
    num_classes=3,
    input_size=32,
    mean=[0.5, 0.4, 0.3],
    std=[0.2, 0.25, 0.3],
    resize=36,
    crop=32,
    class_names=["red", "green", "blue"],
)
ROOT = Path(__file__).resolve().parents[1]


class Brightness(torch.nn.Module):
    """Logits = mean of each normalized channel over the crop: the brightest channel wins."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * 4.0


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return export_onnx(Brightness(), tmp_path_factory.mktemp("rt") / "model.onnx", 32, 18, False, META)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out = {}
    for name, channel, size in (("red.png", 0, (48, 40)), ("blue.jpg", 2, (36, 60)), ("green.png", 1, (36, 36))):
        pixels = rng.integers(0, 90, (size[1], size[0], 3), dtype=np.uint8)
        pixels[..., channel] = 230
        Image.fromarray(pixels).save(folder / name)
        out[name] = folder / name
    return out


def test_preprocessing_matches_the_pipelines_transform(images):
    for path in images.values():
        image = load_image(path)
        ours = preprocess(image, META)
        theirs = deploy_transform(META)(image).numpy()
        assert ours.shape == (3, 32, 32) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_top_k_on_saved_images(model_file, images):
    classifier = Classifier.load(model_file)
    assert classifier.meta == META
    results = classifier.predict([images["red.png"], images["blue.jpg"], images["green.png"]], top_k=2)
    assert [r[0].label for r in results] == ["red", "blue", "green"]
    for preds in results:
        assert len(preds) == 2 and preds[0].probability >= preds[1].probability > 0
    batch = classifier.preprocess([images["red.png"]])
    logits = run_onnx(model_file, batch)
    assert results[0][0].index == int(logits[0].argmax())
    assert results[0][0].probability == pytest.approx(float(np.exp(logits[0]).max() / np.exp(logits[0]).sum()))
    assert len(classifier.predict([images["red.png"]], top_k=10)[0]) == 3  # k is capped at the class count


def test_fp16_and_int8_models_get_the_cpu_level_the_export_checks_use(tmp_path):
    """ONNX Runtime's level "all" crashed building torchvision ViT-B fp16 sessions, and its fused integer kernels
    departed from a TensorRT-target INT8 graph: the runtime learns precision and quantization from the model's
    metadata first (the INT8 target it was made for, or for older files the quantization text), then builds the
    session at the level the checks use."""
    import onnxruntime as ort

    from exports.int8 import INT8_TARGETS

    tensorrt, cpu = (INT8_TARGETS.get(t).description for t in ("tensorrt", "cpu"))
    cases = [
        ("fp16", "", "", "ORT_ENABLE_EXTENDED"),
        ("fp32", "", "", "ORT_ENABLE_ALL"),
        ("int8", "tensorrt", tensorrt, "ORT_DISABLE_ALL"),  # its Q/DQ graph as written, as TensorRT computes it
        ("int8", "cpu", cpu, "ORT_ENABLE_ALL"),  # fused integer kernels, as it is deployed
        ("int8", "", tensorrt, "ORT_DISABLE_ALL"),  # exported before int8_target was recorded
        ("int8", "cpu", "int8, reworded", "ORT_ENABLE_ALL"),  # the recorded target decides, not the text
        ("int8", "tensorrt", "int8, reworded", "ORT_DISABLE_ALL"),
    ]
    for i, (precision, target, quantization, level) in enumerate(cases):
        fields = {"precision": precision, "int8_target": target, "quantization": quantization}
        meta = DeployMeta(**{**META.__dict__, **fields})
        path = export_onnx(Brightness(), tmp_path / f"{i}.onnx", 32, 18, False, meta)
        with Classifier.load(path) as classifier:
            assert classifier.meta.precision == precision
            used = classifier.runner.session.get_session_options().graph_optimization_level
            assert used == getattr(ort.GraphOptimizationLevel, level)


def test_top_classes_orders_and_names():
    logits = np.array([[0.0, 2.0, 1.0], [5.0, 5.0, -1.0]], dtype=np.float32)
    rows = top_classes(logits, 2, META)
    assert [(p.index, p.label) for p in rows[0]] == [(1, "green"), (2, "blue")]
    assert [p.index for p in rows[1]] == [0, 1]  # ties: lower index first
    assert sum(p.probability for p in top_classes(logits, 3, META)[0]) == pytest.approx(1.0)


def test_runtime_works_without_torch(model_file, images):
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
from exports.runtime import Classifier
preds = Classifier.load({str(model_file)!r}).predict([{str(images["blue.jpg"])!r}], top_k=1)
print(preds[0][0].label)
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "blue"


def test_files_it_cannot_use_are_clear_errors(tmp_path, model_file):
    with pytest.raises(ModelFileError, match="does not exist"):
        Classifier.load(tmp_path / "none.onnx")
    os.mkfifo(tmp_path / "pipe.onnx")  # would block the reader forever; a device like /dev/zero never ends
    with pytest.raises(ModelFileError, match="pipe.onnx is not a regular file"):
        Classifier.load(tmp_path / "pipe.onnx")
    (tmp_path / "junk.onnx").write_text("not a model")
    with pytest.raises(ModelFileError, match="is not a loadable ONNX model"):
        Classifier.load(tmp_path / "junk.onnx")
    bare = export_onnx(Brightness(), tmp_path / "bare.onnx", 32, 18, False)  # no metadata
    with pytest.raises(ModelFileError, match="has no pipeline metadata"):
        Classifier.load(bare)
    (tmp_path / "weights.pt").write_bytes(b"\0")
    with pytest.raises(ModelFileError, match=r"neither an \.onnx model nor a TensorRT \.engine"):
        Classifier.load(tmp_path / "weights.pt")
    (tmp_path / "m.engine").write_bytes(b"\0")
    from exports.trt_engine import unavailable_reason

    if unavailable_reason():
        with pytest.raises(ModelFileError, match="cannot run TensorRT engine"):
            Classifier.load(tmp_path / "m.engine")
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "none.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ImageError, match="is not a readable image"):
        load_image(tmp_path / "broken.png")
    small = tmp_path / "small.png"
    Image.new("RGB", (36, 20)).save(small)
    classifier = Classifier.load(model_file)
    assert classifier.preprocess([small]).shape == (1, 3, 32, 32)  # resized up to the crop
    json.dumps([vars(p) for p in classifier.predict([small])[0]])  # predictions serialize


def _edge_imports(path: Path) -> tuple[set[str], set[str]]:
    """(top-level packages imported absolutely, sibling modules imported relatively) by one runtime file."""
    absolute, relative = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            absolute.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            relative.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            absolute.add(node.module.split(".")[0])
    return absolute, relative


def test_the_edge_files_import_only_each_other_and_the_edge_requirements():
    allowed = set(sys.stdlib_module_names) | {"numpy", "PIL", "onnxruntime"}
    siblings = {name.removesuffix(".py") for name in EDGE_FILES} | {"trt_engine"}  # an engine needs the full install
    for name in EDGE_FILES:
        absolute, relative = _edge_imports(ROOT / "exports" / name)
        assert absolute <= allowed, f"exports/{name} imports {sorted(absolute - allowed)}"
        assert relative <= siblings, f"exports/{name} imports {sorted(relative - siblings)}"
    requirements = (ROOT / "exports" / EDGE_REQUIREMENTS).read_text().split()
    assert sorted(r.split(">")[0] for r in requirements) == ["numpy", "onnxruntime", "pillow"]


@pytest.mark.slow
def test_the_runtime_installs_and_classifies_alone_in_a_fresh_venv(tmp_path, model_file, images):
    """An edge app's route (docs/export.md, "Edge runtime"): a plain venv (no system site-packages, so no torch), the
    edge requirements from pip, the runtime's files copied into the app under a name of its own."""
    venv = tmp_path / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if made.returncode != 0 or not python.exists():
        pytest.skip(f"cannot create a virtual environment here: {made.stderr.strip()[-300:]}")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", EDGE_REQUIREMENTS],
        cwd=ROOT / "exports",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if pip.returncode != 0:
        pytest.skip(f"pip cannot install the edge requirements here (no index or cache?): {pip.stderr.strip()[-300:]}")
    app = tmp_path / "app"
    (app / "edge_rt").mkdir(parents=True)
    for name in EDGE_FILES:
        shutil.copy(ROOT / "exports" / name, app / "edge_rt" / name)
    shutil.copy(model_file, app / "model.onnx")
    shutil.copy(images["blue.jpg"], app / "blue.jpg")
    (app / "main.py").write_text(
        textwrap.dedent(
            """
            import importlib.util, sys
            from edge_rt.runtime import Classifier, ModelFileError
            assert importlib.util.find_spec("torch") is None, "torch is importable in the edge venv"
            with Classifier.load("model.onnx") as model:
                top = model.predict(["blue.jpg"], top_k=2)[0]
            print(top[0].label, len(top))
            try:
                Classifier.load("missing.onnx")
            except ModelFileError as exc:
                print("error:", exc)
            assert not {"torch", "pipeline", "exports"} & set(sys.modules), "the runtime pulled in the pipeline"
            """
        )
    )
    done = subprocess.run([str(python), "main.py"], cwd=app, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["blue 2", "error: model file missing.onnx does not exist"]
