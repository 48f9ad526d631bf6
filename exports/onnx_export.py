"""PyTorch -> ONNX with a dynamic batch axis, fixed I/O names and the model's metadata inside."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import torch

from exports.deps import require

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    input_size: int,
    opset: int,
    dynamo: bool,
    metadata: dict[str, object] | None = None,
) -> Path:
    """Export ``model`` (eval mode, fp32) to ``path`` and run the full ONNX checker on the result."""
    onnx = require("onnx")
    if dynamo:
        require("onnxscript")
    path = Path(path)
    model = model.eval().float().cpu()
    example = (torch.zeros(2, 3, input_size, input_size),)
    kwargs: dict = {
        "input_names": [INPUT_NAME],
        "output_names": [OUTPUT_NAME],
        "opset_version": opset,
        "dynamo": dynamo,
    }
    if dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
        kwargs["verbose"] = False
    else:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), **kwargs)
    proto = onnx.load(str(path))
    for key, value in sorted((metadata or {}).items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    onnx = require("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
