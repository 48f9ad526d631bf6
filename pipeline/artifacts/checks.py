"""Numeric gates as data: every check records what was measured, against what, and the verdict.

The gate values of design §2 live in :data:`TOLERANCES`, the one place thresholds are defined; stages
read them from here and the manifests record them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

Op = Literal["<=", ">=", "=="]

TOLERANCES: dict[str, float] = {
    # fuse / verify, fp32 on CPU (TF32 off on GPU)
    "fuse.logits_max_abs": 1e-4,
    # ... plus this times max |trained logit|: float error grows with the magnitudes summed (random-weight
    # MobileOne reaches 1e12), and the relative Frobenius gate below stays unscaled
    "fuse.logits_rtol": 1e-5,
    "fuse.logits_rel_fro": 1e-5,
    "fuse.top1_agreement": 1.0,
    "fuse.block_max_abs": 1e-5,
    "fuse.block_rtol": 1e-5,  # ... plus this times max |mean of branches| (about 80 fp32 ulps of it)
    "fuse.top1_delta_pt": 0.01,
    # ONNX fp32 vs PyTorch on ORT CPU
    "onnx.fp32_max_abs": 1e-4,
    # ... plus this times max |PyTorch logit|: two runtimes' float32 sums over a deep random-weight network
    # (torchvision's wide_resnet101_2: logits in the thousands) differ by more than 1e-4 on logits near zero
    "onnx.fp32_scale_rtol": 1e-5,
    "onnx.fp32_rtol": 1e-3,
    "onnx.top1_agreement": 1.0,
    "onnx.batch_max_abs": 1e-5,
    "onnx.batch_rtol": 1e-5,  # ... plus this times max |logit|: batched and single kernels round differently
    # reduced precision
    "onnx.fp16_min_cosine": 0.999,
    "onnx.fp16_top1_agreement": 0.99,
    "onnx.fp16_overflow_nodes": 0.0,  # unguarded fp16 only: nodes whose calibration activations pass 65504
    "onnx.int8_top1_drop_pt": 1.0,
    # ... where fp32 is near chance (a drop is noise there), INT8 against fp32 instead: the drop's 1 point
    "onnx.int8_top1_agreement": 0.99,
    "onnx.int8_qdq_violations": 0.0,  # Q/DQ nodes TensorRT would reject (asymmetric, wrong axis, ...)
    # TensorRT vs golden outputs
    "trt.fp32_max_abs": 1e-3,
    "trt.int8_top1_agreement": 1.0,  # same class as ONNX Runtime on the same Q/DQ model, per golden sample
}


@dataclass(frozen=True)
class Floor:
    """A measured float-error level under which a ``<=`` gate cannot judge, and how it was measured."""

    value: float
    why: str


@dataclass(frozen=True)
class Check:
    """One gate: ``value op threshold``. Truthy when it passed."""

    name: str
    metric: str
    value: float
    threshold: float
    op: Op = "<="
    passed: bool = False
    detail: str = ""

    @classmethod
    def of(cls, name: str, metric: str, value: float, threshold: float, op: Op = "<=", detail: str = "") -> Check:
        value = float(value)
        if math.isnan(value):
            passed = False
        elif op == "<=":
            passed = value <= threshold
        elif op == ">=":
            passed = value >= threshold
        else:
            passed = value == threshold
        return cls(name, metric, value, float(threshold), op, passed, detail)

    @classmethod
    def gate(cls, name: str, metric: str, value: float, key: str, op: Op = "<=", detail: str = "") -> Check:
        """A check whose threshold is the named entry of :data:`TOLERANCES`."""
        return cls.of(name, metric, value, TOLERANCES[key], op, detail)

    @classmethod
    def scaled(
        cls,
        name: str,
        metric: str,
        value: float,
        atol_key: str,
        rtol_key: str,
        scale: float,
        floor: Floor | None = None,
    ) -> Check:
        """``value <= atol + rtol * scale``: an absolute bound on an error that grows with the reference's magnitude
        ``scale`` (its max abs), so a correct result with huge activations passes and a wrong one still fails.
        ``floor`` raises the bound to a measured float-error level where that is higher."""
        atol, rtol = TOLERANCES[atol_key], TOLERANCES[rtol_key]
        detail = f"(atol {atol:g} + rtol {rtol:g} x max |reference| {scale:.3g})"
        return cls.of(name, metric, value, atol + rtol * scale, "<=", detail).raised_to(floor)

    def raised_to(self, floor: Floor | None) -> Check:
        """This ``<=`` check with its threshold raised to ``floor.value`` where that is higher, saying so."""
        if floor is None or self.op != "<=" or not floor.value > self.threshold:
            return self
        detail = f"(float-error floor: {floor.why})"
        return Check.of(self.name, self.metric, self.value, floor.value, "<=", detail)

    def __bool__(self) -> bool:
        return self.passed

    def describe(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        text = f"{verdict} | {self.name}: {self.metric} = {self.value:.6g} (gate {self.op} {self.threshold:.6g})"
        return f"{text} {self.detail}".rstrip()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Check:
        return cls(**data)


@dataclass
class GateResult:
    """What a group of gates found: the checks, figures for the manifest, a section for the stage's report,
    and notes (e.g. why a gate could not be measured). Truthy when every check passed.

    Gates return one each and the stage merges them, instead of passing ``(checks, metrics, report)`` tuples.
    """

    checks: list[Check] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def merge(self, other: GateResult, section: str | None = None) -> GateResult:
        """Add ``other`` to this result; its report goes under ``section`` (merged with what is there) or,
        without one, into the top level. Returns ``self``, so merges chain."""
        self.checks += other.checks
        self.metrics.update(other.metrics)
        target = self.report if section is None else self.report.setdefault(section, {})
        target.update(other.report)
        self.notes += other.notes
        return self

    @property
    def note(self) -> str:
        return "; ".join(self.notes)

    def __bool__(self) -> bool:
        return all(self.checks)
