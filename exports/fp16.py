"""fp16 ONNX with an overflow guard, through onnxconverter-common.

TensorRT 11 has no fp16 builder flag: the ONNX itself must be fp16 and the network strongly typed.
The conversion keeps the model's inputs and outputs in fp32 (apps feed and read fp32) and keeps in
fp32 every node whose activations, measured in fp32 on calibration images, leave the fp16-safe
range; fp16 tops out at 65504, and a node that reaches a quarter of that on calibration data is
likely to overflow on some input outside it.
"""

from __future__ import annotations

import math
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from exports.calibration import activation_ranges
from exports.deps import require
from exports.metadata import INPUT_NAME, DeployMeta
from exports.onnx_export import check_onnx, set_metadata
from pipeline.artifacts.atomic import atomic_write

FP16_MAX = 65504.0
FP16_TINY = 2.0**-14  # fp16's smallest normal value; below it precision drops, below 2**-24 values become 0


def overflow_nodes(onnx_path: str | Path, ranges: dict[str, float], safe_max: float) -> list[str]:
    """Names of the nodes that read or write an activation whose largest ``|value|`` exceeds ``safe_max``
    (or is not finite): a node fed by such a tensor must stay fp32 too, or the cast into it overflows."""
    onnx = require("onnx")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    flagged = []
    for node in graph.node:
        peaks = [ranges[name] for name in (*node.input, *node.output) if name in ranges]
        if any(not math.isfinite(p) or p > safe_max for p in peaks):
            flagged.append(node.name)
    return flagged


@dataclass(frozen=True)
class Fp16Result:
    """Which nodes a conversion kept in fp32, and why."""

    guard: list[str]  # the overflow guard's: their activations leave the fp16-safe range
    converter: list[str] = field(default_factory=list)  # converting them made the converter write an invalid graph
    converter_errors: list[str] = field(default_factory=list)  # the checker's message behind each retry

    @property
    def kept(self) -> list[str]:
        return [*self.guard, *self.converter]


def convert_fp16(
    src: str | Path,
    dst: str | Path,
    calibration: np.ndarray | None,
    safe_max: float,
    meta: DeployMeta,
    input_name: str = INPUT_NAME,
) -> list[str]:
    """Write the fp16 version of ``src`` to ``dst``; returns every node kept in fp32 (:func:`fp16_model`)."""
    return fp16_model(src, dst, calibration, safe_max, meta, input_name).kept


def fp16_model(
    src: str | Path,
    dst: str | Path,
    calibration: np.ndarray | None,
    safe_max: float,
    meta: DeployMeta,
    input_name: str = INPUT_NAME,
) -> Fp16Result:
    """Write the fp16 version of ``src`` to ``dst``, valid by the full ONNX checker, or raise.

    ``calibration=None`` turns the overflow guard off (every convertible node becomes fp16). onnxconverter-common
    can write an invalid graph (a ``Cast`` to float of a bool tensor gets an fp16 output type, as in timm's
    EdgeNeXt); the nodes the checker names are then kept in fp32 and the conversion is retried, up to
    :data:`MAX_RETRIES` times. A graph that stays invalid, or an error that names no node, is an
    :class:`pipeline.errors.UnsupportedModelError` naming the model and the cause; ``dst`` is then not written.
    """
    onnx = require("onnx")
    from pipeline.errors import ConfigError, UnsupportedModelError, clipped

    if not 0 < safe_max <= FP16_MAX:
        raise ConfigError(f"export.fp16_safe_max must be in (0, {FP16_MAX:g}], got {safe_max:g}")
    guard = []
    if calibration is not None:
        guard = overflow_nodes(src, activation_ranges(src, calibration, input_name, meta.arch), safe_max)
    dst = Path(dst)
    partial = dst.with_name(dst.name + ".partial")
    converter: list[str] = []
    errors: list[str] = []
    try:
        for _ in range(MAX_RETRIES + 1):
            onnx.save(set_metadata(_converted(src, [*guard, *converter]), meta), str(partial))
            problem = invalid_graph(partial)
            if problem is None:
                with open(partial, "rb") as valid:
                    atomic_write(dst, lambda f: shutil.copyfileobj(valid, f))
                return Fp16Result(guard, converter, errors)
            errors.append(problem)
            named = [n for n in invalid_nodes(problem) if n not in guard and n not in converter]
            if not named:
                break
            converter.extend(named)
        raise UnsupportedModelError(
            f"export: fp16 conversion of {meta.arch} writes an invalid ONNX graph even with "
            f"{len(converter)} node(s) kept in fp32 ({clipped(errors[-1], 300)}); export without fp16 "
            "(--set 'export.precisions=[fp32,int8]')"
        )
    finally:
        partial.unlink(missing_ok=True)


MAX_RETRIES = 16  # conversions retried with more nodes kept in fp32


def _converted(src: str | Path, block: list[str]):
    onnx = require("onnx")
    float16 = require("onnxconverter_common.float16")
    model = onnx.load(str(src))
    # The dynamo exporter annotates initializers with value_info; onnxconverter-common then takes them for
    # fp16 activations and converts the weights of guarded nodes too. Initializers carry their own type.
    weights = {t.name for t in model.graph.initializer}
    kept_info = [v for v in model.graph.value_info if v.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept_info)
    fp32_outputs = [o.name for o in model.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    with warnings.catch_warnings():  # one warning per tiny weight rounded to fp16's smallest normal value
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, node_block_list=list(block), max_finite_val=FP16_MAX
        )
    return _fp32_outputs(_without_fp16_round_trips(converted, set(block)), fp32_outputs)


def _without_fp16_round_trips(model, kept: set[str]):
    """Feed a kept node's fp32 output straight to the fp32 nodes that read it.

    onnxconverter-common casts every output of a node kept in fp32 to fp16, and back to fp32 for each kept node
    that reads it: the round trip overflows at 65504 between two nodes the guard kept in fp32 for exactly that
    reason (torchvision's resnet152 with random weights: a ReLU output of 8e4 between two kept nodes became inf).
    Only the converter's casts are touched: a Cast to fp16 of a kept node's output or of a graph input (fp32,
    ``keep_io_types``), and the Casts to fp32 that read it.
    """
    onnx = require("onnx")
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    graph = model.graph
    fp32_sources = {out for node in graph.node if node.name in kept for out in node.output}
    fp32_sources |= {i.name for i in graph.input if i.type.tensor_type.elem_type == fp32}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}  # the output of a Cast back to fp32 -> the fp32 tensor it came from
    gone: set[str] = set()  # outputs of the Casts dropped
    for node in graph.node:
        if cast_to(node) != fp16 or node.input[0] not in fp32_sources:
            continue
        back = [r for r in readers.get(node.output[0], []) if cast_to(r) == fp32 and r.output[0] not in outputs]
        for cast in back:
            rename[cast.output[0]] = node.input[0]
        if back and len(back) == len(readers[node.output[0]]) and node.output[0] not in outputs:
            gone.add(node.output[0])
    if not rename:
        return model
    gone |= set(rename)
    remaining = [node for node in graph.node if not (node.op_type == "Cast" and node.output[0] in gone)]
    for node in remaining:
        for k, name in enumerate(node.input):
            node.input[k] = rename.get(name, name)
    del graph.node[:]
    graph.node.extend(remaining)
    info = [v for v in graph.value_info if v.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(info)
    return model


def _fp32_outputs(model, names: list[str]):
    """Give the graph outputs ``names`` back their fp32 type, which ``keep_io_types`` promises.

    onnxconverter-common breaks that promise when a node it keeps in fp32 writes a graph output: the Cast it
    appends after every kept node turns the output into fp16 (so logits of 1e7, which the guard kept fp32 for
    that reason, come out as inf; timm's mobileone_s1 with random weights). Such a Cast now casts to fp32.
    """
    onnx = require("onnx")
    helper = require("onnx.helper")
    producers = {out: node for node in model.graph.node for out in node.output}
    for output in model.graph.output:
        if output.name not in names or output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            continue
        node = producers.get(output.name)
        if node is not None and node.op_type == "Cast":  # the converter's Cast: cast to fp32 instead
            for attribute in node.attribute:
                if attribute.name == "to":
                    attribute.i = onnx.TensorProto.FLOAT
        elif node is not None:  # any other producer: an fp16 tensor, then a Cast to fp32 under the output's name
            inner = f"{output.name}_fp16"
            node.output[list(node.output).index(output.name)] = inner
            model.graph.node.append(
                helper.make_node("Cast", [inner], [output.name], name=f"{inner}_to_fp32", to=onnx.TensorProto.FLOAT)
            )
        output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return model


def invalid_graph(path: str | Path) -> str | None:
    """Why the full ONNX checker (shape and type inference included) refuses ``path``, or None."""
    onnx = require("onnx")
    try:
        check_onnx(path)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return " ".join(str(exc).split())
    return None


# How onnx names a node in its checker and inference errors.
_NODE_NAMES = (re.compile(r"node name: ([^)\s]+)\)"), re.compile(r"Bad node spec for node\. Name: (\S+)"))


def invalid_nodes(message: str) -> list[str]:
    """The node names in an ONNX checker or shape-inference message, in order, without repeats."""
    found = [m.group(1) for pattern in _NODE_NAMES for m in pattern.finditer(message)]
    return list(dict.fromkeys(found))
