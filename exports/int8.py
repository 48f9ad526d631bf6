"""INT8 ONNX with explicit Q/DQ nodes, through ONNX Runtime's static quantization.

TensorRT 11 removed implicit INT8 calibration; an INT8 engine comes from an ONNX that already holds
QuantizeLinear/DequantizeLinear pairs. What TensorRT accepts (its "explicit quantization" rules)
decides the settings of the ``tensorrt`` target, which match the ONNX Runtime options NVIDIA's
ModelOpt passes for its own INT8 ONNX path:

* signed INT8, symmetric: every zero point is 0 (TensorRT has no asymmetric INT8);
* activations per tensor; weights per output channel (axis 0 of a Conv or transposed-B Gemm weight),
  kept in fp32 behind a Q/DQ pair so TensorRT quantizes them itself;
* Q/DQ on the inputs of Conv, Gemm, MatMul and Add (the residual input included), never on their
  outputs, and no INT32 bias quantization: TensorRT fuses the pattern into INT8 kernels.

The ``cpu`` target instead follows ONNX Runtime's x86 advice (asymmetric uint8 activations, every
supported op quantized), which ONNX Runtime's CPU kernels fuse; TensorRT does not accept it.

Calibration ranges are cached on disk under a key of the model's hash, the calibration set's hash,
both shapes, the quantization settings and how the images were split into calibration passes, so a
stale cache can never be picked up. The ranges are computed in memory-bounded passes
(:func:`exports.calibration.collect_ranges`) and ``quantize_static`` reads them from the cache.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from exports.calibration import calibration_method, collect_ranges, pass_rule
from exports.deps import require
from exports.errors import MissingDependencyError
from exports.metadata import INPUT_NAME, TENSORRT_INT8, DeployMeta
from exports.onnx_export import check_onnx, write_metadata
from pipeline.artifacts.atomic import atomic_write_text
from pipeline.artifacts.hashing import sha256_bytes, sha256_file, sha256_json
from pipeline.errors import UnsupportedModelError, one_line
from pipeline.registry import Registry

TENSORRT_OPS = ("Conv", "Gemm", "MatMul", "Add")
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class CalibrationKey:
    """Everything the calibration ranges depend on."""

    model_sha256: str
    data_sha256: str
    data_shape: tuple[int, ...]
    input_shape: tuple  # the model's declared input shape (symbolic dims as names)
    method: str
    target: str
    onnxruntime: str
    passes: str  # how the images were split into calibration passes (exports.calibration.pass_rule)

    @property
    def digest(self) -> str:
        return sha256_json(asdict(self))

    def to_dict(self) -> dict:
        return {**asdict(self), "digest": self.digest}


def calibration_key(model: str | Path, images: np.ndarray, method: str, target: str) -> CalibrationKey:
    onnx = require("onnx")
    ort = require("onnxruntime")
    graph = onnx.load(str(model), load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    images = np.ascontiguousarray(images, dtype=np.float32)
    return CalibrationKey(
        model_sha256=sha256_file(model),
        data_sha256=sha256_bytes(images.tobytes()),
        data_shape=tuple(images.shape),
        input_shape=tuple(d.dim_param or d.dim_value for d in dims),
        method=method,
        target=target,
        onnxruntime=ort.__version__,
        passes=pass_rule(),
    )


class CalibrationCache:
    """A folder of ``<digest>.json`` range files (ONNX Runtime's format), each with a ``.key.json``
    that records the full key and the range file's hash; an entry that fails either is discarded."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def ranges_path(self, key: CalibrationKey) -> Path:
        return self.folder / f"{key.digest}.json"

    def _key_path(self, key: CalibrationKey) -> Path:
        return self.folder / f"{key.digest}.key.json"

    def lookup(self, key: CalibrationKey) -> Path | None:
        """The verified range file for ``key``, or ``None`` (stale or damaged entries are removed)."""
        ranges, record = self.ranges_path(key), self._key_path(key)
        if not ranges.is_file():
            return None
        try:
            stored = json.loads(record.read_text())
            valid = stored.get("key") == _jsonable(key.to_dict()) and stored.get("sha256") == sha256_file(ranges)
        except (OSError, ValueError):
            valid = False
        if not valid:
            ranges.unlink(missing_ok=True)
            record.unlink(missing_ok=True)
            return None
        return ranges

    def record(self, key: CalibrationKey) -> None:
        """Seal a range file ONNX Runtime has just written for ``key``."""
        payload = {"key": _jsonable(key.to_dict()), "sha256": sha256_file(self.ranges_path(key))}
        atomic_write_text(self._key_path(key), json.dumps(payload, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Int8Result:
    key: CalibrationKey
    cache_hit: bool
    ranges: Path  # the cached range file that was used
    preprocess: str = ""  # how pre-processing fell back ('' when ONNX Runtime's full pre-processing ran)


def require_calibration_cache() -> None:
    quantization = require("onnxruntime.quantization")
    if "calibration_cache_path" not in inspect.signature(quantization.quantize_static).parameters:
        cause = RuntimeError("its quantize_static has no calibration cache")
        raise MissingDependencyError("onnxruntime>=1.27", None, cause)


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    images: np.ndarray,
    cache: CalibrationCache,
    meta: DeployMeta,
    method: str = "percentile",
    target: str = "tensorrt",
    input_name: str = INPUT_NAME,
) -> Int8Result:
    """Write the Q/DQ INT8 version of the fp32 ONNX ``src`` to ``dst``, calibrated on ``images``."""
    spec = INT8_TARGETS.get(target, "export.int8_target")
    quantization = require("onnxruntime.quantization")
    require_calibration_cache()
    calibrate = calibration_method(method)
    key = calibration_key(src, images, method, target)
    cached = cache.lookup(key)
    cache.folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        fallback = preprocess(src, prepared, meta.arch)
        options = spec.options(quantization, prepared)
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
            if not cached:
                op_types = options.get("op_types_to_quantize") or _all_quantizable_ops()
                ranges = collect_ranges(prepared, images, method, op_types, meta.arch, input_name)
                require("onnxruntime.quantization.calibrate").save_tensors_data(ranges, cache.ranges_path(key))
            quantization.quantize_static(  # reads the ranges from the cache
                str(prepared),
                str(dst),
                None,
                quant_format=quantization.QuantFormat.QDQ,
                per_channel=True,
                reduce_range=False,
                calibrate_method=calibrate,
                calibration_cache_path=str(cache.ranges_path(key)),
                **options,
            )
    if not cached:
        cache.record(key)
    write_metadata(dst, replace(meta, int8_target=spec.name))
    check_onnx(dst)
    return Int8Result(key, cached is not None, cache.ranges_path(key), fallback)


def _all_quantizable_ops() -> list[str]:
    """What ``quantize_static`` quantizes (and calibrates) when given no op types."""
    registry = require("onnxruntime.quantization.registry")
    return sorted(set(registry.QLinearOpsRegistry) | set(registry.QDQRegistry))


def preprocess(src: str | Path, dst: str | Path, model: str) -> str:
    """ONNX Runtime's quantization pre-processing of ``src`` into ``dst``; returns '' or how it fell back.

    Its symbolic shape inference gives up on some graphs ("Incomplete symbolic shape inference", as on timm's
    HRNet); the pre-processing then runs again with ONNX's own shape inference only, which is what quantization
    needs from it. Failing that too is an :class:`UnsupportedModelError` naming the model and both causes.
    ONNX Runtime writes what it inferred into the current folder when it gives up, so it runs in ``dst``'s.
    """
    shape_inference = require("onnxruntime.quantization.shape_inference")
    src, dst = Path(src).resolve(), Path(dst).resolve()
    with _working_folder(dst.parent):
        try:
            shape_inference.quant_pre_process(str(src), str(dst))
            return ""
        except (OSError, MemoryError):
            raise
        except Exception as exc:  # recorded in the report and the log, and retried below
            first = f"{type(exc).__name__}: {one_line(exc)}"
        try:
            shape_inference.quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        except (OSError, MemoryError):
            raise
        except Exception as exc:
            raise UnsupportedModelError(
                f"export: INT8 pre-processing of {model} failed: ONNX Runtime's symbolic shape inference "
                f"({first}), then with ONNX shape inference only ({type(exc).__name__}: {one_line(exc)}); "
                "export without int8 (--set 'export.precisions=[fp32,fp16]')"
            ) from exc
    return f"symbolic shape inference failed ({first}); pre-processed with ONNX shape inference only"


@contextlib.contextmanager
def _working_folder(folder: Path):
    """``contextlib.chdir`` (Python 3.11+) for Python 3.10."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _cpu_options(quantization, model: Path) -> dict:
    return {
        "activation_type": quantization.QuantType.QUInt8,
        "weight_type": quantization.QuantType.QInt8,
        "extra_options": {"WeightSymmetric": True},
    }


def _tensorrt_options(quantization, model: Path) -> dict:
    onnx = require("onnx")
    op_types = sorted({n.op_type for n in onnx.load(str(model), load_external_data=False).graph.node})
    return {
        "activation_type": quantization.QuantType.QInt8,
        "weight_type": quantization.QuantType.QInt8,
        "op_types_to_quantize": list(TENSORRT_OPS),
        "extra_options": {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
            "AddQDQPairToWeight": True,
            "DedicatedQDQPair": False,
            "ForceQuantizeNoInputCheck": True,
            "OpTypesToExcludeOutputQuantization": op_types,
            "QDQOpTypePerChannelSupportToAxis": {"Conv": 0},
            "QDQDisableWeightAdjustForInt32Bias": True,
        },
    }


@dataclass(frozen=True)
class Int8Target:
    """Who runs an INT8 model: its ONNX Runtime quantization options, and whether TensorRT builds it."""

    name: str
    description: str  # recorded in the model's metadata (``quantization``)
    options: Callable[[object, Path], dict]  # (onnxruntime.quantization, prepared model) -> quantize_static kwargs
    builds_engine: bool  # TensorRT accepts its Q/DQ nodes (checked by tensorrt_qdq_problems)


INT8_TARGETS: Registry[Int8Target] = Registry("INT8 target")
for _target in (
    Int8Target(
        "tensorrt",
        TENSORRT_INT8,
        _tensorrt_options,
        builds_engine=True,
    ),
    Int8Target("cpu", "int8 Q/DQ, uint8 activations (ONNX Runtime CPU; not for TensorRT)", _cpu_options, False),
):
    INT8_TARGETS.register(_target, name=_target.name)


def tensorrt_qdq_problems(path: str | Path) -> list[str]:
    """Why TensorRT's explicit quantization would reject the Q/DQ nodes of ``path`` (empty if none).

    Each Q/DQ node needs a positive finite scale and an INT8 zero point of 0; a per-channel scale is
    allowed only on a weight, along the output-channel axis of the op that consumes it.
    """
    onnx = require("onnx")
    numpy_helper = require("onnx.numpy_helper")
    graph = onnx.load(str(path)).graph
    tensors = {t.name: t for t in graph.initializer}  # made arrays only where read: the weights are most of a model
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None:
            tensors[node.output[0]] = value.t

    def array(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(tensors[name]) if name in tensors else None

    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    qdq = [node for node in graph.node if node.op_type in _QDQ]
    if not qdq:
        return ["the model has no QuantizeLinear/DequantizeLinear nodes"]
    problems = []
    for node in qdq:
        where = f"{node.op_type} {node.name or node.output[0]}"
        scale = array(node.input[1]) if len(node.input) > 1 else None
        zero = array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
            problems.append(f"{where}: scale must be a positive finite constant")
            continue
        if zero is None:
            problems.append(f"{where}: zero point missing (it would default to uint8)")
        elif zero.dtype != np.int8:
            problems.append(f"{where}: zero point is {zero.dtype}; TensorRT needs int8")
        elif np.any(zero != 0):
            problems.append(f"{where}: zero point is not 0; TensorRT quantization is symmetric")
        if scale.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            problem = _channel_axis_problem(node, axis, tensors, producers, consumers)
            if problem:
                problems.append(f"{where}: {problem}")
    return problems


def _channel_axis_problem(node, axis: int, tensors: dict, producers: dict, consumers: dict) -> str:
    weight = node.input[0]
    if weight not in tensors and weight in producers and producers[weight].op_type == "QuantizeLinear":
        weight = producers[weight].input[0]  # DQ of a Q/DQ pair on an fp32 weight
    if weight not in tensors:
        return "per-channel scale on an activation; TensorRT needs per-tensor activation scales"
    rank = len(tensors[weight].dims)
    dequantized = [node.output[0]]
    if node.op_type == "QuantizeLinear":
        dequantized = [dq.output[0] for dq, _ in consumers.get(node.output[0], []) if dq.op_type == "DequantizeLinear"]
    for name in dequantized:
        for user, index in consumers.get(name, []):
            expected = _output_channel_axis(user, rank)
            if expected is None or index != 1:
                return f"per-channel scale feeding input {index} of {user.op_type}; allowed only on a weight"
            if axis % rank != expected:
                return f"channel axis {axis}, but {user.op_type} needs axis {expected} (its output channels)"
    return ""


def _output_channel_axis(user, rank: int) -> int | None:
    if user.op_type == "Conv":
        return 0
    if user.op_type == "ConvTranspose":
        return 1
    if user.op_type == "Gemm":
        return 0 if next((a.i for a in user.attribute if a.name == "transB"), 0) else 1
    if user.op_type == "MatMul":
        return rank - 1
    return None


def _jsonable(data: dict) -> dict:
    return json.loads(json.dumps(data))


def copy_ranges(result: Int8Result, dst: str | Path) -> None:
    """Keep the ranges used (with their key) beside the INT8 model as a checked artifact."""
    payload = {"key": _jsonable(result.key.to_dict()), "cache_hit": result.cache_hit}
    payload["ranges"] = json.loads(Path(result.ranges).read_text())
    Path(dst).write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
