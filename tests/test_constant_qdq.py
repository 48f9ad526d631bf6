"""Constant Q/DQ evaluated once (exports/constant_qdq.py): the INT8 model's checks run it faster, and its
outputs stay those of the file, bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from exports.constant_qdq import QDQ_OPS, fold_constant_qdq
from exports.int8 import CalibrationCache, quantize_int8
from exports.metadata import DeployMeta
from exports.onnx_export import export_onnx
from exports.runners import OnnxrtRunner, infer_array

SIZE = 16
META = DeployMeta(
    arch="random_mlp",
    num_classes=10,
    input_size=SIZE,
    mean=[0.5] * 3,
    std=[0.5] * 3,
    resize=SIZE,
    crop=SIZE,
    class_names=[str(k) for k in range(10)],
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random conv + MLP classifier (Conv and MatMul/Gemm weights, whose CPU kernels re-lay out constant
    weights) in fp32 and as TensorRT-target INT8."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(32 * (SIZE // 2) ** 2, 512),  # wide enough that a re-laid-out weight sums in another order
        nn.GELU(),
        nn.Linear(512, 10),
    )
    folder = tmp_path_factory.mktemp("constant_qdq")
    fp32 = export_onnx(model, folder / "model.onnx", SIZE, 18, dynamo=False, meta=META)
    images = np.random.default_rng(0).standard_normal((16, 3, SIZE, SIZE)).astype(np.float32)
    int8 = folder / "model.int8.onnx"
    quantize_int8(fp32, int8, images, CalibrationCache(folder / "cache"), META)
    return fp32, int8, images


def test_folding_keeps_the_outputs_of_the_file_bit_for_bit(models):
    _, int8, images = models
    model, folded = fold_constant_qdq(int8)
    graph = onnx.load(str(int8)).graph
    weights = {t.name for t in graph.initializer}
    on_weights = [n for n in graph.node if n.op_type in QDQ_OPS and n.input[0] in weights]
    assert len(on_weights) >= 4 and folded == 2 * len(on_weights)  # each weight's (and constant's) Q and DQ
    left = onnx.load_from_string(model).graph
    assert not any(n.op_type in QDQ_OPS and n.input[0] in {t.name for t in left.initializer} for n in left.node)
    assert any(n.op_type == "QuantizeLinear" for n in left.node)  # activations stay fake-quantized

    with (
        OnnxrtRunner(int8, optimization="disabled") as as_written,
        OnnxrtRunner(int8, optimization="disabled", model=model, prepack=False) as prepared,
    ):
        assert np.array_equal(infer_array(prepared, images), infer_array(as_written, images))


def test_a_model_without_constant_qdq_is_left_as_it_is(models):
    fp32, _, _ = models
    assert fold_constant_qdq(fp32) is None


def test_a_weight_read_inside_a_subgraph_is_kept(tmp_path):
    """An initializer read only by a node inside an If branch is still read: folding must not drop it."""
    weight = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")

    def branch(name: str, addend: str):
        out = helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, [4])
        return helper.make_graph([helper.make_node("Add", ["x", addend], [f"y_{name}"])], name, [], [out])

    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
            helper.make_node("If", ["c"], ["y"], then_branch=branch("then", "w"), else_branch=branch("else", "dq")),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[weight, scale, zero],
    )
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))
    folded, count = fold_constant_qdq(path)
    assert count == 2
    for condition in (True, False):
        feed = {"x": np.ones(4, np.float32), "c": np.array(condition)}
        with (
            OnnxrtRunner(path, optimization="disabled") as as_written,
            OnnxrtRunner(path, optimization="disabled", model=folded, prepack=False) as prepared,
        ):
            assert np.array_equal(prepared.infer(feed)["y"], as_written.infer(feed)["y"])
