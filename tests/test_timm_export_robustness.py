"""Exports that used to end in a traceback (issue 25): each fix on the smallest model or graph that shows it.

* a block whose own ``reparameterize()`` deletes a child that also re-parameterizes (timm's FastViT ``RepMixer``);
* an fp16 conversion that writes an invalid graph (a ``Cast`` of a bool tensor to float, as in timm's EdgeNeXt);
* ONNX Runtime's quantization pre-processing giving up ("Incomplete symbolic shape inference", timm's HRNet);
* any other exception of timm, onnx or ONNX Runtime inside a step: one line naming the stage, model and cause.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from exports.fp16 import fp16_model, invalid_nodes
from exports.int8 import CalibrationCache, quantize_int8
from exports.metadata import DeployMeta
from exports.onnx_export import check_onnx
from exports.runners import run_onnx
from pipeline.errors import PipelineError, UnsupportedModelError, library_errors
from pipeline.reparam import fuse_model

SIZE = 8
META = DeployMeta("toy:graph", 3, SIZE, [0.0] * 3, [1.0] * 3, SIZE, SIZE)


# --- the fusion walk: a block's reparameterize() removes children the walk had listed ---


class Branch(nn.Module):
    """A re-parameterizable leaf: conv + scaled identity -> one conv (guarded against a second call, as timm's)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.reparam_conv: nn.Conv2d | None = None
        self.calls = 0

    def forward(self, x):
        return self.reparam_conv(x) if self.reparam_conv is not None else self.conv(x) + self.scale * x

    def reparameterize(self):
        self.calls += 1
        if self.reparam_conv is not None:
            return
        conv = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, 3, padding=1)
        identity = torch.zeros_like(self.conv.weight)
        identity[torch.arange(identity.shape[0]), torch.arange(identity.shape[0]), 1, 1] = 1.0
        conv.weight.data = self.conv.weight + self.scale * identity
        conv.bias.data = self.conv.bias.clone()
        self.reparam_conv = conv
        del self.conv


class Mixer(nn.Module):
    """Like timm's RepMixer: re-parameterizes both children, merges them into one conv, then deletes them."""

    def __init__(self, channels: int):
        super().__init__()
        self.mixer, self.norm = Branch(channels), Branch(channels)
        self.keep = Branch(channels)  # survives its parent's reparameterize(), which calls it (a second call no-ops)

    def forward(self, x):
        if hasattr(self, "merged"):
            return self.keep(self.merged(x))
        return self.keep(x + self.mixer(x) - self.norm(x))

    def reparameterize(self):
        self.mixer.reparameterize()
        self.norm.reparameterize()
        self.keep.reparameterize()
        merged = nn.Conv2d(self.mixer.reparam_conv.in_channels, self.mixer.reparam_conv.out_channels, 3, padding=1)
        identity = torch.zeros_like(merged.weight)
        identity[torch.arange(identity.shape[0]), torch.arange(identity.shape[0]), 1, 1] = 1.0
        merged.weight.data = identity + self.mixer.reparam_conv.weight - self.norm.reparam_conv.weight
        merged.bias.data = self.mixer.reparam_conv.bias - self.norm.reparam_conv.bias
        del self.mixer, self.norm
        self.merged = merged


def test_fusion_survives_a_reparameterize_that_deletes_children():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), Mixer(4)).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(x)
    fused = fuse_model(model)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)
    assert not hasattr(fused[2], "mixer") and not hasattr(fused[2], "norm")
    assert isinstance(fused[1], nn.Identity)  # the BatchNorm is still folded after the walk
    assert fused[2].keep.reparam_conv is not None and fused[2].keep.calls == 2  # parent's call, then its own (no-op)
    assert isinstance(model[2].mixer, Branch), "fuse_model must not modify its input by default"


@pytest.mark.slow
def test_timm_fastvit_fuses_to_the_same_function():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("fastvit_t8", num_classes=20).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        got = fuse_model(model)(x)
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())


# --- fp16: the converter writes an invalid graph; the nodes the checker names stay fp32 ---


def _bool_cast_graph(path) -> str:
    """x + cumsum(float(not(x > 0))): onnxconverter-common types the Cast's output fp16 but keeps ``to=float``."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])
    nodes = [
        helper.make_node("Greater", ["input", "zero"], ["positive"], name="greater"),
        helper.make_node("Not", ["positive"], ["mask"], name="not"),
        helper.make_node("Cast", ["mask"], ["mask_float"], name="bool_to_float", to=TensorProto.FLOAT),
        helper.make_node("CumSum", ["mask_float", "axis"], ["count"], name="cumsum"),
        helper.make_node("Mul", ["count", "input"], ["scaled"], name="mul"),
        helper.make_node("Add", ["input", "scaled"], ["logits"], name="add"),
    ]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero"), numpy_helper.from_array(np.int64(1), "axis")]
    graph = helper.make_graph(nodes, "bool_cast", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    check_onnx(path)
    return str(path)


def test_fp16_keeps_the_nodes_the_converter_breaks_in_fp32(tmp_path):
    src = _bool_cast_graph(tmp_path / "m.onnx")
    result = fp16_model(src, tmp_path / "m16.onnx", None, 16384.0, META)
    assert result.guard == [] and result.converter == ["bool_to_float"]
    assert "bool_to_float" in result.converter_errors[0]
    check_onnx(tmp_path / "m16.onnx")
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(tmp_path / "m16.onnx", x), run_onnx(src, x), rtol=2e-3, atol=2e-3)
    assert not (tmp_path / "m16.onnx.partial").exists()


def test_fp16_that_stays_invalid_is_one_line_naming_the_model(tmp_path, monkeypatch):
    import exports.fp16 as fp16

    convert = fp16._converted
    monkeypatch.setattr(fp16, "_converted", lambda src, block: convert(src, []))  # ignores the block list
    src = _bool_cast_graph(tmp_path / "m.onnx")
    with pytest.raises(UnsupportedModelError, match=r"fp16 conversion of toy:graph .*bool_to_float") as err:
        fp16_model(src, tmp_path / "m16.onnx", None, 16384.0, META)
    assert "\n" not in str(err.value) and err.value.exit_code == 2
    assert not (tmp_path / "m16.onnx").exists() and not (tmp_path / "m16.onnx.partial").exists()


def _large_logits_graph(path, fan_out: bool = False) -> str:
    """relu(x @ w1) @ w2 with large weights: activations near 1e4, logits near 1e6, all kept fp32 by the guard.
    ``fan_out``: the ReLU read by two MatMuls, summed, with value_info written as the exporters write it."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["hidden"], name="fc1"),
        helper.make_node("Relu", ["hidden"], ["act"], name="relu"),
        helper.make_node("MatMul", ["act", "w2"], ["a" if fan_out else "logits"], name="fc2"),
    ]
    inits = [
        numpy_helper.from_array(np.float32(1e4) * rng.standard_normal((4, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.float32(10) * rng.standard_normal((8, 3)).astype(np.float32), "w2"),
    ]
    if fan_out:
        nodes += [
            helper.make_node("MatMul", ["act", "w3"], ["b"], name="fc3"),
            helper.make_node("Add", ["a", "b"], ["logits"], name="add"),
        ]
        inits.append(numpy_helper.from_array(np.float32(10) * rng.standard_normal((8, 3)).astype(np.float32), "w3"))
    model = helper.make_model(
        helper.make_graph(nodes, "large", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)]
    )
    model.ir_version = 10
    onnx.save(onnx.shape_inference.infer_shapes(model) if fan_out else model, str(path))
    return str(path)


def test_fp16_keeps_fp32_logits_when_the_guard_keeps_the_last_node(tmp_path):
    """timm:mobileone_s1 with random weights: logits near 1e7, its last Gemm kept in fp32 by the guard, and
    onnxconverter-common's Cast after that kept node made the output fp16 (inf) despite ``keep_io_types``."""
    src = _large_logits_graph(tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
    result = fp16_model(src, tmp_path / "m16.onnx", x, 16384.0, META)
    assert "fc2" in result.guard
    graph = onnx.load(str(tmp_path / "m16.onnx")).graph
    assert graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    got, expected = run_onnx(tmp_path / "m16.onnx", x), run_onnx(src, x)
    assert got.dtype == np.float32 and np.abs(expected).max() > 1e5
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_an_fp16_output_written_by_another_node_gets_a_cast_to_fp32():
    from exports.fp16 import _fp32_outputs

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT16, ["batch", 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"], name="relu")], "g", [x], [y])
    model = _fp32_outputs(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), ["logits"])
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node] == [
        ("Relu", ["input"], ["logits_fp16"]),
        ("Cast", ["logits_fp16"], ["logits"]),
    ]
    onnx.checker.check_model(model, full_check=True)


def test_invalid_nodes_reads_both_onnx_message_forms():
    message = "(op_type:Cast, node name: a): [TypeInferenceError] x (op_type:Add, node name: b): y (node name: a)"
    assert invalid_nodes(message) == ["a", "b"]
    assert invalid_nodes("==> Context: Bad node spec for node. Name: c OpType: Cast") == ["c"]
    assert invalid_nodes("no node here") == []


# --- int8: ONNX Runtime's symbolic shape inference gives up ---


def _conv_graph(path) -> str:
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4, SIZE, SIZE])
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["logits"], name="relu"),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "conv", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)]
    )
    model.ir_version = 10
    onnx.save(model, str(path))
    return str(path)


def _failing_symbolic_inference(monkeypatch, also_without: bool = False) -> list[bool]:
    """quant_pre_process raising as ONNX Runtime does on HRNet (and, with ``also_without``, in any mode)."""
    from onnxruntime.quantization import shape_inference

    original, calls = shape_inference.quant_pre_process, []

    def pre_process(src, dst, skip_symbolic_shape=False, **kwargs):
        calls.append(skip_symbolic_shape)
        if also_without or not skip_symbolic_shape:
            raise Exception("Incomplete symbolic shape inference")
        return original(src, dst, skip_symbolic_shape=skip_symbolic_shape, **kwargs)

    monkeypatch.setattr(shape_inference, "quant_pre_process", pre_process)
    return calls


def test_int8_falls_back_to_onnx_shape_inference(tmp_path, monkeypatch):
    calls = _failing_symbolic_inference(monkeypatch)
    src = _conv_graph(tmp_path / "m.onnx")
    images = np.random.default_rng(1).standard_normal((8, 3, SIZE, SIZE)).astype(np.float32)
    result = quantize_int8(src, tmp_path / "m8.onnx", images, CalibrationCache(tmp_path / "cache"), META)
    assert calls == [False, True]
    assert "Incomplete symbolic shape inference" in result.preprocess
    assert "ONNX shape inference only" in result.preprocess
    assert run_onnx(tmp_path / "m8.onnx", images).shape == (8, 4, SIZE, SIZE)


def test_int8_preprocessing_that_fails_both_ways_is_one_line(tmp_path, monkeypatch):
    _failing_symbolic_inference(monkeypatch, also_without=True)
    src = _conv_graph(tmp_path / "m.onnx")
    images = np.zeros((4, 3, SIZE, SIZE), np.float32)
    with pytest.raises(UnsupportedModelError, match=r"INT8 pre-processing of toy:graph failed") as err:
        quantize_int8(src, tmp_path / "m8.onnx", images, CalibrationCache(tmp_path / "cache"), META)
    assert "\n" not in str(err.value) and err.value.exit_code == 2


# --- int8: tensors numpy cannot bin, inf/nan activations, memory ---


def _shifted_graph(path, shift: float = 0.5, op: str = "Add") -> str:
    """conv(x * 1e-5 + shift): the Add's output is ``shift`` +- 3e-5, as an attention output of timm's
    iformer_t / efficientvit_m0 with random weights (``op="Log"``: log(x * 1e-5 + shift), inf where it hits 0)."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4, SIZE, SIZE])
    nodes = [
        helper.make_node("Mul", ["input", "tiny"], ["small"], name="mul"),
        helper.make_node("Add", ["small", "shift"], ["shifted"], name="add"),
    ]
    if op == "Log":
        nodes.append(helper.make_node("Log", ["shifted"], ["logged"], name="log"))
    nodes.append(helper.make_node("Conv", ["logged" if op == "Log" else "shifted", "w"], ["logits"], name="conv"))
    inits = [
        numpy_helper.from_array(np.float32(1e-5), "tiny"),
        numpy_helper.from_array(np.float32(shift), "shift"),
        numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "shifted", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)]
    )
    model.ir_version = 10
    onnx.save(model, str(path))
    return str(path)


def test_int8_calibrates_a_tensor_too_narrow_for_numpy_bins(tmp_path):
    """timm:iformer_t and timm:efficientvit_m0 failed in ONNX Runtime's histogram calibrator: numpy cannot cut
    [0.49997, 0.50003] into 2048 float32 bins ("Too many bins for data range"). Such a tensor's histogram now
    spans [0, peak], and its scale comes out as the peak's."""
    src = _shifted_graph(tmp_path / "m.onnx")
    images = np.random.default_rng(1).standard_normal((16, 3, SIZE, SIZE)).astype(np.float32)
    with pytest.raises(ValueError, match="Too many bins"):
        np.histogram(np.abs(0.5 + 1e-5 * images).astype(np.float32), bins=2048)  # what ONNX Runtime asks of numpy
    cache = CalibrationCache(tmp_path / "cache")
    quantize_int8(src, tmp_path / "m8.onnx", images, cache, META)  # percentile
    scales = {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load(str(tmp_path / "m8.onnx")).graph.initializer
        if "scale" in t.name
    }
    shifted = [v for k, v in scales.items() if k.startswith("shifted")]
    assert shifted and abs(float(shifted[0]) * 127 - 0.5) < 0.01, scales
    expected = run_onnx(src, images)
    assert np.abs(run_onnx(tmp_path / "m8.onnx", images) - expected).max() < 0.05 * np.abs(expected).max()


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # ONNX Runtime, on the inf/nan tensor
def test_int8_of_an_activation_that_is_not_finite_is_one_line(tmp_path):
    src = _shifted_graph(tmp_path / "m.onnx", shift=0.0, op="Log")
    images = np.zeros((4, 3, SIZE, SIZE), np.float32)  # log(0) = -inf
    with pytest.raises(
        UnsupportedModelError, match=r"INT8 calibration of toy:graph failed: activation '(logged|logits)' is inf/nan"
    ):
        quantize_int8(src, tmp_path / "m8.onnx", images, CalibrationCache(tmp_path / "cache"), META)


def test_int8_calibration_out_of_memory_is_one_line_saying_what_to_lower(tmp_path, monkeypatch):
    """timm:efficientformerv2_s0 and four more at 224 px ended in ONNX Runtime's arena message (timm:iformer_t
    in the OOM killer). Where a pass of one image still does not fit, the error says memory, INT8 calibration
    and what to change, in one line."""
    from onnxruntime.quantization import calibrate

    def collect_data(self, reader):
        raise RuntimeError(
            "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Erf node. Status Message: "
            "bfc_arena.cc:360 void* onnxruntime::BFCArena::AllocateRawInternal Failed to allocate memory for\n..."
        )

    monkeypatch.setattr(calibrate.HistogramCalibrater, "collect_data", collect_data)
    src = _conv_graph(tmp_path / "m.onnx")
    images = np.zeros((4, 3, SIZE, SIZE), np.float32)
    with pytest.raises(UnsupportedModelError) as err:
        quantize_int8(src, tmp_path / "m8.onnx", images, CalibrationCache(tmp_path / "cache"), META)
    message = str(err.value)
    assert message.startswith("export: INT8 calibration of toy:graph ran out of memory (")
    assert "MiB of activations per image" in message and "data.image_size" in message
    assert "calibration_method=minmax" in message and "\n" not in message and err.value.exit_code == 2


# --- any other library exception inside a step: one line with stage, step, model and cause ---


def test_library_exception_becomes_one_line_with_stage_step_and_model():
    ort = pytest.importorskip("onnxruntime")
    with pytest.raises(UnsupportedModelError) as err, library_errors("export", "fp16 conversion", "timm:x"):
        ort.InferenceSession(b"not a model\nat all", providers=["CPUExecutionProvider"])
    message = str(err.value)
    assert message.startswith("export: fp16 conversion of timm:x failed: ") and "(raised in onnxruntime" in message
    assert "\n" not in message and err.value.exit_code == 2


def test_our_own_errors_and_bugs_keep_their_type():
    with pytest.raises(ZeroDivisionError), library_errors("export", "step", "m"):  # a bug here: traceback
        _ = 1 / 0
    with pytest.raises(OSError), library_errors("export", "step", "m"):  # a full disk: the runner's one line
        raise OSError(28, "No space left on device")
    lazy_import = type("LazyImportError", (ImportError,), {"__module__": "onnxruntime.tools"})  # as if ORT's
    with pytest.raises(ImportError), library_errors("export", "step", "m"):  # the CLI names the package to install
        raise lazy_import("No module named 'sympy'", name="sympy")
    with pytest.raises(PipelineError, match="^already one line$"), library_errors("export", "step", "m"):
        raise PipelineError("already one line")


@pytest.mark.slow
def test_cli_reports_an_fp16_failure_in_one_line(tmp_path, monkeypatch, capsys):
    """The export-only path end to end: a conversion that cannot be made is `error: ...` and exit status 2."""
    import safetensors.torch

    import exports.fp16 as fp16
    from pipeline.cli import run_cli
    from pipeline.models import build_model

    def broken(src, block):
        raise onnx.checker.ValidationError("converter crashed")

    monkeypatch.setattr(fp16, "_converted", broken)
    torch.manual_seed(0)
    safetensors.torch.save_file(build_model("timm:resnet10t", 4, 32).state_dict(), str(tmp_path / "m.safetensors"))
    sets = [
        "student.arch=timm:resnet10t",
        "data.image_size=32",
        "data.num_classes=4",
        "data.synthetic.train_size=64",
        "data.synthetic.test_size=32",
        "export.calibration_samples=16",
        "export.parity_samples=8",
        "export.precisions=[fp32,fp16]",
    ]
    argv = ["run", "export", "--checkpoint", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "run")]
    code = run_cli([*argv, *[x for s in sets for x in ("--set", s)]])
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert code == 2 and "Traceback" not in err
    assert line.startswith("error: export: fp16 conversion of timm:resnet10t failed: ValidationError: converter")


def _raising_in(module: str):
    """A function defined as if in ``module`` that makes numpy raise (numpy's frame is the innermost)."""
    namespace = {"__name__": module, "np": np}
    exec("def calibrate():\n    return np.histogram(np.array([0.0, 1.0]), bins=-1)\n", namespace)
    return namespace["calibrate"]


def test_numpy_failing_inside_a_library_is_that_librarys_one_line_error():
    """ONNX Runtime's INT8 calibration of timm:efficientvit_m0 failed in numpy ("Too many bins"): a
    traceback, since the innermost frame was numpy's. Frames of other packages are now looked through."""
    expected = r"export: int8 of m failed: ValueError: .*onnxruntime"
    with pytest.raises(UnsupportedModelError, match=expected), library_errors("export", "int8", "m"):
        _raising_in("onnxruntime.quantization.calibrate")()
    # numpy called from our own code is a bug: its traceback stays
    with pytest.raises(ValueError), library_errors("export", "int8", "m"):
        _raising_in("exports.int8")()


def test_a_safetensors_state_loads_into_a_module_that_versions_its_state(tmp_path):
    """torchvision's MNASNet reads the version record torch.save keeps beside the tensors; safetensors has
    none, and the export of any MNASNet ended in a traceback."""
    import torchvision
    from safetensors.torch import load_file, save_file

    from pipeline.artifacts.checkpoint import load_strict

    model = torchvision.models.mnasnet0_5(num_classes=20)
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    fresh = torchvision.models.mnasnet0_5(num_classes=20)
    load_strict(fresh, load_file(tmp_path / "m.safetensors"), "m.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_later_calibration_passes_merge_as_onnx_runtime_merges_them():
    """The percentile collector's later passes are counted with uniform bins (numpy sorts the data for explicit
    edges, 4x slower at 224 px); the histogram, its edges and the percentile threshold are ONNX Runtime's."""
    from onnxruntime.quantization import calibrate

    from exports.calibration import _robust_collector

    rng = np.random.default_rng(0)
    passes = [[rng.standard_normal((2, 64, 16)).astype(np.float32) * scale] for scale in (1.0, 0.5, 3.0, 2.0)]
    calibrator = type(
        "Calibrator",
        (),
        {
            "method": "percentile",
            "symmetric": True,
            "num_bins": 2048,
            "num_quantized_bins": 128,
            "percentile": 99.999,
            "scenario": "same",
        },
    )
    ours = _robust_collector(calibrator, "m")
    theirs = calibrate.HistogramCollector("percentile", True, 2048, 128, 99.999, "same")
    for data in passes:
        ours.collect_absolute_value({"t": data})
        theirs.collect_absolute_value({"t": data})
    (hist, edges, low, high), (hist_o, edges_o, low_o, high_o) = ours.histogram_dict["t"], theirs.histogram_dict["t"]
    assert len(edges) > 2048 and np.array_equal(edges, edges_o) and (low, high) == (low_o, high_o)
    # the same counts, each at most a bin away (ONNX Runtime's appended edges are not exactly uniform in float32)
    assert hist.sum() == hist_o.sum() and np.abs(np.cumsum(hist) - np.cumsum(hist_o)).max() <= 0.01 * hist.sum()
    width = float(edges[1] - edges[0])
    with contextlib.redirect_stdout(io.StringIO()):
        threshold, expected = ours.compute_collection_result()["t"][1], theirs.compute_collection_result()["t"][1]
    assert abs(float(threshold) - float(expected)) <= width


def test_a_tensor_between_two_nodes_kept_in_fp32_does_not_pass_through_fp16(tmp_path):
    """torchvision:resnet152 with random weights: onnxconverter-common cast a kept ReLU's output, read by two kept
    nodes, to fp16 and back, and 8e4 (above fp16's 65504, on an input larger than the calibration's) came out
    inf. Between kept nodes the tensor now stays fp32."""
    src = _large_logits_graph(tmp_path / "m.onnx", fan_out=True)
    calibration = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
    result = fp16_model(src, tmp_path / "m16.onnx", calibration, 16384.0, META)
    assert set(result.guard) == {"fc1", "relu", "fc2", "fc3", "add"}
    graph = onnx.load(str(tmp_path / "m16.onnx")).graph
    to_fp16 = [n.name for n in graph.node if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16]
    assert not to_fp16  # every node is kept in fp32: nothing passes through fp16
    larger = 20 * calibration  # activations far beyond 65504
    got, expected = run_onnx(tmp_path / "m16.onnx", larger), run_onnx(src, larger)
    assert np.isfinite(got).all() and np.abs(expected).max() > 1e6
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
