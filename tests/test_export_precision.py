"""ONNX export and the reduced precisions on a small hand-built classifier: checker, metadata, dynamic
batch, provider assertion, the fp16 overflow guard, INT8 Q/DQ for TensorRT, the gates (with models
that must fail them), and calibration-cache invalidation.

The classifier is built by hand so that it is exact and decisive without training: class ``k`` is an
image whose channel ``k`` is brighter, and the network reads each channel's mean brightness. A
"broken" copy scales one channel of the first conv by ``s`` and the matching input of the second conv
by ``1/s``: the same function in fp32 (ReLU is positive-homogeneous), but one huge channel, which
per-tensor INT8 activations cannot represent together with the others, and which overflows fp16 when
``s`` is large enough.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from exports.calibration import activation_ranges
from exports.errors import ProviderError
from exports.fp16 import convert_fp16
from exports.int8 import CalibrationCache, calibration_key, quantize_int8, tensorrt_qdq_problems
from exports.metadata import DeployMeta, MetadataError
from exports.onnx_export import export_onnx, read_metadata
from exports.precisions import fp16_gate, int8_gate
from exports.runners import OnnxrtRunner, infer_array, run_onnx

pytestmark = pytest.mark.accuracy  # verdicts on trained or converted models (CI reruns these under AVX2)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
CLASSES = 3


class ChannelReader(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))).flatten(1))


@torch.no_grad()
def channel_reader() -> ChannelReader:
    """conv1 and conv2 copy channels 0..2 (centre tap), fc reads them: logits = mean ReLU brightness."""
    model = ChannelReader().eval()
    for k, conv in enumerate((model.conv1, model.conv2), start=1):
        conv.weight.zero_()
        conv.bias.zero_()
        conv.bias[3:] = 0.01 * k * torch.arange(1, 6)  # unread channels; distinct so no bias is deduplicated
        for c in range(3):
            conv.weight[c, c, 1, 1] = 1.0
    model.fc.weight.zero_()
    model.fc.bias.zero_()
    model.fc.weight[:, :3] = torch.eye(3)
    return model


@torch.no_grad()
def broken(model: ChannelReader, scale: float) -> ChannelReader:
    out = copy.deepcopy(model)
    out.conv1.weight[0] *= scale
    out.conv1.bias[0] *= scale
    out.conv2.weight[:, 0] /= scale
    return out


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    x = torch.randn(n, 3, SIZE, SIZE, generator=gen)
    x[torch.arange(n), labels] += 2.0
    return x.numpy(), labels.numpy()


META = DeployMeta(
    arch="channel_reader",
    num_classes=CLASSES,
    input_size=SIZE,
    mean=[0.0, 0.0, 0.0],
    std=[1.0, 1.0, 1.0],
    resize=SIZE,
    crop=SIZE,
    class_names=["red", "green", "blue"],
)


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    models = {"ok": channel_reader()}
    models["int8_broken"] = broken(models["ok"], 1e3)
    models["fp16_broken"] = broken(models["ok"], 1e6)
    return {name: export_onnx(m, folder / f"{name}.onnx", SIZE, 18, False, META) for name, m in models.items()}


@pytest.fixture(scope="module")
def data():
    calibration, _ = images(96, seed=1)
    test, labels = images(150, seed=2)
    return calibration, test, labels


def test_hand_built_model_is_exact(onnx_models, data):
    _, test, labels = data
    for name in ("ok", "int8_broken", "fp16_broken"):
        logits = run_onnx(onnx_models[name], test)
        assert (logits.argmax(1) == labels).all(), name


@pytest.mark.slow
def test_dynamo_export_has_fixed_names_dynamic_batch_and_metadata(tmp_path, data):
    _, test, _ = data
    path = export_onnx(channel_reader(), tmp_path / "m.onnx", SIZE, 18, True, META)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # self-contained: no external weight file
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert proto.opset_import[0].version == 18
    with OnnxrtRunner(path) as runner:
        for batch in (1, 5):
            assert infer_array(runner, test[:batch]).shape == (batch, CLASSES)
    meta = DeployMeta.from_props(read_metadata(path))
    assert meta == META
    assert meta.class_name(2) == "blue"


def test_metadata_errors_are_clear():
    with pytest.raises(MetadataError, match="no pipeline metadata"):
        DeployMeta.from_props({"arch": "x"})
    props = META.to_props()
    props["class_names"] = json.dumps(["a"])
    with pytest.raises(MetadataError, match="names 1 classes but has 3 outputs"):
        DeployMeta.from_props(props)


def test_session_refuses_a_provider_it_cannot_use(onnx_models):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider is available here; the refusal needs a machine without it")
    with pytest.raises(ProviderError, match="CUDAExecutionProvider is not available; available: .*CPU"):
        OnnxrtRunner(onnx_models["ok"], "CUDAExecutionProvider").activate()


def test_fp16_guard_keeps_overflowing_nodes_in_fp32(onnx_models, data, tmp_path):
    calibration, test, _ = data
    src = onnx_models["fp16_broken"]
    reference = run_onnx(src, test)

    kept = convert_fp16(src, tmp_path / "guarded.onnx", calibration, 16384.0, META)
    assert {"/conv1/Conv", "/conv2/Conv"} <= set(kept)  # the huge activation's producer and its consumer
    result = fp16_gate(reference, run_onnx(tmp_path / "guarded.onnx", test))
    assert result, [c.describe() for c in result.checks]

    assert convert_fp16(src, tmp_path / "unguarded.onnx", None, 16384.0, META) == []
    result = fp16_gate(reference, run_onnx(tmp_path / "unguarded.onnx", test))
    assert not result.checks[0], "without the guard the activation overflows fp16 and the cosine gate must fail"
    assert result.report["min_cosine"] == result.metrics["fp16_min_cosine"] < 0.999


def test_fp16_gate_names_logits_that_underflow_fp16():
    """timm:lcnetv2_small with random weights: activations shrink layer by layer to logits near 1e-20, which
    fp16 flushes to zero (cosine 0). A real limit of fp16, not a conversion error, and the failure says so.
    (Synthetic logits: ONNX Runtime's CPU provider computes many fp16 nodes in fp32, so a small graph need not
    show the underflow there, while an fp16 engine would.)"""
    rng = np.random.default_rng(0)
    reference = (1e-20 * rng.standard_normal((32, CLASSES))).astype(np.float32)
    result = fp16_gate(reference, np.zeros_like(reference))  # what fp16 makes of them
    cosine = result.checks[0]
    assert not cosine and "fp16 underflow" in cosine.detail and "smallest normal value 6.1e-05" in cosine.describe()
    inf = reference.copy()
    inf[3, 1] = np.inf
    assert "fp16 overflow: 1 sample(s) give inf/nan" in fp16_gate(reference * 1e20, inf * 1e20).checks[0].detail
    assert fp16_gate(reference * 1e20, reference * 1e20).checks[0].detail == ""  # a pass: nothing about ranges


def test_fp16_guard_keeps_guarded_weights_fp32_in_dynamo_graphs(data, tmp_path):
    """The dynamo exporter annotates weights with value_info, which must not make them fp16."""
    calibration, test, _ = data
    src = export_onnx(broken(channel_reader(), 1e6), tmp_path / "m.onnx", SIZE, 18, True, META)
    kept = convert_fp16(src, tmp_path / "m16.onnx", calibration, 16384.0, META)
    assert len(kept) == 3
    types = {t.name: t.data_type for t in onnx.load(str(tmp_path / "m16.onnx")).graph.initializer}
    assert types["conv1.weight"] == types["conv2.weight"] == onnx.TensorProto.FLOAT
    assert types["fc.weight"] == onnx.TensorProto.FLOAT16
    result = fp16_gate(run_onnx(src, test), run_onnx(tmp_path / "m16.onnx", test))
    assert result, [c.describe() for c in result.checks]


def test_fp16_of_a_normal_model_converts_everything(onnx_models, data, tmp_path):
    calibration, test, _ = data
    assert convert_fp16(onnx_models["ok"], tmp_path / "m.onnx", calibration, 16384.0, META) == []
    proto = onnx.load(str(tmp_path / "m.onnx"))
    weights = [t for t in proto.graph.initializer if t.name.endswith("weight")]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O kept
    assert DeployMeta.from_props(read_metadata(tmp_path / "m.onnx")) == META
    assert fp16_gate(run_onnx(onnx_models["ok"], test), run_onnx(tmp_path / "m.onnx", test))


def test_int8_gate_passes_the_normal_model_and_fails_the_broken_one(onnx_models, data, tmp_path):
    calibration, test, labels = data
    cache = CalibrationCache(tmp_path / "cache")
    verdicts = {}
    for name in ("ok", "int8_broken"):
        dst = tmp_path / f"{name}.int8.onnx"
        quantize_int8(onnx_models[name], dst, calibration, cache, META)
        assert tensorrt_qdq_problems(dst) == []
        result = int8_gate(run_onnx(onnx_models[name], test), run_onnx(dst, test), labels)
        assert result.metrics["fp32_top1"] == 100.0 and len(result.checks) == 1
        verdicts[name] = result.checks[0]
    assert verdicts["ok"], verdicts["ok"].describe()
    assert not verdicts["int8_broken"], "one huge channel crushes the others under per-tensor INT8 scales"
    assert verdicts["int8_broken"].value > 10


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_takes_any_number_of_images(onnx_models, data, tmp_path, method):
    """43 images (a prime count) cannot be cut into equal batches of more than one image."""
    calibration, test, labels = data
    dst = tmp_path / "m.int8.onnx"
    quantize_int8(onnx_models["ok"], dst, calibration[:43], CalibrationCache(tmp_path / "cache"), META, method)
    result = int8_gate(run_onnx(onnx_models["ok"], test), run_onnx(dst, test), labels)
    assert result, [c.describe() for c in result.checks]


def test_int8_for_tensorrt_is_symmetric_qdq_with_per_channel_weights(onnx_models, data, tmp_path):
    calibration, _, _ = data
    dst = tmp_path / "m.int8.onnx"
    quantize_int8(onnx_models["ok"], dst, calibration, CalibrationCache(tmp_path / "cache"), META)
    graph = onnx.load(str(dst)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") and ops.count("DequantizeLinear")
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    zero_points = [consts[n.input[2]] for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert all(z.dtype == np.int8 and not z.any() for z in zero_points)
    conv_weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and "conv1.weight" in n.input[0]]
    assert conv_weight_dq and consts[conv_weight_dq[0].input[1]].size == 8  # one scale per output channel
    assert DeployMeta.from_props(read_metadata(dst)) == replace(META, int8_target="tensorrt")  # the target recorded


def test_qdq_checker_names_what_tensorrt_rejects(onnx_models, data, tmp_path):
    calibration, _, _ = data
    cache = CalibrationCache(tmp_path / "cache")
    cpu = tmp_path / "cpu.onnx"
    quantize_int8(onnx_models["ok"], cpu, calibration, cache, META, target="cpu")
    assert DeployMeta.from_props(read_metadata(cpu)).int8_target == "cpu"
    assert any("uint8" in p for p in tensorrt_qdq_problems(cpu))

    trt = tmp_path / "trt.onnx"
    quantize_int8(onnx_models["ok"], trt, calibration, cache, META)
    proto = onnx.load(str(trt))
    per_channel = next(
        n for n in proto.graph.node if n.op_type == "QuantizeLinear" and any(a.name == "axis" for a in n.attribute)
    )
    next(a for a in per_channel.attribute if a.name == "axis").i = 1
    onnx.save(proto, str(tmp_path / "bad_axis.onnx"))
    assert any("channel axis 1, but Conv needs axis 0" in p for p in tensorrt_qdq_problems(tmp_path / "bad_axis.onnx"))
    assert tensorrt_qdq_problems(onnx_models["ok"]) == ["the model has no QuantizeLinear/DequantizeLinear nodes"]


def test_calibration_cache_is_keyed_and_never_silently_stale(onnx_models, data, tmp_path):
    calibration, _, _ = data
    cache = CalibrationCache(tmp_path / "cache")
    run = lambda src=onnx_models["ok"], imgs=calibration, **kw: quantize_int8(  # noqa: E731
        src, tmp_path / "out.onnx", imgs, cache, META, **kw
    )
    first = run()
    assert not first.cache_hit and first.ranges.is_file()
    assert run().cache_hit  # same model, same images, same shapes

    key = first.key
    assert calibration_key(onnx_models["int8_broken"], calibration, "percentile", "tensorrt").digest != key.digest
    assert calibration_key(onnx_models["ok"], calibration[:-1], "percentile", "tensorrt").digest != key.digest
    assert calibration_key(onnx_models["ok"], calibration[:, :, :8, :8], "percentile", "tensorrt").digest != key.digest
    assert calibration_key(onnx_models["ok"], calibration, "minmax", "tensorrt").digest != key.digest
    with pytest.MonkeyPatch.context() as patch:  # another split into calibration passes: other histogram bins
        patch.setattr("exports.calibration.PASS_MIB", 1)
        assert calibration_key(onnx_models["ok"], calibration, "percentile", "tensorrt").digest != key.digest
    changed = calibration.copy()
    changed[0, 0, 0, 0] += 1.0
    assert not run(imgs=changed).cache_hit  # one changed pixel is another calibration set
    assert not run(src=onnx_models["int8_broken"]).cache_hit  # another model

    # A damaged or hand-edited range file is discarded and recomputed, never used.
    ranges = first.ranges
    ranges.write_text(ranges.read_text().replace("0.", "9.", 1))
    assert cache.lookup(key) is None and not ranges.exists()
    again = run()
    assert not again.cache_hit and run().cache_hit


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_calibration_runs_in_passes_that_fit_the_memory_bound(onnx_models, data, tmp_path, monkeypatch, method):
    """ONNX Runtime's histogram calibrators keep every calibrated tensor of every image they are given: INT8
    calibration of 224 px transformers (timm's pit_ti_224, xcit_nano_12_p8_224, ...) ran out of memory. The
    images now go in passes sized to ``PASS_MIB`` of activations, each folded in before the next runs."""
    from onnxruntime.quantization import calibrate

    import exports.calibration as calibration_module

    calibration, test, labels = data
    per_image = 8 * SIZE * SIZE * 4 * 4  # the calibrated float tensors of one image: about four of 8 x 16 x 16
    monkeypatch.setattr(calibration_module, "PASS_MIB", 10 * per_image / 2**20)  # about ten images per pass
    seen: list[int] = []  # images per collect_data call, after which the histograms hold no activations
    original = calibrate.HistogramCalibrater.collect_data

    def counting(self, reader):
        fed = []

        class Counting:
            def get_next(self):
                feed = reader.get_next()
                fed.append(0 if feed is None else len(next(iter(feed.values()))))
                return feed

        original(self, Counting())
        seen.append(sum(fed))

    monkeypatch.setattr(calibrate.HistogramCalibrater, "collect_data", counting)
    dst = tmp_path / "m.int8.onnx"
    quantize_int8(onnx_models["ok"], dst, calibration, CalibrationCache(tmp_path / "cache"), META, method=method)
    assert sum(seen) == len(calibration) and len(seen) > 4 and max(seen) < 20, seen
    assert int8_gate(run_onnx(onnx_models["ok"], test), run_onnx(dst, test), labels)


def test_fp16_activation_ranges_run_in_bounded_passes_and_stay_exact(onnx_models, data, monkeypatch):
    """The min-max calibrator behind the fp16 guard keeps every tensor of a run alive too (ONNX Runtime runs
    its ReduceMin/ReduceMax nodes late): timm:xcit_nano_12_p8_224 took 24 GB for 32 images at 224 px. It runs
    in the same bounded passes; min and max merge exactly, so the ranges are those of one pass over all."""
    from onnxruntime.quantization import calibrate

    import exports.calibration as calibration_module

    calibration, _, _ = data
    whole = activation_ranges(onnx_models["fp16_broken"], calibration)
    monkeypatch.setattr(calibration_module, "PASS_MIB", 10 * 8 * SIZE * SIZE * 4 * 4 / 2**20)
    seen: list[int] = []
    original = calibrate.MinMaxCalibrater.collect_data

    def counting(self, reader):
        batches = []
        while (feed := reader.get_next()) is not None:
            batches.append(feed)
        seen.append(sum(len(next(iter(b.values()))) for b in batches))
        original(self, iter_reader(batches))

    monkeypatch.setattr(calibrate.MinMaxCalibrater, "collect_data", counting)
    passes = activation_ranges(onnx_models["fp16_broken"], calibration)
    assert sum(seen) == len(calibration) and len(seen) > 4 and max(seen) < 20, seen
    assert passes.keys() == whole.keys() and all(passes[k] == pytest.approx(whole[k]) for k in whole)
    assert max(whole.values()) > 1e5  # the broken channel is in them


def iter_reader(batches: list[dict]):
    class Reader:
        def get_next(self):
            return batches.pop(0) if batches else None

    return Reader()


def test_int8_sensitivity_tells_a_faithful_int8_graph_from_one_that_lost_channels(onnx_models, data, tmp_path):
    """benchmarks/int8_sensitivity.py: SQNR against fp32 of every quantized tensor in graph order, then the
    logits; the broken model's per-tensor scale, set by one huge channel, zeroes the channels fc reads."""
    spec = importlib.util.spec_from_file_location("int8_sensitivity", ROOT / "benchmarks" / "int8_sensitivity.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calibration, test, _ = data
    cache = CalibrationCache(tmp_path / "cache")
    logits = {}
    for name in ("ok", "int8_broken"):
        dst = tmp_path / f"{name}.int8.onnx"
        quantize_int8(onnx_models[name], dst, calibration, cache, META)
        rows = script.sensitivity(Path(onnx_models[name]), dst, [test[:64], test[64:]])
        assert rows[-1][:2] == ("logits", "output") and len(rows) > 2
        logits[name] = rows[-1][2]
    assert logits["ok"] > 25 > 10 > logits["int8_broken"], logits


def test_int8_sensitivity_reads_the_data_of_the_runs_export(tmp_path):
    spec = importlib.util.spec_from_file_location("int8_sensitivity", ROOT / "benchmarks" / "int8_sensitivity.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "export").mkdir()
    recorded = {"dataset": "synthetic", "num_classes": 7, "synthetic": {"train_size": 50, "test_size": 9, "seed": 4}}
    (tmp_path / "export" / "manifest.json").write_text(json.dumps({"params": {"data": recorded}}))
    data = script.run_data(tmp_path, None, [])
    assert (data.num_classes, data.synthetic.test_size, data.synthetic.seed) == (7, 9, 4)
    assert script.run_data(tmp_path, None, ["data.num_classes=3"]).num_classes == 3  # --set names other data
    assert script.run_data(tmp_path / "elsewhere", None, []).num_classes is None  # no manifest: the default preset's
