"""PyTorch -> ONNX with a dynamic batch axis, fixed I/O names and the model's metadata inside."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch

from exports.deps import require
from exports.errors import ModelTooLargeError
from exports.metadata import INPUT_NAME, OUTPUT_NAME, DeployMeta

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "check_onnx",
    "export_onnx",
    "exporter_name",
    "read_metadata",
    "set_metadata",
    "write_metadata",
]

MAX_BATCH = 4096  # upper bound of the dynamic batch dimension for the dynamo exporter
ONNX_FILE_LIMIT = 2**31  # protobuf's limit on one message: one self-contained .onnx holds at most 2 GiB


def check_fits_one_file(model: torch.nn.Module, name: str = "the model") -> None:
    """Refuse before exporting what protobuf cannot serialize: the exporters fail minutes later with
    ``EncodeError: Failed to serialize proto`` (torchvision's vit_h_14, 632 M parameters)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if weights >= ONNX_FILE_LIMIT:
        raise ModelTooLargeError(
            f"ONNX export of {name}: its weights are {weights / 2**30:.2f} GiB in fp32, over the 2 GiB one ONNX "
            "file holds (protobuf's limit); the export writes self-contained files, so models above about 500 M "
            "parameters cannot be exported: choose a smaller variant"
        )


def exporter_name(dynamo: bool) -> str:
    return f"torch.onnx.export(dynamo={dynamo}) torch {torch.__version__}"


def export_onnx(
    model: torch.nn.Module, path: str | Path, input_size: int, opset: int, dynamo: bool, meta: DeployMeta | None = None
) -> Path:
    """Export ``model`` (eval mode, fp32) to ``path`` and run the full ONNX checker on the result.

    ``dynamo`` and ``opset`` are passed explicitly: the default exporter changed in torch 2.9, and
    both decide what graph TensorRT later parses.
    """
    if dynamo:
        require("onnxscript")
    path = Path(path)
    model = model.eval().float().cpu()
    check_fits_one_file(model, meta.arch if meta is not None else "the model")
    example = (torch.zeros(2, 3, input_size, input_size),)
    kwargs: dict = {
        "input_names": [INPUT_NAME],
        "output_names": [OUTPUT_NAME],
        "opset_version": opset,
        "dynamo": dynamo,
    }
    if dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)
        kwargs["verbose"] = False
        kwargs["external_data"] = False  # one self-contained file (students are far below protobuf's 2 GB)
    else:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:  # the metadata goes in before the one write: loading and saving again cost ViT-L about 4 s
            program = torch.onnx.export(model, example, None, **kwargs)
            if meta is not None:
                program.model.metadata_props.clear()
                program.model.metadata_props.update(meta.to_props())
            program.save(str(path), external_data=False)
        else:
            torch.onnx.export(model, example, str(path), **kwargs)
            if meta is not None:
                write_metadata(path, meta)
    check_onnx(path)
    return path


def write_metadata(path: str | Path, meta: DeployMeta) -> None:
    """Replace the file's ``metadata_props`` with ``meta`` (other tools' keys are dropped)."""
    onnx = require("onnx")
    proto = set_metadata(onnx.load(str(path)), meta)
    onnx.save(proto, str(path))


def set_metadata(proto, meta: DeployMeta):
    """``proto`` (a ``ModelProto``) with its ``metadata_props`` replaced by ``meta``."""
    del proto.metadata_props[:]
    for key, value in meta.to_props().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto


def check_onnx(path: str | Path) -> None:
    """``onnx.checker`` with ``full_check`` (shape inference included), on the file so large models work."""
    onnx = require("onnx")
    onnx.checker.check_model(str(path), full_check=True)


def read_metadata(path: str | Path) -> dict[str, str]:
    onnx = require("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
