"""Golden I/O in Polygraphy's JSON format: the round trip through Polygraphy's own loaders, and the
comparison commands of ``build_engine.sh`` run for real by Polygraphy's CLI (ONNX Runtime stands in
for TensorRT, which this machine does not have)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from polygraphy.comparator import RunResults
from polygraphy.json import load_json

from exports.golden import load_inputs, load_outputs, save_inputs, save_outputs
from exports.onnx_export import export_onnx
from exports.trt_commands import polygraphy_checks


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("golden")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    ).eval()
    onnx_path = export_onnx(model, folder / "model.onnx", 8, 18, False)
    images = torch.randn(4, 3, 8, 8).numpy()
    with torch.no_grad():
        reference = model(torch.from_numpy(images)).numpy()
    save_inputs(images, folder / "golden_inputs.json")
    save_outputs(reference, folder / "golden_outputs.json", runner="pytorch-fp32")
    return folder, onnx_path, images, reference


def test_round_trip_through_polygraphy_loaders(exported):
    folder, _, images, reference = exported
    feeds = load_json(str(folder / "golden_inputs.json"))
    assert len(feeds) == len(images)  # one iteration per sample
    assert all(list(feed) == ["input"] and feed["input"].shape == (1, 3, 8, 8) for feed in feeds)
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in feeds]), images)
    results = RunResults.load(str(folder / "golden_outputs.json"))
    assert list(results.keys()) == ["pytorch-fp32"]
    np.testing.assert_array_equal(np.concatenate([it["logits"] for it in results["pytorch-fp32"]]), reference)
    np.testing.assert_array_equal(load_inputs(folder / "golden_inputs.json"), images)
    runner, outputs = load_outputs(folder / "golden_outputs.json")
    assert runner == "pytorch-fp32" and outputs.dtype == np.float32
    np.testing.assert_array_equal(outputs, reference)


def _polygraphy() -> list[str]:
    exe = shutil.which("polygraphy", path=str(Path(sys.executable).parent)) or shutil.which("polygraphy")
    if exe is None:
        pytest.skip("the polygraphy command is not installed")
    return [exe]


def _on_onnxruntime(command: list[str], onnx_file: str) -> list[str]:
    """The engine check with ONNX Runtime on the ONNX instead of TensorRT on the engine."""
    args = command[2:]
    args[0] = onnx_file
    i = args.index("--model-type")
    del args[i : i + 2]
    args[args.index("--trt")] = "--onnxrt"
    return [*_polygraphy(), "run", *args]


@pytest.mark.slow  # 34 s here (2 CPU cores, one thread)
def test_engine_check_commands_pass_on_matching_outputs(exported):
    folder, onnx_path, _, _ = exported
    checks = [c for precision in ("fp32", "fp16") for c in polygraphy_checks(precision)]
    commands = {tuple(_on_onnxruntime(c, onnx_path.name)) for c in checks}
    assert len(commands) == 3  # fp32 values, fp16 cosine, top-1 (the same for both)
    for command in sorted(commands):
        done = subprocess.run(list(command), cwd=folder, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "PASSED" in done.stdout


@pytest.mark.slow
def test_engine_top1_check_fails_when_another_class_wins(exported, tmp_path):
    folder, onnx_path, _, reference = exported
    for name in ("model.onnx", "golden_inputs.json"):
        shutil.copy(folder / name, tmp_path / name)
    wrong = reference.copy()
    wrong[0, reference[0].argmin()] = reference[0].max() + 1.0  # the golden top-1 of sample 0 changes
    save_outputs(wrong, tmp_path / "golden_outputs.json", runner="pytorch-fp32")
    top1 = polygraphy_checks("int8")[0]
    assert "indices" in top1
    top1[top1.index("golden_outputs_int8.json")] = "golden_outputs.json"
    done = subprocess.run(_on_onnxruntime(top1, onnx_path.name), cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0, done.stdout[-2000:]
