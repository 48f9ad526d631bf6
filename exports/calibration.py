"""Calibration data for ONNX Runtime's calibrators, and per-tensor activation ranges.

Both reduced precisions look at activations on real training images: INT8 to choose scales, fp16 to
find the nodes whose outputs would overflow. ONNX Runtime's calibrators already run a model with
every intermediate tensor exposed, so the ranges come from them rather than from hand-made graph
surgery.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from exports.deps import require
from exports.metadata import INPUT_NAME
from pipeline.registry import Registry

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


def activation_ranges(onnx_path: str | Path, images: np.ndarray, input_name: str = INPUT_NAME) -> dict[str, float]:
    """Largest ``|value|`` of every float tensor in the graph over ``images`` (min-max calibration)."""
    calibrate = require("onnxruntime.quantization.calibrate")
    with tempfile.TemporaryDirectory(prefix="ranges-") as tmp:
        calibrator = calibrate.create_calibrator(
            Path(onnx_path),
            None,
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=calibrate.CalibrationMethod.MinMax,
        )
        calibrator.collect_data(array_reader(images, input_name))
        ranges = calibrator.compute_data()
        del calibrator
    out = {}
    for name, data in ranges.data.items():
        low, high = (np.asarray(v, dtype=np.float64) for v in data.range_value)
        out[name] = float(np.max(np.abs(np.concatenate([low.ravel(), high.ravel()]))))
    return out
