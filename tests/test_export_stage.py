"""The export stage through the CLI's export-only path, on fused checkpoints made here (no training):
every artifact and its metadata, the fp16 gate failing a deliberately broken model, the INT8 gate
recorded as skipped when the run's labels do not fit the model, and the calibration cache reused."""

from __future__ import annotations

import json
import os
import stat
from itertools import pairwise

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from exports.golden import load_inputs, load_outputs
from exports.metadata import DeployMeta
from exports.onnx_export import read_metadata
from exports.runners import OnnxrtRunner, infer_array, run_onnx
from pipeline.artifacts.checkpoint import ModelMeta, save_checkpoint
from pipeline.artifacts.store import RunStore
from pipeline.cli import run_cli
from pipeline.models import build_model
from pipeline.reparam import fuse_model

pytestmark = [pytest.mark.xdist_group("export-stage"), pytest.mark.accuracy]  # gates on a trained student

DATA = [
    "data.synthetic.train_size=120",
    "data.synthetic.test_size=40",
    "data.num_classes=5",  # the checkpoints have 4 classes: test labels cannot score them
    "export.dynamo=false",  # the dynamo exporter is covered by the end-to-end run; this keeps the test quick
    "export.parity_samples=8",
    "export.golden_samples=4",
    "export.calibration_samples=32",
    "engine.opt_batch=4",
    "engine.max_batch=8",
]


def _args(*extra: str) -> list[str]:
    return [a for item in (*DATA, *extra) for a in ("--set", item)]


@torch.no_grad()
def _checkpoint(path, overflow: float | None = None):
    """A fused resnet20 for 4 classes; ``overflow`` scales one channel of a block's first conv and divides
    the matching input of its second conv, which keeps the fp32 function but leaves fp16's range."""
    torch.manual_seed(0)
    model = fuse_model(build_model("resnet20", 4))
    if overflow:
        block = model.layer1[0]
        block.conv1.bias[0] += 5.0  # a channel that is always active, so its scaled copy always overflows
        block.conv1.weight[0] *= overflow
        block.conv1.bias[0] *= overflow
        block.conv2.weight[:, 0] /= overflow
    meta = ModelMeta(
        arch="resnet20",
        num_classes=4,
        input_size=32,
        mean=[0.5] * 3,
        std=[0.15] * 3,
        class_names=[f"c{i}" for i in range(4)],
        form="fused",
    )
    save_checkpoint(path, model.state_dict(), meta)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage")
    ckpt = _checkpoint(root / "student.safetensors")
    out = root / "run"
    args = ["run", "export", "--checkpoint", str(ckpt), "--out", str(out)]
    assert run_cli([*args, *_args("export.precisions=[fp32,fp16,int8]")]) == 0
    return root, out, args


def test_every_precision_is_a_checked_artifact(exported):
    _, out, _ = exported
    manifest = RunStore(out).manifest("export")
    assert manifest.status == "ok" and all(manifest.checks)
    names = {a.path for a in manifest.outputs}
    assert {
        "model.onnx",
        "model.fp16.onnx",
        "model.int8.onnx",
        "golden_inputs.json",
        "golden_outputs.json",
        "golden_outputs_int8.json",
        "int8_calibration.json",
        "build_engine.sh",
        "report.json",
    } <= names
    checks = {c.name for c in manifest.checks}
    assert {"onnx_fp32_allclose", "batch_consistency", "onnx_fp16_min_cosine", "int8_qdq_tensorrt"} <= checks
    folder = out / "export"
    for name, precision in (("model.onnx", "fp32"), ("model.fp16.onnx", "fp16"), ("model.int8.onnx", "int8")):
        meta = DeployMeta.from_props(read_metadata(folder / name))
        assert (meta.precision, meta.num_classes, meta.input_size, meta.opset) == (precision, 4, 32, 18)
        assert meta.exporter.startswith("torch.onnx.export(dynamo=False)")
        assert meta.class_names == ["c0", "c1", "c2", "c3"] and meta.std == [0.15] * 3
    int8 = DeployMeta.from_props(read_metadata(folder / "model.int8.onnx"))
    assert "TensorRT explicit quantization" in int8.quantization and int8.int8_target == "tensorrt"
    assert DeployMeta.from_props(read_metadata(folder / "model.onnx")).int8_target == ""
    assert manifest.params["dynamo"] is False and manifest.params["opset"] == 18
    assert os.stat(folder / "build_engine.sh").st_mode & stat.S_IXUSR
    script = (folder / "build_engine.sh").read_text()
    assert "build_int8" in script and "--maxShapes=input:8x3x32x32" in script


def test_int8_gate_is_recorded_as_skipped_not_passed(exported):
    _, out, _ = exported
    manifest = RunStore(out).manifest("export")
    assert "int8 accuracy gate skipped: dataset synthetic has 5 classes, the model 4" in manifest.reason
    assert "onnx_int8_top1_drop" not in {c.name for c in manifest.checks}
    assert manifest.metrics["int8_gate"] == "skipped"
    report = json.loads((out / "export" / "report.json").read_text())
    assert report["gates"]["int8"]["accuracy_gate"].startswith("skipped")


def test_golden_files_hold_the_reference(exported):
    _, out, _ = exported
    folder = out / "export"
    images = load_inputs(folder / "golden_inputs.json")
    runner, reference = load_outputs(folder / "golden_outputs.json")
    assert images.shape == (4, 3, 32, 32) and runner == "pytorch-fp32"
    assert np.abs(run_onnx(folder / "model.onnx", images) - reference).max() <= 1e-4
    runner, int8 = load_outputs(folder / "golden_outputs_int8.json")
    assert runner == "onnxrt-int8"
    np.testing.assert_allclose(run_onnx(folder / "model.int8.onnx", images), int8, atol=1e-6)
    # made on the model with its weights' Q/DQ folded: the file's own outputs at its level, bit for bit
    assert json.loads((folder / "report.json").read_text())["latency"]["int8"]["constant_qdq_folded"] > 0
    with OnnxrtRunner(folder / "model.int8.onnx", optimization="disabled") as as_written:
        assert np.array_equal(infer_array(as_written, images), int8)


def test_rerun_reuses_the_calibration_cache(exported):
    _, out, args = exported
    assert run_cli([*args, *_args("export.precisions=[fp32,fp16,int8]"), "--force"]) == 0
    report = json.loads((out / "export" / "report.json").read_text())
    assert report["int8"]["cache_hit"] is True
    assert (out / ".cache" / "calibration" / f"{report['int8']['key']['digest']}.json").is_file()


def test_fp16_gate_fails_a_model_that_overflows_without_the_guard(exported, capsys):
    root, _, _ = exported
    ckpt = _checkpoint(root / "overflow.safetensors", overflow=1e6)
    out = root / "overflow"
    args = ["run", "export", "--checkpoint", str(ckpt), "--out", str(out)]
    assert run_cli([*args, *_args("export.precisions=[fp32,fp16]", "export.fp16_guard=false")]) == 1
    err = capsys.readouterr().err
    assert "stage 'export' failed its checks: FAILED | " in err and "onnx_fp16_min_cosine" in err
    manifest = RunStore(out).manifest("export")
    assert manifest.status == "failed"
    assert manifest.output("model.onnx")  # fp32 still passed; the failed manifest records everything
    failed = {c.name for c in manifest.checks if not c}
    assert {"onnx_fp16_min_cosine", "onnx_fp16_range"} <= failed and "onnx_fp32_allclose" not in failed

    assert run_cli([*args, *_args("export.precisions=[fp32,fp16]")]) == 0  # the guard keeps the node in fp32
    report = json.loads((out / "export" / "report.json").read_text())
    assert any("layer1" in node or "conv" in node.lower() for node in report["fp16"]["kept_fp32"])

    assert run_cli(["run", "engine", "--out", str(out), *_args("engine.precision=int8")]) == 2
    assert "engine.precision=int8 but the export stage made no int8 ONNX" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("export.precisions=[fp32,int4]", "unknown export precision 'int4'"),
        ("export.int8_target=gpu", "unknown export.int8_target 'gpu'"),
        ("export.calibration_method=histogram", "unknown calibration method 'histogram'"),
        ("engine.max_batch=0", "1 <= min_batch <= opt_batch <= max_batch"),
        ("export.fp16_safe_max=70000", "export.fp16_safe_max must be in (0, 65504]"),
        ("export.eval_samples=0", "export.eval_samples must be at least 1"),
    ],
)
def test_bad_export_settings_exit_2(exported, override, message, capsys):
    root, _, args = exported
    out = root / "bad"
    argv = [
        "run",
        "export",
        "--checkpoint",
        args[3],
        "--out",
        str(out),
        *_args("export.precisions=[fp32,int8]", override),
    ]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert RunStore(out).manifest("export") is None


def test_engine_stage_needs_the_precision_exported_and_skips_without_tensorrt(exported, capsys):
    from exports.trt_engine import unavailable_reason

    _, out, _ = exported
    assert run_cli(["run", "engine", "--out", str(out), *_args("engine.precision=bf16")]) == 2
    assert "unknown engine.precision 'bf16'" in capsys.readouterr().err
    cpu_int8 = _args("engine.precision=int8", "export.int8_target=cpu")
    assert run_cli(["run", "engine", "--out", str(out), *cpu_int8]) == 2
    assert "uint8 activations, which TensorRT does not accept" in capsys.readouterr().err
    reason = unavailable_reason()
    if not reason:
        pytest.skip("TensorRT and a GPU are present: the engine is built instead (covered by the tensorrt tests)")
    assert run_cli(["run", "engine", "--out", str(out), *_args("engine.precision=fp16")]) == 0
    manifest = RunStore(out).manifest("engine")
    assert manifest.status == "skipped" and manifest.reason == reason
    assert manifest.outputs == [] and not list((out / "engine").glob("*.engine"))
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("engine"))
    assert row.split()[1] == "skipped" and row.endswith(reason)  # the summary table says why
    assert run_cli(["run", "engine", "--out", str(out), *_args("engine.precision=fp16", "device=cpu")]) == 0
    assert "device=cpu" in RunStore(out).manifest("engine").reason


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_stage_builds_and_checks_each_precision(exported, precision, tmp_path):
    from exports.runtime import Classifier
    from exports.trt_engine import EngineSidecar, sidecar_path, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    _, out, _ = exported
    assert run_cli(["run", "engine", "--out", str(out), *_args(f"engine.precision={precision}")]) == 0
    manifest = RunStore(out).manifest("engine")
    assert manifest.status == "ok" and manifest.checks and all(manifest.checks)
    engine = out / "engine" / f"model.{precision}.engine"
    sidecar = EngineSidecar.load(sidecar_path(engine))
    assert sidecar.precision == precision and sidecar.profile.max_batch == 8
    assert list((out / ".cache" / "tensorrt").glob("*.timing.cache"))
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 20, 20)).save(image)
    predictions = Classifier.load(engine).predict([image], top_k=2)[0]
    assert len(predictions) == 2 and predictions[0].label.startswith("c")


def test_an_untrained_checkpoint_is_warned_about_not_failed(tmp_path, capsys):
    """Random weights pass every gate (each compares the export with its source); the near-chance top-1 on
    labels that fit the model is a note in the manifest and a log line, and the stage stays ok."""
    torch.manual_seed(0)
    ckpt = tmp_path / "random.safetensors"
    names = [f"class_{i:02d}" for i in range(4)]  # the synthetic set's names: its labels fit the model
    meta = ModelMeta("resnet20", 4, 32, [0.5] * 3, [0.15] * 3, class_names=names, form="fused")
    save_checkpoint(ckpt, fuse_model(build_model("resnet20", 4)).state_dict(), meta)
    out = tmp_path / "run"
    fits = [s for s in DATA if not s.startswith("data.num_classes")] + ["data.num_classes=4"]
    args = ["run", "export", "--checkpoint", str(ckpt), "--out", str(out), "--set", "export.precisions=[fp32,fp16]"]
    assert run_cli([*args, *[a for s in fits for a in ("--set", s)]]) == 0
    manifest = RunStore(out).manifest("export")
    assert manifest.status == "ok" and "points of chance (25.00% for 4 classes)" in manifest.reason
    assert "[export] warning: fp32 top-1" in capsys.readouterr().err


def test_the_chance_warning_needs_a_top1_near_chance():
    from stages.export import chance_warning

    labels = np.arange(100) % 10
    assert chance_warning(np.eye(10)[labels], labels, 10).notes == []
    assert chance_warning(np.eye(10)[(labels + 1) % 10], labels, 10).notes[0].startswith("warning: fp32 top-1 0.00%")


def test_a_tensorrt_target_export_on_a_cpu_also_times_the_cpu_target(exported, tmp_path, capsys):
    """ONNX Runtime on a CPU runs the TensorRT-placed Q/DQ model unfused, slower than fp32: beside it the report
    gives a cpu-target INT8 model's latency, labelled with its target and not kept; a cpu-target export, whose
    own figure is the CPU one, gets none, and neither does a machine with a GPU (its engine is the INT8 figure)."""
    from pipeline.config import load_config
    from stages.export import times_cpu_int8

    if torch.cuda.is_available():
        pytest.skip("the cpu-target INT8 model is timed only where the export runs without a GPU")
    _, out, _ = exported
    report = json.loads((out / "export" / "report.json").read_text())
    timed = report["int8_cpu_latency"]
    assert timed["target"] == "cpu" and timed["kept"] is False and timed["median_ms"] > 0
    assert timed["provider"] == "CPUExecutionProvider" and report["int8"]["target"] == "tensorrt"
    assert not list((out / "export").glob("*cpu*"))  # timed, not exported

    ckpt = _checkpoint(tmp_path / "student.safetensors")
    cpu_out = tmp_path / "run"
    args = ["run", "export", "--checkpoint", str(ckpt), "--out", str(cpu_out)]
    capsys.readouterr()
    assert run_cli([*args, *_args("export.precisions=[fp32,int8]", "export.int8_target=cpu")]) == 0
    report = json.loads((cpu_out / "export" / "report.json").read_text())
    assert report["int8"]["target"] == "cpu" and "int8" in report["latency"] and "int8_cpu_latency" not in report
    assert "cpu-target model (timed only)" not in capsys.readouterr().err

    assert times_cpu_int8(load_config("default"))
    assert not times_cpu_int8(load_config("default", None, ["export.precisions=[fp32,fp16]"]))
    assert not times_cpu_int8(load_config("default", None, ["export.cpu_int8_latency=false"]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        assert not times_cpu_int8(load_config("default"))


def test_a_model_the_dynamo_exporter_refuses_is_exported_by_torchscript_and_says_so(tmp_path, monkeypatch, capsys):
    """torch.export refuses some models (timm's MaxViT: "Failed to decompose the FX graph"); the stage falls back
    to the TorchScript exporter, records which exporter made the file, and still judges it with every gate. With
    ``export.dynamo=false`` already, a refusal stays the one-line exit 2."""
    import stages.export
    from pipeline.errors import UnsupportedModelError

    real = stages.export.export_onnx
    calls = []

    def dynamo_refuses(model, path, input_size, opset, dynamo, meta=None):
        calls.append(dynamo)
        if dynamo:
            raise UnsupportedModelError("export: ONNX export of resnet20 failed: ConversionError: decompose (test)")
        return real(model, path, input_size, opset, dynamo, meta)

    monkeypatch.setattr(stages.export, "export_onnx", dynamo_refuses)
    ckpt = _checkpoint(tmp_path / "student.safetensors")
    out = tmp_path / "run"
    args = ["run", "export", "--checkpoint", str(ckpt), "--out", str(out)]
    sets = [s for s in DATA if not s.startswith("export.dynamo")] + ["export.precisions=[fp32,fp16]"]
    assert run_cli([*args, *[a for s in sets for a in ("--set", s)]]) == 0
    assert calls == [True, False]
    manifest = RunStore(out).manifest("export")
    assert manifest.status == "ok" and all(manifest.checks) and manifest.metrics["dynamo"] is False
    assert "exported with dynamo=False after the dynamo exporter failed" in manifest.reason
    report = json.loads((out / "export" / "report.json").read_text())
    assert "ConversionError" in report["exporter_fallback"] and "dynamo=False" in report["exporter"]
    for name in ("model.onnx", "model.fp16.onnx"):
        assert "dynamo=False" in DeployMeta.from_props(read_metadata(out / "export" / name)).exporter
    assert "trying the TorchScript exporter" in capsys.readouterr().err

    def both_refuse(model, path, input_size, opset, dynamo, meta=None):
        raise UnsupportedModelError("export: ONNX export of resnet20 failed: RuntimeError: unsupported (test)")

    monkeypatch.setattr(stages.export, "export_onnx", both_refuse)
    assert run_cli([*args, "--force", "export", *_args("export.precisions=[fp32]")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: export: ONNX export")


def test_a_cpu_int8_timing_that_cannot_be_made_warns_and_the_export_goes_on(tmp_path, monkeypatch, capsys):
    """The cpu-target INT8 model is timed beside the export, not part of it: ONNX's shape inference refused
    timm's LowFormer there, and the export of a model whose own INT8 was fine failed with it."""
    import stages.export
    from pipeline.errors import UnsupportedModelError

    if torch.cuda.is_available():
        pytest.skip("the cpu-target INT8 model is timed only where the export runs without a GPU")

    def refused(*args, **kwargs):
        raise UnsupportedModelError("export: ... failed: InferenceError: [ShapeInferenceError] rank (3) vs (4)")

    monkeypatch.setattr(stages.export, "cpu_int8_latency", refused)
    ckpt = _checkpoint(tmp_path / "student.safetensors")
    out = tmp_path / "run"
    args = ["run", "export", "--checkpoint", str(ckpt), "--out", str(out), *_args("export.precisions=[fp32,int8]")]
    assert run_cli(args) == 0
    report = json.loads((out / "export" / "report.json").read_text())
    assert "ShapeInferenceError" in report["int8_cpu_latency"]["error"] and "median_ms" in report["latency"]["int8"]
    assert "warning: no INT8 timing on this CPU" in capsys.readouterr().err


def test_a_constant_qdq_fold_that_fails_leaves_the_int8_model_run_as_written(tmp_path, monkeypatch):
    """Folding the weights' Q/DQ only makes the INT8 checks faster: where it fails, they run the file as it is,
    with the same verdicts and goldens, and the report says why."""
    import stages.export

    def broken(path):
        raise RuntimeError("ONNX Runtime refused the constant subgraph")

    monkeypatch.setattr(stages.export, "fold_constant_qdq", broken)
    ckpt = _checkpoint(tmp_path / "student.safetensors")
    out = tmp_path / "run"
    extra = _args("export.precisions=[fp32,int8]", "export.cpu_int8_latency=false")
    assert run_cli(["run", "export", "--checkpoint", str(ckpt), "--out", str(out), *extra]) == 0
    folder = out / "export"
    report = json.loads((folder / "report.json").read_text())
    assert report["latency"]["int8"]["constant_qdq_folded"].startswith("not folded: RuntimeError: ONNX Runtime")
    images = load_inputs(folder / "golden_inputs.json")
    with OnnxrtRunner(folder / "model.int8.onnx", optimization="disabled") as as_written:
        assert np.array_equal(infer_array(as_written, images), load_outputs(folder / "golden_outputs_int8.json")[1])


def test_a_model_over_protobufs_2_gib_is_refused_before_the_export_in_one_line(tmp_path, monkeypatch, capsys):
    """torchvision's vit_h_14 (2.4 GiB of fp32 weights) failed minutes into the export with ``EncodeError:
    Failed to serialize proto``; the limit is lowered here so that a small model stands in for it."""
    import exports.onnx_export

    ckpt = _checkpoint(tmp_path / "student.safetensors")
    weights = sum(t.numel() * t.element_size() for t in load_file(str(ckpt)).values())
    monkeypatch.setattr(exports.onnx_export, "ONNX_FILE_LIMIT", weights)
    out = tmp_path / "run"
    assert run_cli(["run", "export", "--checkpoint", str(ckpt), "--out", str(out), *_args()]) == 2
    err = capsys.readouterr().err
    assert "over the 2 GiB one ONNX file holds" in err and "resnet20" in err and "Traceback" not in err
    assert not (out / "export").exists()
    monkeypatch.setattr(exports.onnx_export, "ONNX_FILE_LIMIT", weights + 1)  # one byte under: exported
    assert run_cli(["run", "export", "--checkpoint", str(ckpt), "--out", str(out), *_args()]) == 0


def test_onnx_runtime_calls_shrink_with_the_input_size():
    """256 images of 224 px per call took timm's CoaT past 24 GB (its attention grows with the square of the
    pixels, and each precision's session keeps its peak): the checks feed fewer, larger images per call."""
    from stages.export import ort_batch

    assert ort_batch(32) == 256 and ort_batch(64) == 64
    assert ort_batch(224) == 5 and ort_batch(1024) == 1
    sizes = [16, 32, 64, 128, 224, 299, 512]
    assert all(ort_batch(a) >= ort_batch(b) >= 1 for a, b in pairwise(sizes))
