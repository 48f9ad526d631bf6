"""Calibration data for ONNX Runtime's calibrators, and per-tensor activation ranges.

Both reduced precisions look at activations on real training images: INT8 to choose scales, fp16 to
find the nodes whose outputs would overflow. ONNX Runtime's calibrators already run a model with
every intermediate tensor exposed, so the ranges come from them rather than from hand-made graph
surgery.

ONNX Runtime's histogram calibrators (percentile, entropy) keep every calibrated tensor of every image
they are given before they build their histograms: 512 images of a 224 px vision transformer are tens of
GB. :func:`collect_ranges` feeds them in passes whose activations fit :data:`PASS_MIB`, each folded into
the histograms before the next, and survives a tensor whose value range numpy cannot cut into bins.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exports.deps import require
from exports.metadata import INPUT_NAME
from exports.runners import default_threads, session_options
from pipeline.errors import UnsupportedModelError, out_of_memory
from pipeline.registry import Registry

PASS_IMAGES = 32  # images per calibration pass, at most ...
PASS_MIB = 1024  # ... and at most this much activation data (every calibrated tensor of its images)

# config name -> the member of ONNX Runtime's ``CalibrationMethod``
CALIBRATION_METHODS: Registry[str] = Registry("calibration method")
for _name, _member in (("percentile", "Percentile"), ("minmax", "MinMax"), ("entropy", "Entropy")):
    CALIBRATION_METHODS.register(_member, name=_name)


def calibration_method(name: str):
    """The ONNX Runtime ``CalibrationMethod`` for a config name."""
    member = CALIBRATION_METHODS.get(name)
    return getattr(require("onnxruntime.quantization.calibrate").CalibrationMethod, member)


def array_reader(images: np.ndarray, input_name: str = INPUT_NAME, batch: int = 32):
    """A ``CalibrationDataReader`` that feeds ``images`` in equal batches of at most ``batch``, in order.

    Equal, because ONNX Runtime's histogram calibrators (percentile, entropy) stack every batch's
    activations and fail on a shorter last batch; the batch is the largest divisor of the image count.
    """
    calibrate = require("onnxruntime.quantization.calibrate")
    batch = max(d for d in range(1, min(batch, len(images)) + 1) if len(images) % d == 0)

    class ArrayReader(calibrate.CalibrationDataReader):
        def __init__(self) -> None:
            self.start = 0

        def get_next(self) -> dict | None:
            if self.start >= len(images):
                return None
            feed = {input_name: np.ascontiguousarray(images[self.start : self.start + batch], dtype=np.float32)}
            self.start += batch
            return feed

        def __len__(self) -> int:
            return -(-len(images) // batch)

    return ArrayReader()


def activation_ranges(
    onnx_path: str | Path, images: np.ndarray, input_name: str = INPUT_NAME, name: str = "the model"
) -> dict[str, float]:
    """Largest ``|value|`` of every float tensor in the graph over ``images`` (min-max calibration, in the
    memory-bounded passes of :func:`collect_ranges`)."""
    ranges = collect_ranges(
        onnx_path,
        images,
        "minmax",
        None,
        name,
        input_name,
        what="measuring fp16 activation ranges",
        fixes="lower data.image_size or export.calibration_samples, or export without fp16",
    )
    out = {}
    for name, data in ranges.data.items():
        low, high = (np.asarray(v, dtype=np.float64) for v in data.range_value)
        out[name] = float(np.max(np.abs(np.concatenate([low.ravel(), high.ravel()]))))
    return out


def pass_rule() -> str:
    """How :func:`collect_ranges` splits the images, for the INT8 calibration cache key: a histogram's bins
    follow its first pass, so the split changes the ranges."""
    return f"passes of at most {PASS_IMAGES} images and {PASS_MIB} MiB of activations"


@dataclass(frozen=True)
class CalibrationPasses:
    """How :func:`collect_ranges` split the images: per-image activation size and images per pass."""

    image_mib: float  # the calibrated tensors of one image
    tensors: int
    images: int  # per pass


def _keep_to_our_cpus(calibrator) -> None:
    """Rebuild the calibrator's session with :func:`~exports.runners.default_threads` where the process is held
    to fewer CPUs than the machine has: ONNX Runtime's quantization tools build theirs with default options."""
    if not default_threads():
        return
    del calibrator.infer_session
    calibrator.infer_session = require("onnxruntime").InferenceSession(
        calibrator.augmented_model_path,
        sess_options=session_options("disabled"),  # the calibrator's own level
        providers=calibrator.execution_providers,
    )


def collect_ranges(
    model: str | Path,
    images: np.ndarray,
    method: str,
    op_types: list[str] | None,
    name: str,
    input_name: str = INPUT_NAME,
    what: str = "INT8 calibration",
    fixes: str = (
        "lower data.image_size, or use --set export.calibration_method=minmax (it keeps no activations between "
        "passes), or export without int8 (--set 'export.precisions=[fp32,fp16]')"
    ),
):
    """ONNX Runtime's ``TensorsData`` for ``model`` (pre-processed for quantization) on ``images``, as
    ``quantize_static`` would compute it with ``op_types_to_quantize=op_types``, in bounded passes.

    The pass size is measured on one image: ``PASS_MIB`` divided by the bytes of every calibrated tensor of
    that image, at most ``PASS_IMAGES``. The min-max calibrator needs the bound as much as the histogram
    ones: ONNX Runtime runs the ReduceMin/ReduceMax nodes it adds late, so every calibrated tensor of a pass
    is alive at once (timm's xcit_nano_12_p8_224: 380 MiB per 224 px image). Running out of memory even so,
    or a calibrated activation that is inf/nan in fp32, is an :class:`UnsupportedModelError` naming ``name``,
    ``what`` was being done and the ``fixes``.
    """
    calibrate = require("onnxruntime.quantization.calibrate")
    with tempfile.TemporaryDirectory(prefix="calibrate-") as tmp:
        calibrator = calibrate.create_calibrator(
            Path(model),
            op_types,
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=calibration_method(method),
        )
        _keep_to_our_cpus(calibrator)
        if isinstance(calibrator, calibrate.HistogramCalibrater):
            calibrator.collector = _robust_collector(calibrator, name)
        passes = None
        try:
            passes = _passes(calibrator, images[:1], input_name)
            for start in range(0, len(images), passes.images):
                calibrator.collect_data(array_reader(images[start : start + passes.images], input_name, passes.images))
            ranges = calibrator.compute_data()
        except Exception as exc:
            if not out_of_memory(exc):
                raise
            measured = (
                f"{passes.image_mib:.0f} MiB of activations per image in {passes.tensors} tensors, passes of "
                f"{passes.images} image(s)"
                if passes
                else "while measuring one image"
            )
            raise UnsupportedModelError(
                f"export: {what} of {name} ran out of memory ({measured}; {type(exc).__name__}); {fixes}"
            ) from exc
        finally:
            del calibrator
    return ranges


def _passes(calibrator, probe: np.ndarray, input_name: str) -> CalibrationPasses:
    calibrate = require("onnxruntime.quantization.calibrate")
    if isinstance(calibrator, calibrate.HistogramCalibrater):  # its session returns every calibrated tensor
        outputs = calibrator.infer_session.run(None, {input_name: np.ascontiguousarray(probe, dtype=np.float32)})
        per_image, tensors = sum(o.nbytes for o in outputs) // max(1, len(probe)), len(outputs)
    else:
        per_image, tensors = _minmax_image_bytes(calibrator)
    images = int(max(1, min(PASS_IMAGES, PASS_MIB * 2**20 // max(1, per_image))))
    return CalibrationPasses(per_image / 2**20, tensors, images)


def _minmax_image_bytes(calibrator) -> tuple[int, int]:
    """Bytes per image of the tensors a min-max run keeps alive (every calibrated one), from the shapes ONNX
    inferred when the calibrator loaded the model: a session returning them would cost a second model load. A
    tensor whose shape is not known counts as the mean of the known ones; with none known, passes of one image.
    """
    helper = require("onnx.helper")
    added = calibrator.infer_session.get_outputs()[calibrator.num_model_outputs :]
    names = {o.name.rsplit("_", 1)[0] for o in added}  # <tensor>_ReduceMin, <tensor>_ReduceMax
    graph = calibrator.model.graph
    infos = {v.name: v.type.tensor_type for v in (*graph.value_info, *graph.input, *graph.output)}
    sizes = []
    for name in names:
        info = infos.get(name)
        if info is not None and all(d.HasField("dim_value") for d in info.shape.dim[1:]):
            itemsize = helper.tensor_dtype_to_np_dtype(info.elem_type).itemsize
            sizes.append(int(np.prod([d.dim_value for d in info.shape.dim[1:]], dtype=np.int64)) * itemsize)
    if not sizes:
        return PASS_MIB * 2**20, len(names)
    return int(sum(sizes) / len(sizes) * len(names)), len(names)


def _finite(tensor: str, data, name: str) -> np.ndarray:
    """``data`` (a pass's arrays of ``tensor``) flat, or an :class:`UnsupportedModelError` if it holds inf/nan."""
    values = np.asarray(data).ravel()
    if not np.isfinite(values).all():
        raise UnsupportedModelError(
            f"export: INT8 calibration of {name} failed: activation {tensor!r} is inf/nan in fp32 on the "
            "calibration images, so it has no range to quantize; export without int8 "
            "(--set 'export.precisions=[fp32,fp16]')"
        ) from None
    return values


def _robust_collector(calibrator, name: str):
    """ONNX Runtime's ``HistogramCollector`` for ``calibrator``, made robust to two kinds of tensor.

    A tensor whose values span too narrow a range for their magnitude (timm's iformer_t and efficientvit_m0
    with random weights: an attention output of 0.5 +- 3e-5) makes numpy refuse to cut it into 2048 bins
    ("Too many bins for data range"); its first histogram then spans [0, peak] (or [-peak, peak]), which
    the percentile and entropy searches read the same way. A tensor with inf/nan values cannot be
    calibrated at all: an :class:`UnsupportedModelError` naming it. Later passes of the symmetric
    (percentile) collection are merged as ONNX Runtime merges them, with numpy's fast uniform-bin count.
    """
    calibrate = require("onnxruntime.quantization.calibrate")

    class RobustHistogramCollector(calibrate.HistogramCollector):
        def collect_absolute_value(self, name_to_arr):
            for tensor, data in name_to_arr.items():
                if tensor in self.histogram_dict:
                    self._merge_absolute(tensor, _finite(tensor, data, name))
                else:
                    self._first(super().collect_absolute_value, tensor, data, symmetric=True)

        def collect_value(self, name_to_arr):
            for tensor, data in name_to_arr.items():
                self._first(super().collect_value, tensor, data, symmetric=False)

        def _first(self, collect, tensor: str, data, symmetric: bool) -> None:
            try:
                collect({tensor: data})
                return
            except ValueError:
                if tensor in self.histogram_dict:
                    raise
            values = _finite(tensor, data, name)
            low, high = values.min(), values.max()
            # at least one float32 step per bin: numpy cannot cut a range of denormals into 2048 bins either
            peak = max(float(np.abs(values).max()), float(np.finfo(np.float32).tiny) * 4 * self.num_bins)
            if symmetric:
                hist, edges = np.histogram(np.abs(values), self.num_bins, range=(0.0, peak))
                self.histogram_dict[tensor] = (hist, edges.astype(values.dtype), low, high)
            else:
                threshold = np.array(peak, dtype=values.dtype)
                hist, edges = np.histogram(values, self.num_bins, range=(-threshold, threshold))
                self.histogram_dict[tensor] = (hist, edges, low, high, threshold)

        def _merge_absolute(self, tensor: str, values: np.ndarray) -> None:
            """ONNX Runtime's merge of a later pass (more bins of the same width where it reaches further),
            counted with uniform bins: numpy's histogram sorts the data for explicit edges, 4x slower."""
            old_hist, edges, old_low, old_high = self.histogram_dict[tensor]
            low, high = values.min(), values.max()
            values = np.abs(values)
            peak = values.max()
            if peak > edges[-1]:
                width = edges[1] - edges[0]
                edges = np.hstack((edges, np.arange(edges[-1] + width, peak + width, width))).astype(values.dtype)
            hist, _ = np.histogram(values, len(edges) - 1, range=(float(edges[0]), float(edges[-1])))
            hist[: len(old_hist)] += old_hist
            self.histogram_dict[tensor] = (hist, edges, min(old_low, low), max(old_high, high))

    return RobustHistogramCollector(
        method=calibrator.method,
        symmetric=calibrator.symmetric,
        num_bins=calibrator.num_bins,
        num_quantized_bins=calibrator.num_quantized_bins,
        percentile=calibrator.percentile,
        scenario=calibrator.scenario,
    )
