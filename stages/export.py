"""``export``: the fused student as ONNX fp32/fp16/INT8, each checked against its gate (design §2).

Every artifact carries the model's deployment metadata. fp32 is checked against the fused PyTorch
model (parity, batch consistency); fp16 and INT8 are separate files with their own gates, measured
on the evaluation set (the test split through the model's evaluation preprocessing): fp16 by cosine
and top-1 agreement with fp32, INT8 by its top-1 accuracy drop. The stage also writes golden I/O in
Polygraphy's format and ``build_engine.sh`` for building and checking the engine on the target.

On the export-only path (``run export --checkpoint``) the run's dataset still provides the images;
when its classes are not the checkpoint's, the INT8 accuracy gate cannot be measured and the manifest
says so instead of passing it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from exports.calibration import CALIBRATION_METHODS
from exports.fp16 import FP16_MAX, convert_fp16
from exports.golden import save_inputs, save_outputs
from exports.int8 import INT8_TARGETS, CalibrationCache, copy_ranges, quantize_int8, tensorrt_qdq_problems
from exports.metadata import PRECISIONS, DeployMeta
from exports.onnx_export import export_onnx, exporter_name
from exports.ort import ort_run, ort_session
from exports.runtime import as_gray
from exports.trt_commands import GOLDEN_INPUTS, GOLDEN_OUTPUTS, EngineTarget, build_script, golden_outputs_name
from exports.trt_engine import BatchProfile
from pipeline.checkpoint import ModelMeta
from pipeline.checks import TOLERANCES, Check
from pipeline.compare import allclose_fraction, diff_stats, top1_accuracy
from pipeline.config import Config
from pipeline.data import Transformed
from pipeline.data.transforms import eval_preprocess_spec
from pipeline.errors import ConfigError
from pipeline.hashing import sha256_file
from pipeline.loading import load_any_model
from pipeline.progress import progress_bar
from pipeline.reparam import fuse_model
from pipeline.training import make_loader
from stages.base import Stage, StageContext, StageResult, register_stage
from stages.common import bundle, data_params, write_json
from stages.fuse import CHECKPOINT as FUSED_CHECKPOINT
from stages.verify import batched_logits

ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
REPORT = "report.json"
BUILD_SCRIPT = "build_engine.sh"
CALIBRATION_RANGES = "int8_calibration.json"


def deploy_meta(
    meta: ModelMeta, source: Path, cfg: Config, precision: str = "fp32", quantization: str = ""
) -> DeployMeta:
    spec = eval_preprocess_spec(meta)  # ModelMeta has the fields of a DataInfo that the spec reads
    return DeployMeta(
        arch=meta.arch,
        num_classes=meta.num_classes,
        input_size=meta.input_size,
        mean=list(meta.mean),
        std=list(meta.std),
        resize=spec["resize"],
        crop=spec["crop"],
        class_names=list(meta.class_names),
        recipe=meta.recipe,
        color=meta.color,
        precision=precision,
        quantization=quantization,
        source_sha256=sha256_file(source),
        exporter=exporter_name(cfg.export.dynamo),
        opset=cfg.export.opset,
    )


def deploy_transform(meta: DeployMeta) -> v2.Compose:
    """The model's evaluation preprocessing, for any image dataset; on PIL images it is exactly what the
    edge runtime computes."""
    return v2.Compose(
        [
            *([as_gray] if meta.color == "gray" else []),
            v2.Resize(meta.resize, antialias=True),  # before ToImage: PIL images are resized by PIL, as the
            v2.CenterCrop(meta.crop),  # edge runtime does (exports.runtime.preprocess)
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(meta.mean, meta.std),
        ]
    )


def label_mismatch(cfg: Config, meta: DeployMeta) -> str:
    """Why the run's test labels cannot score this model ('' when they can)."""
    info = bundle(cfg).info
    if info.num_classes != meta.num_classes:
        return f"dataset {info.name} has {info.num_classes} classes, the model {meta.num_classes}"
    if meta.class_names and list(info.class_names) != list(meta.class_names):
        return f"dataset {info.name} names its classes differently from the model"
    return ""


def first_test_images(cfg: Config, meta: DeployMeta, n: int) -> np.ndarray:
    """The first ``n`` test images, preprocessed as the model expects."""
    source = bundle(cfg).source("test")
    transform = deploy_transform(meta)
    return torch.stack([transform(source[i][0]) for i in range(min(n, len(source)))]).numpy()


def eval_batches(cfg: Config, meta: DeployMeta, limit: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The evaluation set in batches: (images, labels), streamed so large test splits fit in memory."""
    source = bundle(cfg).source("test")
    if limit is not None:
        source = torch.utils.data.Subset(source, range(min(limit, len(source))))
    loader = make_loader(Transformed(source, deploy_transform(meta)), cfg.data, train=False)
    for images, labels in progress_bar(loader, desc="evaluation set", leave=False):
        yield images.numpy(), labels.numpy()


def calibration_images(cfg: Config, meta: DeployMeta) -> np.ndarray:
    """``export.calibration_samples`` training-split images (a seeded subset), preprocessed."""
    source = bundle(cfg).source("train")
    n = min(cfg.export.calibration_samples, len(source))
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(cfg.seed))[:n].sort().values
    transform = deploy_transform(meta)
    return torch.stack([transform(source[int(i)][0]) for i in progress_bar(order, "calibration images")]).numpy()


def validate_export(cfg: Config) -> None:
    unknown = sorted(set(cfg.export.precisions) - set(PRECISIONS))
    if unknown:
        raise ConfigError(f"unknown export precision {unknown[0]!r}; choose from: {', '.join(PRECISIONS)}")
    if cfg.export.int8_target not in INT8_TARGETS:
        raise ConfigError(
            f"unknown export.int8_target {cfg.export.int8_target!r}; choose one of: {', '.join(INT8_TARGETS)}"
        )
    if cfg.export.calibration_method not in CALIBRATION_METHODS:
        raise ConfigError(
            f"unknown calibration method {cfg.export.calibration_method!r}; "
            f"choose one of: {', '.join(CALIBRATION_METHODS)}"
        )
    if not 0 < cfg.export.fp16_safe_max <= FP16_MAX:
        raise ConfigError(f"export.fp16_safe_max must be in (0, {FP16_MAX:g}], got {cfg.export.fp16_safe_max:g}")
    for key in ("golden_samples", "parity_samples", "calibration_samples", "eval_samples"):
        value = getattr(cfg.export, key)
        if value is not None and value < 1:
            raise ConfigError(f"export.{key} must be at least 1")


def engine_profile(cfg: Config, input_size: int) -> BatchProfile:
    e = cfg.engine
    return BatchProfile(e.min_batch, e.opt_batch, e.max_batch, input_size)


@register_stage
class ExportStage(Stage):
    name = "export"
    description = "export ONNX fp32/fp16/int8 and check each in ONNX Runtime"

    def requires(self, cfg: Config) -> tuple[str, ...]:
        return () if cfg.export.checkpoint else ("fuse", "verify")

    def externals(self, cfg: Config) -> dict[str, str]:
        return {"checkpoint": cfg.export.checkpoint} if cfg.export.checkpoint else {}

    def validate(self, cfg: Config) -> None:
        validate_export(cfg)
        engine_profile(cfg, 1)

    def params(self, cfg: Config) -> dict:
        params = dataclasses.asdict(cfg.export)
        for key in ("checkpoint", "calibration_cache"):  # where things live, not what they are
            params.pop(key)
        params["precisions"] = sorted(set(params["precisions"]) | {"fp32"})
        params["engine_profile"] = {
            k: getattr(cfg.engine, k) for k in ("min_batch", "opt_batch", "max_batch", "workspace_mib")
        }
        params["data"] = data_params(cfg)
        params["seed"] = cfg.seed
        if cfg.export.checkpoint:
            params["assumed_arch"] = cfg.student.arch  # how a checkpoint without pipeline metadata is read
        return params

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.cfg
        source = (
            ctx.external_path("checkpoint")
            if "checkpoint" in ctx.external
            else ctx.inputs["fuse"].path(FUSED_CHECKPOINT)
        )
        model, meta = load_any_model(source, lambda: ModelMeta.from_data(bundle(cfg).info, cfg.student.arch), ctx.log)
        if meta.form != "fused":
            model = fuse_model(model)
        profile = engine_profile(cfg, meta.input_size)
        base = deploy_meta(meta, source, cfg)
        fp32 = export_onnx(
            model, ctx.out / ONNX_FILES["fp32"], meta.input_size, cfg.export.opset, cfg.export.dynamo, base
        )
        ctx.log(f"[export] wrote {fp32.name} (opset {cfg.export.opset}, dynamo={cfg.export.dynamo})")

        checks, metrics, report = fp32_checks(model, fp32, cfg, base)
        golden = first_test_images(cfg, base, cfg.export.golden_samples)
        reference = batched_logits(model, torch.from_numpy(golden), torch.device("cpu")).numpy()
        save_inputs(golden, ctx.out / GOLDEN_INPUTS)
        save_outputs(reference, ctx.out / GOLDEN_OUTPUTS, runner="pytorch-fp32")

        reduced = [p for p in PRECISIONS if p != "fp32" and p in cfg.export.precisions]
        notes = []
        if reduced:
            calibration = calibration_images(cfg, base)
            report["calibration"] = {"split": "train", "samples": len(calibration)}
            files = {"fp32": fp32}
            if "fp16" in reduced:
                files["fp16"], kept = export_fp16(ctx, cfg, meta, source, calibration)
                report["fp16"] = {"guard": cfg.export.fp16_guard, "kept_fp32": kept}
                metrics["fp16_nodes_kept_fp32"] = len(kept)
            if "int8" in reduced:
                files["int8"], int8_checks, int8_info = export_int8(ctx, cfg, meta, source, calibration)
                checks += int8_checks
                report["int8"] = int8_info
            gate_checks, gate_metrics, gate_report, note = reduced_precision_gates(cfg, base, files)
            checks += gate_checks
            metrics.update(gate_metrics)
            report["gates"] = gate_report
            notes += [note] if note else []
            if "int8" in files:
                int8_golden = ort_run(ort_session(files["int8"]), golden)
                save_outputs(int8_golden, ctx.out / golden_outputs_name("int8"), runner="onnxrt-int8")

        targets = [
            EngineTarget(p, ONNX_FILES[p])
            for p in PRECISIONS
            if p == "fp32" or (p in reduced and (p != "int8" or cfg.export.int8_target == "tensorrt"))
        ]
        script = ctx.out / BUILD_SCRIPT
        script.write_text(build_script(targets, profile, cfg.engine.workspace_mib))
        script.chmod(0o755)
        write_json(ctx.out / REPORT, report)
        return StageResult(checks=checks, metrics=metrics, reason="; ".join(notes))


def fp32_checks(model: torch.nn.Module, path: Path, cfg: Config, meta: DeployMeta) -> tuple[list[Check], dict, dict]:
    """ORT CPU against the fused PyTorch model, and a sample alone against the same sample in a batch."""
    images = first_test_images(cfg, meta, cfg.export.parity_samples)
    reference = batched_logits(model, torch.from_numpy(images), torch.device("cpu")).numpy()
    session = ort_session(path)
    candidate = ort_run(session, images)
    stats = diff_stats(reference, candidate)
    single = np.concatenate([ort_run(session, images[i : i + 1]) for i in range(min(len(images), 8))])
    batch_stats = diff_stats(candidate[: len(single)], single)
    checks = [
        Check.gate("onnx_fp32_max_abs", "max |ORT - PyTorch|", stats["max_abs"], "onnx.fp32_max_abs"),
        Check.of(
            "onnx_fp32_allclose",
            "fraction beyond atol and rtol",
            allclose_fraction(
                reference, candidate, atol=TOLERANCES["onnx.fp32_max_abs"], rtol=TOLERANCES["onnx.fp32_rtol"]
            ),
            0.0,
        ),
        Check.gate(
            "onnx_top1_agreement", "fraction of equal argmax", stats["top1_agreement"], "onnx.top1_agreement", ">="
        ),
        Check.gate("batch_consistency", "max |alone - in batch|", batch_stats["max_abs"], "onnx.batch_max_abs"),
    ]
    metrics = {"opset": cfg.export.opset, "dynamo": cfg.export.dynamo, "onnx_max_abs": stats["max_abs"]}
    report = {
        "exporter": meta.exporter,
        "opset": cfg.export.opset,
        "parity": {"inputs": f"{cfg.data.dataset} test split", "samples": len(images), "fp32": stats},
        "batch": batch_stats,
    }
    return checks, metrics, report


def export_fp16(ctx: StageContext, cfg: Config, meta: ModelMeta, source: Path, calibration: np.ndarray):
    guard = f"overflow guard: nodes above |x| > {cfg.export.fp16_safe_max:g} kept fp32"
    quantization = "fp16 via onnxconverter-common, fp32 I/O, " + (guard if cfg.export.fp16_guard else "no guard")
    path = ctx.out / ONNX_FILES["fp16"]
    kept = convert_fp16(
        ctx.out / ONNX_FILES["fp32"],
        path,
        calibration if cfg.export.fp16_guard else None,
        cfg.export.fp16_safe_max,
        deploy_meta(meta, source, cfg, "fp16", quantization),
    )
    ctx.log(f"[export] wrote {path.name} ({len(kept)} nodes kept in fp32 by the overflow guard)")
    return path, kept


def export_int8(ctx: StageContext, cfg: Config, meta: ModelMeta, source: Path, calibration: np.ndarray):
    target = cfg.export.int8_target
    quantization = (
        "int8 Q/DQ, symmetric, per-channel weights (TensorRT explicit quantization)"
        if target == "tensorrt"
        else "int8 Q/DQ, uint8 activations (ONNX Runtime CPU; not for TensorRT)"
    )
    cache_dir = Path(cfg.export.calibration_cache or ctx.store.root / ".cache" / "calibration")
    path = ctx.out / ONNX_FILES["int8"]
    result = quantize_int8(
        ctx.out / ONNX_FILES["fp32"],
        path,
        calibration,
        CalibrationCache(cache_dir),
        deploy_meta(meta, source, cfg, "int8", quantization),
        method=cfg.export.calibration_method,
        target=target,
    )
    copy_ranges(result, ctx.out / CALIBRATION_RANGES)
    ctx.log(
        f"[export] wrote {path.name} ({target} target; calibration cache "
        f"{'hit' if result.cache_hit else 'miss'}, key {result.key.digest[:12]})"
    )
    checks = []
    info = {"target": target, "cache_hit": result.cache_hit, "key": result.key.to_dict()}
    if target == "tensorrt":
        problems = tensorrt_qdq_problems(path)
        info["tensorrt_qdq_problems"] = problems
        detail = f"e.g. {problems[0]}" if problems else ""
        checks.append(
            Check.gate(
                "int8_qdq_tensorrt",
                "Q/DQ nodes TensorRT rejects",
                len(problems),
                "onnx.int8_qdq_violations",
                detail=detail,
            )
        )
    return path, checks, info


def fp16_gate(reference: np.ndarray, candidate: np.ndarray) -> tuple[list[Check], dict]:
    """fp16 against fp32 on the same images: cosine per sample (min over the set) and top-1 agreement."""
    stats = diff_stats(reference, candidate)
    checks = [
        Check.gate(
            "onnx_fp16_min_cosine", "min per-sample cosine vs fp32", stats["min_cosine"], "onnx.fp16_min_cosine", ">="
        ),
        Check.gate(
            "onnx_fp16_top1_agreement",
            "fraction of equal argmax vs fp32",
            stats["top1_agreement"],
            "onnx.fp16_top1_agreement",
            ">=",
        ),
    ]
    return checks, stats


def int8_gate(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray) -> tuple[Check, dict]:
    """INT8 top-1 accuracy drop against fp32, in points, on labelled images."""
    acc32, acc8 = top1_accuracy(reference, labels), top1_accuracy(candidate, labels)
    check = Check.gate(
        "onnx_int8_top1_drop",
        "top-1 fp32 - top-1 int8 (pt)",
        acc32 - acc8,
        "onnx.int8_top1_drop_pt",
        detail=f"fp32 {acc32:.2f}%, int8 {acc8:.2f}%",
    )
    return check, {"fp32_top1": acc32, "int8_top1": acc8, "int8_top1_drop_pt": acc32 - acc8}


def reduced_precision_gates(cfg: Config, meta: DeployMeta, files: dict[str, Path]):
    """One pass over the evaluation set through every exported precision, then their gates."""
    sessions = {p: ort_session(path) for p, path in files.items()}
    logits: dict[str, list[np.ndarray]] = {p: [] for p in files}
    labels = []
    for images, batch_labels in eval_batches(cfg, meta, cfg.export.eval_samples):
        labels.append(batch_labels)
        for p, session in sessions.items():
            logits[p].append(ort_run(session, images))
    labels_all = np.concatenate(labels)
    out = {p: np.concatenate(chunks) for p, chunks in logits.items()}
    checks, metrics, report, note = [], {}, {"eval_samples": len(labels_all)}, ""
    if "fp16" in out:
        fp16_checks, stats = fp16_gate(out["fp32"], out["fp16"])
        checks += fp16_checks
        metrics["fp16_min_cosine"] = stats["min_cosine"]
        report["fp16"] = stats
    if "int8" in out:
        report["int8"] = {"vs_fp32": diff_stats(out["fp32"], out["int8"])}
        mismatch = label_mismatch(cfg, meta)
        if mismatch:
            note = f"int8 accuracy gate skipped: {mismatch}, so the test labels cannot score the model"
            report["int8"]["accuracy_gate"] = f"skipped: {note}"
            metrics["int8_gate"] = "skipped"
        else:
            check, figures = int8_gate(out["fp32"], out["int8"], labels_all)
            checks.append(check)
            metrics.update(figures)
            report["int8"].update(figures)
    return checks, metrics, report, note


def read_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())
