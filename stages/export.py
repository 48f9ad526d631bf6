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

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from exports.calibration import CALIBRATION_METHODS
from exports.constant_qdq import fold_constant_qdq
from exports.fp16 import FP16_MAX
from exports.golden import save_inputs, save_outputs
from exports.int8 import INT8_TARGETS, CalibrationCache, quantize_int8
from exports.latency import onnx_latency, runner_latency
from exports.metadata import DeployMeta
from exports.onnx_export import export_onnx, exporter_name
from exports.precisions import PRECISIONS, Conversion
from exports.runners import OnnxrtRunner, cpu_optimization, infer_array
from exports.trt_commands import GOLDEN_INPUTS, GOLDEN_OUTPUTS, EngineTarget, build_script
from pipeline.artifacts.checkpoint import ModelMeta
from pipeline.artifacts.checks import TOLERANCES, Check, GateResult
from pipeline.artifacts.hashing import sha256_file
from pipeline.compare import (
    CHANCE_MARGIN_PT,
    allclose_fraction,
    diff_stats,
    magnitude,
    near_chance,
    tie_detail,
    top1_accuracy,
)
from pipeline.config import Config
from pipeline.data.transforms import eval_preprocess_spec
from pipeline.errors import ConfigError, UnsupportedModelError, library_errors, one_line
from pipeline.models.loading import foreign_meta, load_any_model
from pipeline.precision_order import PRECISION_ORDER, REFERENCE_PRECISION
from pipeline.progress import progress_bar
from pipeline.reparam import fuse_model
from pipeline.stage_files import FUSED_CHECKPOINT, REPORT
from stages.base import Stage, StageContext, StageResult, register_stage
from stages.support.deployment import ONNX_FILES, deploy_transform, engine_profile, eval_batches, label_mismatch
from stages.support.kit import batched_logits, bundle, data_params, write_json

BUILD_SCRIPT = "build_engine.sh"
ORT_PIXELS = 256 * 32 * 32  # pixels per ONNX Runtime call in the checks: 256 images at 32 px, 5 at 224 px


def ort_batch(input_size: int) -> int:
    """Samples per ONNX Runtime call in the checks. Activations grow with the pixels (attention's with their
    square) and each precision's session keeps its peak arena: 256 images of 224 px per call took timm's CoaT
    past 24 GB. A CPU gains little from larger calls."""
    return max(1, ORT_PIXELS // (input_size * input_size))


def deploy_meta(
    meta: ModelMeta, source: Path, cfg: Config, precision: str = REFERENCE_PRECISION, quantization: str = ""
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


def first_test_images(cfg: Config, meta: DeployMeta, n: int) -> np.ndarray:
    """The first ``n`` test images, preprocessed as the model expects."""
    source = bundle(cfg).source("test")
    transform = deploy_transform(meta)
    return torch.stack([transform(source[i][0]) for i in range(min(n, len(source)))]).numpy()


def calibration_images(cfg: Config, meta: DeployMeta) -> np.ndarray:
    """``export.calibration_samples`` training-split images (a seeded subset), preprocessed."""
    source = bundle(cfg).source("train")
    n = min(cfg.export.calibration_samples, len(source))
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(cfg.seed))[:n].sort().values
    transform = deploy_transform(meta)
    return torch.stack([transform(source[int(i)][0]) for i in progress_bar(order, "calibration images")]).numpy()


def exported_precisions(cfg: Config) -> list[str]:
    """The precisions the run exports, in :data:`PRECISION_ORDER`: the reference always, the others as configured."""
    return [p for p in PRECISION_ORDER if p == REFERENCE_PRECISION or p in cfg.export.precisions]


def validate_export(cfg: Config) -> None:
    for precision in cfg.export.precisions:
        PRECISIONS.get(precision)
        if precision not in PRECISION_ORDER:  # registered, but the export would silently not make it
            raise ConfigError(
                f"export precision {precision!r} is registered but not in PRECISION_ORDER "
                f"(pipeline/precision_order.py), which sets the order precisions are made and shown in: add it there"
            )
    INT8_TARGETS.get(cfg.export.int8_target, "export.int8_target")
    CALIBRATION_METHODS.get(cfg.export.calibration_method)
    if not 0 < cfg.export.fp16_safe_max <= FP16_MAX:
        raise ConfigError(f"export.fp16_safe_max must be in (0, {FP16_MAX:g}], got {cfg.export.fp16_safe_max:g}")
    for key in ("golden_samples", "parity_samples", "calibration_samples", "eval_samples", "latency_runs"):
        value = getattr(cfg.export, key)
        if value is not None and value < 1:
            raise ConfigError(f"export.{key} must be at least 1")
    if cfg.export.latency_warmup < 0:
        raise ConfigError("export.latency_warmup must be at least 0")


@register_stage
class ExportStage(Stage):
    name = "export"
    outputs = (ONNX_FILES[REFERENCE_PRECISION], GOLDEN_INPUTS, GOLDEN_OUTPUTS, BUILD_SCRIPT, REPORT)
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
        params["precisions"] = sorted(set(params["precisions"]) | {REFERENCE_PRECISION})
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
        model, meta = load_any_model(
            source, lambda: foreign_meta(cfg.student.arch, bundle(cfg).info, cfg.data.image_size), ctx.log
        )
        timings: dict[str, float] = {}  # seconds per step, in the report: where an export's time goes

        @contextlib.contextmanager
        def step(what: str, key: str) -> Iterator[None]:
            tic = time.perf_counter()
            with library_errors("export", what, model=meta.arch):  # a library's failure: one line
                yield
            timings[key] = round(timings.get(key, 0.0) + time.perf_counter() - tic, 2)

        if meta.form != "fused":
            with step("re-parameterization and BatchNorm folding", "fold"):
                model = fuse_model(model)
        profile = engine_profile(cfg, meta.input_size)
        base = deploy_meta(meta, source, cfg)
        fp32 = ctx.out / ONNX_FILES[REFERENCE_PRECISION]
        try:
            with step(f"ONNX export (opset {cfg.export.opset}, dynamo={cfg.export.dynamo})", "onnx_export"):
                export_onnx(model, fp32, meta.input_size, cfg.export.opset, cfg.export.dynamo, base)
            fallback = ""
        except UnsupportedModelError as exc:
            if not cfg.export.dynamo:
                raise
            # torch.export or its decompositions refuse some models (timm's MaxViT) that the TorchScript exporter
            # takes; the gates below judge its graph the same way, and the report says which exporter made it
            fallback = str(exc)
            ctx.log(f"[export] warning: {fallback}; trying the TorchScript exporter (export.dynamo=false)")
            cfg = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, dynamo=False))
            base = deploy_meta(meta, source, cfg)
            with step(f"ONNX export (opset {cfg.export.opset}, dynamo=False, after dynamo=True failed)", "onnx_export"):
                export_onnx(model, fp32, meta.input_size, cfg.export.opset, False, base)
        ctx.log(f"[export] wrote {fp32.name} (opset {cfg.export.opset}, dynamo={cfg.export.dynamo})")

        with step("the ONNX Runtime fp32 check", "fp32_check"):
            result = fp32_checks(model, fp32, cfg, base)
        if fallback:
            result.report["exporter_fallback"] = fallback
            result.notes.append(f"warning: exported with dynamo=False after the dynamo exporter failed: {fallback}")
        golden = first_test_images(cfg, base, cfg.export.golden_samples)
        reference = batched_logits(model, torch.from_numpy(golden), torch.device("cpu")).numpy()
        save_inputs(golden, ctx.out / GOLDEN_INPUTS)
        save_outputs(reference, ctx.out / GOLDEN_OUTPUTS, runner="pytorch-fp32")

        specs = [PRECISIONS.get(p) for p in exported_precisions(cfg)]
        reduced = [spec for spec in specs if spec.name != REFERENCE_PRECISION]
        calibration_cache = Path(cfg.export.calibration_cache or ctx.store.cache("calibration"))
        files = {REFERENCE_PRECISION: fp32}
        if reduced:
            calibration = calibration_images(cfg, base)
            result.report["calibration"] = {"split": "train", "samples": len(calibration)}
            for spec in reduced:
                files[spec.name] = ctx.out / spec.onnx_file
                job = Conversion(
                    fp32,
                    files[spec.name],
                    calibration,
                    cfg.export,
                    calibration_cache,
                    lambda precision, how: deploy_meta(meta, source, cfg, precision, how),
                    ctx.log,
                )
                with step(f"{spec.name} conversion", spec.name):
                    result.merge(spec.convert(job), section=spec.name)

        targets = [EngineTarget(spec.name, spec.onnx_file) for spec in specs if not spec.why_no_engine(cfg.export)]
        script = ctx.out / BUILD_SCRIPT
        script.write_text(build_script(targets, profile, cfg.engine.workspace_mib))
        script.chmod(0o755)
        made = {p: path for p, path in files.items() if path.is_file()}
        with CpuSessions(cfg, made) as sessions:  # each model's session, shared by the steps below
            if reduced:
                with step("the ONNX Runtime evaluation of " + "/".join(files), "evaluation"):
                    result.merge(reduced_precision_gates(cfg, base, sessions), section="gates")
                for note in result.notes:
                    if note.startswith("warning:"):
                        ctx.log(f"[export] {note}")
                for spec in reduced:
                    if spec.golden_from_onnx:
                        with step(f"the {spec.name} golden outputs", "golden"):
                            outputs = infer_array(sessions[spec.name], golden, ort_batch(meta.input_size))
                        save_outputs(outputs, ctx.out / spec.golden_outputs, runner=f"onnxrt-{spec.name}")
            with step("the ONNX Runtime latency measurement", "latency"):
                result.report["latency"] = {  # ORT CPU
                    p: sessions.latency(p, meta.input_size, cfg.export.latency_warmup, cfg.export.latency_runs)
                    for p in made
                }
        if "int8" in made and times_cpu_int8(cfg):
            cpu = deploy_meta(meta, source, cfg, "int8", INT8_TARGETS.get("cpu").description)
            try:  # a figure beside the export, not part of it: where it cannot be made, say why and go on
                with step("the cpu-target INT8 model (timed only)", "int8_cpu_latency"):
                    timed = cpu_int8_latency(
                        fp32, calibration, cpu, calibration_cache, cfg.export.latency_warmup, cfg.export.latency_runs
                    )
            except UnsupportedModelError as exc:
                result.report["int8_cpu_latency"] = {"target": "cpu", "error": str(exc)}
                ctx.log(f"[export] warning: no INT8 timing on this CPU: {exc}")
            else:
                result.report["int8_cpu_latency"] = timed
                ctx.log(
                    f"[export] INT8 on this CPU: {timed['median_ms']:.3f} ms for a cpu-target model (timed only), "
                    f"{result.report['latency']['int8']['median_ms']:.3f} ms for the {cfg.export.int8_target} "
                    "model, which ONNX Runtime runs unfused"
                )
        result.report["timings_s"] = timings
        write_json(ctx.out / REPORT, result.report)
        return StageResult(checks=result.checks, metrics=result.metrics, reason=result.note)


CPU_INT8_SAMPLES = 32  # calibration images of the cpu-target model timed beside another target's: speed only


def _cpu_level(cfg: Config, precision: str) -> str:
    """The ONNX Runtime level at which this export's ``precision`` model is judged, timed and its goldens made."""
    return cpu_optimization(precision, cfg.export.int8_target)


def times_cpu_int8(cfg: Config) -> bool:
    """Whether to time a cpu-target INT8 model beside the exported one: on a machine without a CUDA GPU, where
    ONNX Runtime on the CPU is the only INT8 figure and runs a TensorRT-placed Q/DQ model unfused (slower than
    fp32), so the exported model's figure alone would read as "INT8 is slow here". ``export.cpu_int8_latency=false``
    saves its quantization where the figure is not wanted (the support matrix)."""
    return (
        cfg.export.cpu_int8_latency
        and "int8" in cfg.export.precisions
        and cfg.export.int8_target != "cpu"
        and not torch.cuda.is_available()
    )


def cpu_int8_latency(
    fp32: Path, calibration: np.ndarray, meta: DeployMeta, cache: Path, warmup: int = 3, runs: int = 20
) -> dict:
    """ORT CPU latency of the ``cpu``-target INT8 model of ``fp32``, made in a temporary folder and not kept.

    Only its speed is wanted, which the calibrated ranges do not change (the graph is the same whatever they
    are), so a few images with min-max calibration stand in for the export's full calibration.
    """
    images = calibration[:CPU_INT8_SAMPLES]
    with tempfile.TemporaryDirectory(prefix="int8-cpu-") as tmp:
        model = Path(tmp) / "model.int8.cpu.onnx"
        quantize_int8(fp32, model, images, CalibrationCache(cache), meta, method="minmax", target="cpu")
        figures = onnx_latency(model, meta.input_size, warmup=warmup, runs=runs)
    return {**figures, "target": "cpu", "calibration_samples": len(images), "kept": False}


def fp32_checks(model: torch.nn.Module, path: Path, cfg: Config, meta: DeployMeta) -> GateResult:
    """ORT CPU against the fused PyTorch model, and a sample alone against the same sample in a batch."""
    images = first_test_images(cfg, meta, cfg.export.parity_samples)
    reference = batched_logits(model, torch.from_numpy(images), torch.device("cpu")).numpy()
    with OnnxrtRunner(path) as runner:
        candidate = infer_array(runner, images, ort_batch(meta.input_size))
        single = np.concatenate([infer_array(runner, images[i : i + 1]) for i in range(min(len(images), 8))])
    parity = fp32_parity_gate(reference, candidate)
    batch_stats = diff_stats(candidate[: len(single)], single)
    checks = [
        *parity.checks,
        Check.scaled(
            "batch_consistency",
            "max |alone - in batch|",
            batch_stats["max_abs"],
            "onnx.batch_max_abs",
            "onnx.batch_rtol",
            magnitude(candidate),
        ),
    ]
    metrics = {"opset": cfg.export.opset, "dynamo": cfg.export.dynamo, **parity.metrics}
    report = {
        "exporter": meta.exporter,
        "opset": cfg.export.opset,
        "parity": {"inputs": f"{cfg.data.dataset} test split", "samples": len(images), **parity.report},
        "batch": batch_stats,
    }
    return GateResult(checks, metrics, report)


def fp32_parity_gate(reference: np.ndarray, candidate: np.ndarray) -> GateResult:
    """ONNX fp32 logits against PyTorch's: Polygraphy's element rule and the (tie-aware) top-1 agreement.

    An element fails only when ``|diff| > atol`` and ``|diff| > rtol * |ref|`` (``onnx.fp32_rtol``), and the
    gate allows none: a plain absolute bound would fail correct exports of models with large logits (float32
    rounding grows with the value), while the relative bound alone would pass any error on logits near zero.
    ``atol`` is ``onnx.fp32_max_abs`` plus ``onnx.fp32_scale_rtol`` times max |ref|: the rounding of a logit
    near zero grows with the sums that made it, whose size the largest logit shows. The max |diff| is still
    measured and reported.
    """
    stats = diff_stats(reference, candidate)
    scale = magnitude(reference)
    atol = TOLERANCES["onnx.fp32_max_abs"] + TOLERANCES["onnx.fp32_scale_rtol"] * scale
    rtol = TOLERANCES["onnx.fp32_rtol"]
    failed = allclose_fraction(reference, candidate, atol=atol, rtol=rtol)
    checks = [
        Check.of(
            "onnx_fp32_allclose",
            "fraction of elements beyond atol and rtol*|PyTorch|",
            failed,
            0.0,
            detail=f"(atol {atol:.3g} for max |PyTorch| {scale:.3g}, rtol {rtol:g}; "
            f"max |ORT - PyTorch| {stats['max_abs']:.3g})",
        ),
        Check.gate(
            "onnx_top1_agreement",
            "fraction of equal argmax, near-ties excused",
            stats["top1_agreement"],
            "onnx.top1_agreement",
            ">=",
            detail=tie_detail(stats),
        ),
    ]
    metrics = {"onnx_max_abs": stats["max_abs"], "onnx_allclose_failed": failed}
    allclose = {"atol": atol, "rtol": rtol, "scale": scale, "fraction_failed": failed}
    report = {REFERENCE_PRECISION: stats, "allclose": allclose}
    return GateResult(checks, metrics, report)


class CpuSessions:
    """The exported models' ONNX Runtime CPU sessions, each opened once, at the level its numbers are judged at
    (:func:`_cpu_level`), for the evaluation, the goldens and the latency.

    A model judged unoptimized (level "disabled": the TensorRT-target INT8) runs with its constant Q/DQ nodes
    evaluated once (:func:`exports.constant_qdq.fold_constant_qdq`): the same outputs, without quantizing
    every weight again on each pass; its latency entry says how many were folded.
    """

    def __init__(self, cfg: Config, files: dict[str, Path]):
        self.cfg = cfg
        self.files = files
        self.folded: dict[str, int | str] = {}  # nodes folded, or why none were
        self._open: dict[str, OnnxrtRunner] = {}
        self._active = contextlib.ExitStack()

    def __enter__(self) -> CpuSessions:
        return self

    def __exit__(self, *exc) -> None:
        self._active.close()

    def __getitem__(self, precision: str) -> OnnxrtRunner:
        if precision not in self._open:
            level = _cpu_level(self.cfg, precision)
            path = self.files[precision]
            prepared = None
            if level == "disabled":
                try:
                    prepared = fold_constant_qdq(path)
                except Exception as exc:  # a speed-up only: the file runs as it is, and the report says why
                    self.folded[precision] = f"not folded: {type(exc).__name__}: {one_line(exc)}"
            if prepared is not None:
                self.folded[precision] = prepared[1]
            model = prepared[0] if prepared is not None else None
            # unpacked weights: the sums in the file's order, so the folded model's outputs are the file's, bit for bit
            runner = OnnxrtRunner(path, optimization=level, model=model, prepack=model is None)
            self._open[precision] = self._active.enter_context(runner)
        return self._open[precision]

    def latency(self, precision: str, input_size: int, warmup: int, runs: int) -> dict:
        figures = runner_latency(self[precision], input_size, warmup=warmup, runs=runs)
        if precision in self.folded:
            figures["constant_qdq_folded"] = self.folded[precision]
        return figures


def reduced_precision_gates(cfg: Config, meta: DeployMeta, sessions: CpuSessions) -> GateResult:
    """One pass over the evaluation set through every exported precision, then each one's gate against fp32."""
    files = sessions.files
    logits: dict[str, list[np.ndarray]] = {p: [] for p in files}
    labels = []
    for images, batch_labels in eval_batches(cfg, meta, cfg.export.eval_samples):
        labels.append(batch_labels)
        for p in files:
            logits[p].append(infer_array(sessions[p], images, ort_batch(meta.input_size)))
    labels_all = np.concatenate(labels)
    out = {p: np.concatenate(chunks) for p, chunks in logits.items()}
    mismatch = label_mismatch(cfg, meta)
    result = GateResult(report={"eval_samples": len(labels_all)})
    for p in files:
        if p != REFERENCE_PRECISION:
            result.merge(PRECISIONS.get(p).onnx_gate(out[REFERENCE_PRECISION], out[p], labels_all, mismatch), section=p)
    if not mismatch:
        result.merge(chance_warning(out[REFERENCE_PRECISION], labels_all, meta.num_classes))
    return result


def chance_warning(
    logits: np.ndarray, labels: np.ndarray, num_classes: int, margin_pt: float = CHANCE_MARGIN_PT
) -> GateResult:
    """A note, not a gate: every gate compares the export with its own source, so an untrained checkpoint
    passes them all; a top-1 within ``margin_pt`` points of chance (:func:`pipeline.compare.near_chance`, the
    band in which the INT8 drop gate is not judged) says the model itself learned nothing."""
    why = near_chance(top1_accuracy(logits, labels), num_classes, margin_pt)
    if not why:
        return GateResult()
    note = f"warning: {why}: was this checkpoint trained?"
    return GateResult(report={"near_chance": note}, notes=[note])
