"""What a deployed model carries about itself: I/O names, preprocessing, classes, provenance.

The same record travels inside every ONNX file (``metadata_props``) and in the JSON sidecar of
every TensorRT engine, so an app can classify an image with nothing but the model file. This module
needs only the standard library: the edge runtime imports it without torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

INPUT_NAME = "input"
MAX_SIDE = 16384  # pixels of the model's input: twice what checkpoints allow (8192), as resize is 256/224 of it
MAX_CLASSES = 1 << 20  # as pipeline.artifacts.checkpoint's; this module stays free of the pipeline's imports
OUTPUT_NAME = "logits"
COLORS = ("rgb", "gray")
_REQUIRED = ("arch", "num_classes", "input_size", "mean", "std", "resize", "crop")
# The ``quantization`` text of a TensorRT-target INT8 model; files exported before ``int8_target`` was recorded
# are read as that target by it.
TENSORRT_INT8 = "int8 Q/DQ, symmetric, per-channel weights (TensorRT explicit quantization)"


class MetadataError(ValueError):
    """A model file that does not carry (valid) pipeline metadata."""


@dataclass(frozen=True)
class DeployMeta:
    """Everything needed to feed the model and name its outputs.

    Preprocessing follows the evaluation transform: for ``color == "gray"`` convert to grayscale (kept as
    three equal channels), resize the shorter side to ``resize``, center crop ``crop`` x ``crop``, scale to
    [0, 1], subtract ``mean`` and divide by ``std`` per channel.
    """

    arch: str
    num_classes: int
    input_size: int
    mean: list[float]
    std: list[float]
    resize: int
    crop: int
    class_names: list[str] = field(default_factory=list)
    recipe: str = ""
    color: str = "rgb"  # rgb | gray (the model was trained on grayscale images as three equal channels)
    precision: str = "fp32"
    quantization: str = ""  # how reduced precision was made (and for which backend), in words
    int8_target: str = ""  # an INT8 model's target (export.int8_target: tensorrt | cpu), which decides how it runs
    source_sha256: str = ""
    exporter: str = ""
    opset: int = 0
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME

    def to_props(self) -> dict[str, str]:
        """String key/value pairs for ONNX ``metadata_props`` (non-strings as JSON)."""
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in sorted(asdict(self).items())}

    @classmethod
    def from_props(cls, props: dict[str, str], where: str = "model") -> DeployMeta:
        kinds = {f.name: f.type for f in fields(cls)}
        missing = [name for name in _REQUIRED if name not in props]
        if missing:
            raise MetadataError(
                f"{where} has no pipeline metadata ({', '.join(missing)} missing); "
                "export it with `python -m pipeline run export`"
            )
        values: dict = {}
        for name, raw in props.items():
            if name not in kinds:
                continue  # keys from newer versions or other tools
            try:
                values[name] = raw if kinds[name] == "str" else json.loads(raw)
            except ValueError:
                raise MetadataError(f"{where} has malformed metadata {name}={raw!r}") from None
        legacy = not values.get("int8_target") and values.get("quantization") == TENSORRT_INT8
        if values.get("precision") == "int8" and legacy:  # exported before int8_target was recorded
            values["int8_target"] = "tensorrt"
        meta = cls(**values)
        problem = meta.problem()
        if problem:
            raise MetadataError(f"{where} has malformed metadata: {problem}")
        return meta

    def problem(self) -> str:
        """What makes this record unusable (a type, a size, a mismatch), or ``""``: a file's metadata is input."""

        def count(value, high: int = MAX_SIDE) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= high

        def three(value) -> bool:
            return (
                isinstance(value, list)
                and len(value) == 3
                and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            )

        for f in fields(self):
            if f.type == "str" and not isinstance(getattr(self, f.name), str):
                return f"{f.name} must be text"
        if not (count(self.num_classes, MAX_CLASSES) and count(self.input_size) and count(self.resize)):
            return f"num_classes, input_size and resize must be positive integers ({MAX_SIDE} px at most)"
        if not count(self.crop, self.resize) or not isinstance(self.opset, int):
            return f"crop must be a positive integer no larger than resize ({self.resize}), and opset an integer"
        if not three(self.mean) or not three(self.std) or min(self.std) <= 0:
            return f"normalization must be three finite numbers each, std positive (mean={self.mean}, std={self.std})"
        if self.color not in COLORS:
            return f"unknown color {self.color!r}; expected one of: {', '.join(COLORS)}"
        if not isinstance(self.class_names, list) or not all(isinstance(n, str) for n in self.class_names):
            return "class_names must be a list of names"
        if self.class_names and len(self.class_names) != self.num_classes:
            return f"it names {len(self.class_names)} classes but has {self.num_classes} outputs"
        return ""

    def class_name(self, index: int) -> str:
        return self.class_names[index] if index < len(self.class_names) else str(index)
