"""The precision and INT8-target registries (exports.precisions, exports.int8) and the gate result object."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from exports.int8 import INT8_TARGETS
from exports.precisions import GOLDEN_OUTPUTS, PRECISIONS, int8_gate
from exports.trt_commands import golden_outputs_name, polygraphy_checks
from pipeline.artifacts.checks import Check, GateResult
from pipeline.artifacts.code_version import PROJECT_PACKAGES
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.precision_order import PRECISION_ORDER as ORDER
from pipeline.precision_order import REFERENCE_PRECISION
from stages.support.deployment import ONNX_FILES


def test_gate_results_merge_into_sections():
    ok, bad = Check.of("a", "m", 1.0, 2.0), Check.of("b", "m", 3.0, 2.0)
    total = GateResult([ok], {"x": 1}, {"top": 1})
    assert total
    merged = total.merge(GateResult([bad], {"y": 2}, {"k": 1}, ["first"]), section="fp16")
    assert merged is total and not total
    total.merge(GateResult(report={"k2": 2}, notes=["second"]), section="fp16").merge(GateResult(report={"z": 0}))
    assert total.checks == [ok, bad] and total.metrics == {"x": 1, "y": 2}
    assert total.report == {"top": 1, "fp16": {"k": 1, "k2": 2}, "z": 0}
    assert total.note == "first; second"


def test_every_precision_is_complete_and_the_file_names_come_from_the_registry():
    assert set(PRECISIONS.names()) == set(ORDER) and ORDER[0] == REFERENCE_PRECISION
    assert {name: PRECISIONS.get(name).onnx_file for name in ORDER} == ONNX_FILES
    assert len(set(ONNX_FILES.values())) == len(ORDER)
    for name in ORDER:
        spec = PRECISIONS.get(name)
        assert spec.name == name and spec.polygraphy_compare
        assert (spec.convert is None) == (spec.onnx_gate is None) == (name == REFERENCE_PRECISION)
        assert golden_outputs_name(name) == spec.golden_outputs
        assert [cmd[-len(c) :] for cmd, c in zip(polygraphy_checks(name), spec.polygraphy_compare)] == [
            list(c) for c in spec.polygraphy_compare
        ]
    assert PRECISIONS.get("fp32").golden_outputs == PRECISIONS.get("fp16").golden_outputs == GOLDEN_OUTPUTS
    assert PRECISIONS.get("int8").golden_outputs != GOLDEN_OUTPUTS


@pytest.mark.parametrize(
    "lookup, message",
    [
        (lambda: PRECISIONS.get("int4"), "unknown export precision 'int4'; choose one of: fp16, fp32, int8"),
        (lambda: PRECISIONS.get("bf16", "engine.precision"), "unknown engine.precision 'bf16'; choose one of: fp16"),
        (lambda: INT8_TARGETS.get("gpu", "export.int8_target"), "unknown export.int8_target 'gpu'; choose one of: cpu"),
        (lambda: PRECISIONS.get(["fp32"]), r"unknown export precision \['fp32'\]"),  # a list from a config file
    ],
)
def test_unknown_names_are_config_errors_from_the_registries(lookup, message):
    with pytest.raises(ConfigError, match=message):
        lookup()


def test_only_a_tensorrt_int8_target_builds_an_engine():
    export = Config().export
    for precision in ("fp32", "fp16"):
        assert PRECISIONS.get(precision).why_no_engine(export) == ""
    int8 = PRECISIONS.get("int8")
    export.int8_target = "tensorrt"
    assert int8.why_no_engine(export) == "" and int8.engine_accuracy_gate
    export.int8_target = "cpu"
    assert "uint8 activations, which TensorRT does not accept" in int8.why_no_engine(export)
    assert [t for t in INT8_TARGETS if INT8_TARGETS.get(t).builds_engine] == ["tensorrt"]


def test_int8_targets_choose_their_activation_type(tmp_path):
    import onnx
    import onnxruntime.quantization as quantization
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    cpu = INT8_TARGETS.get("cpu").options(quantization, tmp_path / "m.onnx")
    trt = INT8_TARGETS.get("tensorrt").options(quantization, tmp_path / "m.onnx")
    assert cpu["activation_type"] == quantization.QuantType.QUInt8
    assert trt["activation_type"] == quantization.QuantType.QInt8 and trt["extra_options"]["ActivationSymmetric"]
    assert trt["extra_options"]["OpTypesToExcludeOutputQuantization"] == ["Relu"]


def test_an_int8_gate_without_fitting_labels_is_skipped_with_a_note():
    logits = np.eye(3, dtype=np.float32)
    skipped = int8_gate(logits, logits, np.arange(3), "dataset x has 10 classes, the model 3")
    assert skipped.checks == [] and skipped.metrics == {"int8_gate": "skipped"}
    assert skipped.note.startswith("int8 accuracy gate skipped: dataset x has 10 classes")
    measured = int8_gate(logits, logits, np.arange(3))
    assert [c.name for c in measured.checks] == ["onnx_int8_top1_drop"] and measured.metrics["int8_top1_drop_pt"] == 0


def test_calibration_methods_come_from_a_registry():
    import onnxruntime.quantization.calibrate as calibrate

    from exports.calibration import CALIBRATION_METHODS, calibration_method

    assert calibration_method("minmax") == calibrate.CalibrationMethod.MinMax
    assert {calibration_method(n) for n in CALIBRATION_METHODS} == {
        calibrate.CalibrationMethod.MinMax,
        calibrate.CalibrationMethod.Entropy,
        calibrate.CalibrationMethod.Percentile,
    }
    with pytest.raises(ConfigError, match="unknown calibration method 'histogram'; choose one of: entropy, minmax"):
        calibration_method("histogram")


def _precision_lists(source: Path) -> list[int]:
    """Lines of tuple, list or set literals made of two or more precision names: an order written out again."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source)))
        if isinstance(node, ast.Tuple | ast.List | ast.Set)
        and len(node.elts) >= 2
        and all(isinstance(e, ast.Constant) and e.value in ORDER for e in node.elts)
    ]


def test_the_precision_order_is_written_once(tmp_path):
    root = Path(__file__).resolve().parents[1]
    lists = {
        path.relative_to(root).as_posix(): lines
        for package in PROJECT_PACKAGES
        for path in sorted((root / package).rglob("*.py"))
        if (lines := _precision_lists(path))
    }
    assert not lists, f"name the order as pipeline.precision_order.PRECISION_ORDER: {lists}"
    (tmp_path / "copy.py").write_text('NAMES = ["fp32", "fp16"]\n')
    assert _precision_lists(tmp_path / "copy.py") == [1]  # the rule sees a copy


def test_a_precision_registered_but_not_in_the_order_is_refused(monkeypatch):
    from stages.export import validate_export

    monkeypatch.setitem(PRECISIONS._items, "fp16_full", PRECISIONS.get("fp16"))
    cfg = Config()
    cfg.export.precisions = ["fp32", "fp16_full"]
    with pytest.raises(ConfigError, match=r"'fp16_full' is registered but not in PRECISION_ORDER"):
        validate_export(cfg)
    cfg.export.precisions = ["fp32", "fp16"]
    validate_export(cfg)
