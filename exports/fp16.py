"""fp16 ONNX with an overflow guard, through onnxconverter-common.

TensorRT 11 has no fp16 builder flag: the ONNX itself must be fp16 and the network strongly typed.
The conversion keeps the model's inputs and outputs in fp32 (apps feed and read fp32) and keeps in
fp32 every node whose activations, measured in fp32 on calibration images, leave the fp16-safe
range; fp16 tops out at 65504, and a node that reaches a quarter of that on calibration data is
likely to overflow on some input outside it.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from exports.calibration import activation_ranges
from exports.deps import require
from exports.metadata import INPUT_NAME, DeployMeta
from exports.onnx_export import check_onnx, write_metadata

FP16_MAX = 65504.0


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


def convert_fp16(
    src: str | Path,
    dst: str | Path,
    calibration: np.ndarray | None,
    safe_max: float,
    meta: DeployMeta,
    input_name: str = INPUT_NAME,
) -> list[str]:
    """Write the fp16 version of ``src`` to ``dst``; returns the nodes kept in fp32 by the guard.

    ``calibration=None`` turns the guard off (every convertible node becomes fp16).
    """
    onnx = require("onnx")
    float16 = require("onnxconverter_common.float16")
    if not 0 < safe_max <= FP16_MAX:
        from pipeline.errors import ConfigError

        raise ConfigError(f"export.fp16_safe_max must be in (0, {FP16_MAX:g}], got {safe_max:g}")
    kept = []
    if calibration is not None:
        kept = overflow_nodes(src, activation_ranges(src, calibration, input_name), safe_max)
    model = onnx.load(str(src))
    # The dynamo exporter annotates initializers with value_info; onnxconverter-common then takes them for
    # fp16 activations and converts the weights of guarded nodes too. Initializers carry their own type.
    weights = {t.name for t in model.graph.initializer}
    kept_info = [v for v in model.graph.value_info if v.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept_info)
    with warnings.catch_warnings():  # one warning per tiny weight rounded to fp16's smallest normal value
        warnings.simplefilter("ignore", UserWarning)
        model = float16.convert_float_to_float16(
            model, keep_io_types=True, node_block_list=kept, max_finite_val=FP16_MAX
        )
    onnx.save(model, str(dst))
    write_metadata(dst, meta)
    check_onnx(dst)
    return kept
