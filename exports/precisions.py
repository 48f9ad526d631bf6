"""The export precisions as a registry: everything the export and engine stages choose by precision name.

Each :class:`Precision` holds its file name, how it is made from the fp32 ONNX (``convert``), its gate
against fp32 in ONNX Runtime (``onnx_gate``), which golden outputs its engine is held to and that
engine's gate (``engine_gate``), and the Polygraphy comparison ``build_engine.sh`` runs on the target.
Adding a precision is one entry here; the stages loop over the registry instead of branching on names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from exports.calibration import activation_ranges
from exports.fp16 import FP16_MAX, FP16_TINY, fp16_model, overflow_nodes
from exports.int8 import INT8_TARGETS, CalibrationCache, copy_ranges, quantize_int8, tensorrt_qdq_problems
from exports.metadata import INPUT_NAME, OUTPUT_NAME, DeployMeta
from pipeline.artifacts.checks import TOLERANCES, Check, GateResult
from pipeline.compare import diff_stats, near_chance, tie_detail, tie_figures, top1_accuracy
from pipeline.precision_order import REFERENCE_PRECISION
from pipeline.registry import Registry
from pipeline.stage_files import CALIBRATION_RANGES

GOLDEN_OUTPUTS = "golden_outputs.json"
_TOP1 = ("--postprocess", f"{OUTPUT_NAME}:top-1", "--compare", "indices")


@dataclass(frozen=True)
class Conversion:
    """What a converter gets: the fp32 ONNX, where to write, calibration images and the run's settings."""

    fp32: Path
    dst: Path
    calibration: np.ndarray
    settings: Any  # the run's export settings (pipeline.config.ExportConfig)
    cache_dir: Path  # INT8 calibration ranges are cached here
    meta: Callable[[str, str], DeployMeta]  # (precision, how it was quantized) -> the file's metadata
    log: Callable[[str], None] = print


@dataclass(frozen=True)
class Precision:
    name: str
    onnx_file: str
    engine_gate: Callable[[dict], list[Check]]  # diff_stats of the engine against its golden outputs
    polygraphy_compare: tuple[tuple[str, ...], ...]  # one ``polygraphy run`` per entry: its comparison options
    convert: Callable[[Conversion], GateResult] | None = None  # None: exported from the model itself (fp32)
    onnx_gate: Callable[..., GateResult] | None = None  # (fp32 logits, its logits, labels, mismatch) on the eval set
    golden_from_onnx: bool = False  # its engine's reference is ONNX Runtime on this file, not PyTorch fp32
    why_no_engine: Callable[[Any], str] = lambda settings: ""  # why TensorRT cannot build it ('' when it can)
    engine_accuracy_gate: bool = False  # its engine is also scored on the labelled evaluation set

    @property
    def golden_outputs(self) -> str:
        return f"golden_outputs_{self.name}.json" if self.golden_from_onnx else GOLDEN_OUTPUTS


PRECISIONS: Registry[Precision] = Registry("export precision")


def fp16_gate(
    reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None, mismatch: str = ""
) -> GateResult:
    """fp16 against fp32 on the same images: cosine per sample (min over the set) and top-1 agreement,
    tie-aware (:func:`pipeline.compare.diff_stats`): a flip between classes tied within fp16's error is no
    disagreement; the strict figure and the ties excused are in the metrics. A failed cosine names the cause
    when the logits show it (:func:`fp16_range_problem`)."""
    stats = diff_stats(reference, candidate)
    cosine = Check.gate(
        "onnx_fp16_min_cosine", "min per-sample cosine vs fp32", stats["min_cosine"], "onnx.fp16_min_cosine", ">="
    )
    if not cosine:
        cosine = replace(cosine, detail=fp16_range_problem(reference, candidate))
    checks = [
        cosine,
        Check.gate(
            "onnx_fp16_top1_agreement",
            "fraction of equal argmax vs fp32, near-ties excused",
            stats["top1_agreement"],
            "onnx.fp16_top1_agreement",
            ">=",
            detail=tie_detail(stats),
        ),
    ]
    return GateResult(checks, {"fp16_min_cosine": stats["min_cosine"], **tie_figures(stats, "fp16")}, stats)


def fp16_range_problem(reference: np.ndarray, candidate: np.ndarray) -> str:
    """Why fp16 cannot carry these logits, where they show it ('' when they do not): fp32 logits whose peak
    is below fp16's smallest normal value underflow (untrained weights can shrink activations layer by layer,
    as timm's lcnetv2_small with random weights reaches 1e-20), fp16 logits that are inf/nan overflowed."""
    peak = float(np.max(np.abs(reference), initial=0.0))
    if 0.0 < peak < FP16_TINY:
        return (
            f"(fp16 underflow: the fp32 logits peak at |x| = {peak:.3g}, below fp16's smallest normal value "
            f"{FP16_TINY:.3g}; a real limit of fp16 for this model, not a conversion error)"
        )
    broken = int((~np.isfinite(candidate)).any(axis=tuple(range(1, candidate.ndim))).sum()) if candidate.size else 0
    if broken:
        return (
            f"(fp16 overflow: {broken} sample(s) give inf/nan fp16 logits, so some fp16 tensor passed {FP16_MAX:g} "
            "on them; the overflow guard's calibration images did not show it)"
        )
    return ""


def int8_gate(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray, mismatch: str = "") -> GateResult:
    """INT8 top-1 accuracy drop against fp32, in points, on labelled images. When the run's labels do not fit
    the model (``mismatch`` says why) the gate is recorded as skipped, not passed. The report's ``vs_fp32``
    holds the comparison with fp32, with the tie-aware top-1 agreement and its figures
    (:data:`pipeline.compare.TIE_FIGURES`): they inform, the verdict stays label-based.

    Where fp32 itself is near chance (:func:`pipeline.compare.near_chance`: untrained weights, as in the
    support matrix), a top-1 drop against the labels is noise (timm:lcnet_035 with random weights "dropped"
    1.56 points, 5.27% to 3.71%): the drop gate is recorded as skipped with that reason, and INT8 is judged by
    its tie-aware top-1 agreement with fp32 (``onnx.int8_top1_agreement``) instead."""
    stats = diff_stats(reference, candidate)
    report = {"vs_fp32": stats}
    if mismatch:
        note = f"int8 accuracy gate skipped: {mismatch}, so the test labels cannot score the model"
        return GateResult(
            metrics={"int8_gate": "skipped"}, report={**report, "accuracy_gate": f"skipped: {note}"}, notes=[note]
        )
    acc32, acc8 = top1_accuracy(reference, labels), top1_accuracy(candidate, labels)
    chance = near_chance(acc32, reference.shape[1])
    if chance:
        note = f"int8 accuracy gate skipped: {chance}, where a top-1 drop is noise; judged by agreement with fp32"
        check = Check.gate(
            "onnx_int8_top1_agreement",
            "fraction of equal argmax vs fp32, near-ties excused",
            stats["top1_agreement"],
            "onnx.int8_top1_agreement",
            ">=",
            detail=tie_detail(stats),
        )
        figures = {"fp32_top1": acc32, "int8_top1": acc8}  # for the report (and the engine stage), not a verdict
        return GateResult(
            [check],
            {"int8_gate": "skipped", **tie_figures(stats, "int8")},
            {**report, **figures, "accuracy_gate": f"skipped: {note}"},
            notes=[note],
        )
    check = Check.gate(
        "onnx_int8_top1_drop",
        "top-1 fp32 - top-1 int8 (pt)",
        acc32 - acc8,
        "onnx.int8_top1_drop_pt",
        detail=f"fp32 {acc32:.2f}%, int8 {acc8:.2f}%",
    )
    figures = {"fp32_top1": acc32, "int8_top1": acc8, "int8_top1_drop_pt": acc32 - acc8}
    return GateResult([check], dict(figures), {**report, **figures})


def convert_to_fp16(job: Conversion) -> GateResult:
    """fp16 ONNX; without the overflow guard, a gate on the nodes whose fp32 activations on the calibration
    images leave fp16's range. The output gate cannot see such an overflow on a CPU: ONNX Runtime's x86
    provider computes fp16 nodes in fp32, while an fp16 engine stores those activations in fp16 (as inf)."""
    s = job.settings
    guard = f"overflow guard: nodes above |x| > {s.fp16_safe_max:g} kept fp32"
    quantization = "fp16 via onnxconverter-common, fp32 I/O, " + (guard if s.fp16_guard else "no guard")
    calibration = job.calibration if s.fp16_guard else None
    made = fp16_model(job.fp32, job.dst, calibration, s.fp16_safe_max, job.meta("fp16", quantization))
    kept, fallback = made.guard, made.converter
    also = f"; {len(fallback)} where the converter wrote an invalid graph: {', '.join(fallback)}" if fallback else ""
    job.log(f"[export] wrote {job.dst.name} ({len(kept)} nodes kept in fp32 by the overflow guard{also})")
    out = GateResult(metrics={"fp16_nodes_kept_fp32": len(kept)}, report={"guard": s.fp16_guard, "kept_fp32": kept})
    if fallback:  # nodes onnxconverter-common could not convert into a valid graph (exports.fp16.fp16_model)
        out.metrics["fp16_nodes_kept_fp32_converter"] = len(fallback)
        out.report["kept_fp32_converter"] = fallback
        out.report["converter_errors"] = made.converter_errors
    if not s.fp16_guard:
        over = overflow_nodes(job.fp32, activation_ranges(job.fp32, job.calibration, INPUT_NAME), FP16_MAX)
        out.report["overflow_nodes"] = over
        out.checks.append(
            Check.gate(
                "onnx_fp16_range",
                f"fp16 nodes whose activations exceed {FP16_MAX:g} on calibration images",
                len(over),
                "onnx.fp16_overflow_nodes",
                detail=f"e.g. {over[0]}; keep export.fp16_guard=true" if over else "",
            )
        )
    return out


def convert_to_int8(job: Conversion) -> GateResult:
    """Q/DQ INT8 for the configured target, with the calibration ranges kept beside it; a TensorRT target is
    also checked for Q/DQ nodes TensorRT would reject."""
    s = job.settings
    target = INT8_TARGETS.get(s.int8_target, "export.int8_target")
    result = quantize_int8(
        job.fp32,
        job.dst,
        job.calibration,
        CalibrationCache(job.cache_dir),
        job.meta("int8", target.description),
        method=s.calibration_method,
        target=target.name,
    )
    copy_ranges(result, job.dst.parent / CALIBRATION_RANGES)
    job.log(
        f"[export] wrote {job.dst.name} ({target.name} target; calibration cache "
        f"{'hit' if result.cache_hit else 'miss'}, key {result.key.digest[:12]})"
    )
    out = GateResult(report={"target": target.name, "cache_hit": result.cache_hit, "key": result.key.to_dict()})
    if result.preprocess:
        job.log(f"[export] int8 pre-processing: {result.preprocess}")
        out.report["preprocess"] = result.preprocess
    if target.builds_engine:
        problems = tensorrt_qdq_problems(job.dst)
        out.report["tensorrt_qdq_problems"] = problems
        detail = f"e.g. {problems[0]}" if problems else ""
        out.checks.append(
            Check.gate(
                "int8_qdq_tensorrt",
                "Q/DQ nodes TensorRT rejects",
                len(problems),
                "onnx.int8_qdq_violations",
                detail=detail,
            )
        )
    return out


def _int8_without_engine(settings: Any) -> str:
    if INT8_TARGETS.get(settings.int8_target, "export.int8_target").builds_engine:
        return ""
    return (
        f"the INT8 model for export.int8_target={settings.int8_target} has uint8 activations, which TensorRT "
        "does not accept; export with export.int8_target=tensorrt for an INT8 engine"
    )


def _fp32_engine_gate(stats: dict) -> list[Check]:
    return [
        Check.gate("trt_fp32_max_abs", "max |TensorRT - golden|", stats["max_abs"], "trt.fp32_max_abs"),
        Check.gate(
            "trt_top1_agreement",
            "fraction of equal argmax, near-ties excused",
            stats["top1_agreement"],
            "onnx.top1_agreement",
            ">=",
            detail=tie_detail(stats),
        ),
    ]


def _fp16_engine_gate(stats: dict) -> list[Check]:
    return [
        Check.gate(
            "trt_fp16_min_cosine", "min per-sample cosine vs golden", stats["min_cosine"], "onnx.fp16_min_cosine", ">="
        ),
        Check.gate(
            "trt_fp16_top1_agreement",
            "fraction of equal argmax, near-ties excused",
            stats["top1_agreement"],
            "onnx.fp16_top1_agreement",
            ">=",
            detail=tie_detail(stats),
        ),
    ]


def _int8_engine_gate(stats: dict) -> list[Check]:
    return [
        Check.gate(
            "trt_int8_top1_agreement",
            "fraction of equal argmax vs ONNX Runtime int8, near-ties excused",
            stats["top1_agreement"],
            "trt.int8_top1_agreement",
            ">=",
            detail=tie_detail(stats),
        )
    ]


for _precision in (
    # fp32 and fp16 engines are held to the PyTorch fp32 reference, as their ONNX gates are; INT8 to ONNX
    # Runtime on the same Q/DQ model (its accuracy gate needs labelled data and runs in the engine stage).
    Precision(
        REFERENCE_PRECISION,
        "model.onnx",
        _fp32_engine_gate,
        (("--atol", f"{TOLERANCES['trt.fp32_max_abs']:g}", "--rtol", "0"), _TOP1),
    ),
    Precision(
        "fp16",
        "model.fp16.onnx",
        _fp16_engine_gate,
        (
            (
                "--compare",
                "cosine_similarity",
                "--cosine-similarity-threshold",
                f"{TOLERANCES['onnx.fp16_min_cosine']:g}",
            ),
            _TOP1,
        ),
        convert_to_fp16,
        fp16_gate,
    ),
    Precision(
        "int8",
        "model.int8.onnx",
        _int8_engine_gate,
        (_TOP1,),
        convert_to_int8,
        int8_gate,
        golden_from_onnx=True,
        why_no_engine=_int8_without_engine,
        engine_accuracy_gate=True,
    ),
):
    PRECISIONS.register(_precision, name=_precision.name)
