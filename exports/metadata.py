"""What a deployed model carries about itself: I/O names, preprocessing, classes, provenance.

The same record travels inside every ONNX file (``metadata_props``) and in the JSON sidecar of
every TensorRT engine, so an app can classify an image with nothing but the model file. This module
needs only the standard library: the edge runtime imports it without torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

INPUT_NAME = "input"
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
        if len(meta.mean) != 3 or len(meta.std) != 3 or min(meta.std) <= 0:
            raise MetadataError(f"{where} has malformed normalization (mean={meta.mean}, std={meta.std})")
        if meta.color not in COLORS:
            raise MetadataError(f"{where} has unknown color {meta.color!r}; expected one of: {', '.join(COLORS)}")
        if meta.class_names and len(meta.class_names) != meta.num_classes:
            raise MetadataError(f"{where} names {len(meta.class_names)} classes but has {meta.num_classes} outputs")
        return meta

    def class_name(self, index: int) -> str:
        return self.class_names[index] if index < len(self.class_names) else str(index)
