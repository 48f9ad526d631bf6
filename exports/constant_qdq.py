"""A Q/DQ model with its constant quantization evaluated once, for ONNX Runtime at level "disabled".

A TensorRT-target INT8 model keeps its weights in fp32 behind a QuantizeLinear/DequantizeLinear pair
(``AddQDQPairToWeight``), and its CPU checks run it unoptimized (:func:`exports.runners.cpu_optimization`),
so every pass quantizes and dequantizes every weight again: torchvision's ViT-L/32 took 5.4 s a pass on one
core against 0.3 s with the pairs evaluated once (onnxruntime 1.32, Xeon, 2026-12-07). An engine builder folds them, and
so does this module, with ONNX Runtime's own kernels at the same level: the dequantized weights are bit for
bit what each pass computed, so the outputs are unchanged (tests/test_constant_qdq.py), and activations
stay fake-quantized as written.
"""

from __future__ import annotations

from pathlib import Path

from exports.deps import require
from exports.onnx_export import ONNX_FILE_LIMIT
from exports.runners import session_options

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def fold_constant_qdq(path: str | Path) -> tuple[bytes, int] | None:
    """The model at ``path``, serialized, with every Q/DQ node whose inputs are all constant replaced by its
    value, and the count of nodes folded; None where there is none to fold, or the result would not fit one
    protobuf message (the file is then run as it is)."""
    onnx = require("onnx")
    numpy_helper = require("onnx.numpy_helper")
    model = onnx.load(str(path))
    graph = model.graph
    constant = {t.name for t in graph.initializer}
    folded, kept = [], []
    for node in graph.node:  # topological order: a weight's Q comes before its DQ
        if node.op_type in QDQ_OPS and node.domain in ("", "ai.onnx") and all(i in constant for i in node.input if i):
            folded.append(node)
            constant.update(node.output)
        else:
            kept.append(node)
    if not folded:
        return None
    read = _names_read(kept) | {o.name for o in graph.output}
    wanted = [o for n in folded for o in n.output if o in read]
    values = _evaluate(model, folded, wanted)
    initializers = [t for t in graph.initializer if t.name in read]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend([*initializers, *(numpy_helper.from_array(values[name], name) for name in wanted)])
    if model.ByteSize() >= ONNX_FILE_LIMIT:
        return None
    return model.SerializeToString(), len(folded)


def _names_read(nodes) -> set[str]:
    """The tensors ``nodes`` read, those read inside their subgraphs (If, Loop, Scan) included."""
    names = set()
    for node in nodes:
        names.update(node.input)
        for attribute in node.attribute:
            for graph in (attribute.g, *attribute.graphs) if attribute.HasField("g") else attribute.graphs:
                names |= _names_read(graph.node)
    return names


def _evaluate(model, nodes: list, outputs: list[str]) -> dict:
    """``outputs`` of ``nodes`` (constant inputs only), computed by ONNX Runtime at level "disabled"."""
    helper = require("onnx.helper")
    ort = require("onnxruntime")
    needed = {i for n in nodes for i in n.input if i}
    weights = [t for t in model.graph.initializer if t.name in needed]
    types = _output_types(nodes, {t.name: t.data_type for t in weights})
    graph = helper.make_graph(
        nodes,
        "constant_qdq",
        inputs=[],
        outputs=[helper.make_tensor_value_info(name, types[name], None) for name in outputs],
        initializer=weights,
    )
    sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    session = ort.InferenceSession(
        sub.SerializeToString(), sess_options=session_options("disabled"), providers=["CPUExecutionProvider"]
    )
    return dict(zip(outputs, session.run(outputs, {}), strict=True))


def _output_types(nodes: list, known: dict[str, int]) -> dict[str, int]:
    """Each output's element type, as the operators define it: a DequantizeLinear's is its scale's; a
    QuantizeLinear's its zero point's, else its ``output_dtype``, else uint8."""
    onnx = require("onnx")
    types = dict(known)
    for node in nodes:
        if node.op_type == "DequantizeLinear":
            types[node.output[0]] = types[node.input[1]]
        else:
            dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
            zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
            types[node.output[0]] = types[zero_point] if zero_point else dtype or onnx.TensorProto.UINT8
    return types
