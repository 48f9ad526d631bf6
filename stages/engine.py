"""``engine``: build the TensorRT engine from the exported ONNX of the chosen precision and check it.

The build uses the TensorRT Python API (strongly typed network, the configured optimization
profile, a timing cache kept per TensorRT release and GPU under ``<run>/.cache/tensorrt``) and writes
the plain serialized plan with a JSON sidecar (TensorRT version, GPU, compute capability, profile,
model metadata). The engine is then run, after the sidecar preflight, on the golden inputs and held
to its precision's gate (design §2); an INT8 engine is also scored on the evaluation set when the
run's labels fit the model. Without TensorRT or a CUDA GPU the stage records ``skipped`` and why; it
never writes a placeholder engine.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from exports.golden import load_inputs, load_outputs
from exports.metadata import DeployMeta
from exports.onnx_export import read_metadata
from exports.precisions import PRECISIONS, Precision
from exports.runners import infer_array
from exports.trt_commands import GOLDEN_INPUTS, engine_name
from exports.trt_engine import TrtRunner, build_engine, current_platform, sidecar_path, unavailable_reason, write_engine
from pipeline.artifacts.checks import Check, GateResult
from pipeline.compare import diff_stats, near_chance, tie_figures, top1_accuracy
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.stage_files import REPORT
from stages.base import Stage, StageContext, StageResult, register_stage
from stages.support.deployment import engine_profile, eval_batches, label_mismatch, read_report
from stages.support.kit import data_params, write_json


def cuda_index(device: str) -> int | None:
    """The CUDA device an engine is built on, or ``None`` when the run asked for the CPU."""
    if device in ("auto", "cuda"):
        return 0
    if device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    return None


@register_stage
class EngineStage(Stage):
    name = "engine"
    outputs = (REPORT,)
    description = "build the TensorRT engine and check it against the golden outputs"

    def requires(self, cfg: Config) -> tuple[str, ...]:
        return ("export",)

    def validate(self, cfg: Config) -> None:
        spec = PRECISIONS.get(cfg.engine.precision, "engine.precision")
        engine_profile(cfg, 1)
        if cfg.engine.workspace_mib < 1:
            raise ConfigError("engine.workspace_mib must be at least 1")
        refusal = spec.why_no_engine(cfg.export)
        if refusal:
            raise ConfigError(refusal)

    def params(self, cfg: Config) -> dict:
        params = dataclasses.asdict(cfg.engine)
        params.pop("timing_cache")  # a build speed-up, not part of the result
        params["device"] = cfg.device
        params["eval_samples"] = cfg.export.eval_samples
        params["data"] = data_params(cfg)
        return params

    def run(self, ctx: StageContext) -> StageResult:
        cfg, export = ctx.cfg, ctx.inputs["export"]
        precision = cfg.engine.precision
        spec = PRECISIONS.get(precision, "engine.precision")
        onnx_path = self._onnx_for(spec, export, cfg)
        index = cuda_index(cfg.device)
        if index is None:
            return StageResult(
                status="skipped", reason=f"TensorRT needs a CUDA GPU and the run uses device={cfg.device}"
            )
        reason = unavailable_reason()
        if reason:
            return StageResult(status="skipped", reason=reason)

        meta = DeployMeta.from_props(read_metadata(onnx_path), str(onnx_path))
        profile = engine_profile(cfg, meta.input_size)
        platform = current_platform(index)
        timing = f"trt{platform.tensorrt_release}-sm{platform.compute_capability}.timing.cache"
        cache = Path(cfg.engine.timing_cache or ctx.store.cache("tensorrt") / timing)
        ctx.log(f"[engine] building {precision} engine on {platform.gpu} with TensorRT {platform.tensorrt}")
        plan = build_engine(onnx_path, profile, cfg.engine.workspace_mib, cache, meta.input_name)
        engine_path = ctx.out / engine_name(precision)
        write_engine(plan, engine_path, onnx_path, precision, profile, cfg.engine.workspace_mib, meta, platform)

        golden = load_inputs(export.path(GOLDEN_INPUTS), meta.input_name)
        runner_name, expected = load_outputs(export.path(spec.golden_outputs), meta.output_name)
        with TrtRunner(engine_path, index) as runner:
            per_sample = np.concatenate([infer_array(runner, golden[i : i + 1]) for i in range(len(golden))])
            batched = infer_array(runner, golden)
            for warning in runner.warnings:
                ctx.log(f"[engine] warning: {warning}")
            stats = diff_stats(expected, per_sample)
            result = GateResult(
                spec.engine_gate(stats),
                {
                    "engine_max_abs": stats["max_abs"],
                    "engine_min_cosine": stats["min_cosine"],
                    **tie_figures(stats, "engine"),  # the tie-aware top-1 agreement and its figures
                    "batch_max_abs": diff_stats(per_sample, batched)["max_abs"],
                    "engine_bytes": len(plan),
                },
                {
                    "platform": dataclasses.asdict(platform),
                    "profile": dataclasses.asdict(profile),
                    "golden": {"reference": runner_name, "samples": len(golden), **stats},
                    "batch_consistency": diff_stats(per_sample, batched),
                },
            )
            if spec.engine_accuracy_gate:
                result.merge(self._accuracy(ctx, spec.name, runner, meta, export.path(REPORT)), section=spec.name)
        result.report["sidecar"] = sidecar_path(engine_path).name
        write_json(ctx.out / REPORT, result.report)
        return StageResult(checks=result.checks, metrics=result.metrics, reason=result.note)

    @staticmethod
    def _onnx_for(spec: Precision, export, cfg: Config) -> Path:
        exported = {a.path for a in export.manifest.outputs}
        if spec.onnx_file not in exported:
            raise ConfigError(
                f"engine.precision={spec.name} but the export stage made no {spec.name} ONNX; "
                f"add it with --set 'export.precisions=[fp32,{spec.name}]' and rerun export"
            )
        as_exported = dataclasses.replace(cfg.export, int8_target=export.manifest.params.get("int8_target"))
        refusal = spec.why_no_engine(as_exported)
        if refusal:
            raise ConfigError(refusal)
        return export.path(spec.onnx_file)

    @staticmethod
    def _accuracy(ctx: StageContext, precision: str, runner: TrtRunner, meta: DeployMeta, export_report: Path):
        """The precision's gate proper: top-1 drop against the fp32 accuracy the export stage measured."""
        cfg = ctx.cfg
        fp32_top1 = read_report(export_report).get("gates", {}).get(precision, {}).get("fp32_top1")
        mismatch = label_mismatch(cfg, meta)
        chance = near_chance(fp32_top1, meta.num_classes) if fp32_top1 is not None else ""
        if mismatch or fp32_top1 is None or chance:
            why = mismatch or chance or "the export stage has no fp32 accuracy for this data"
            skipped = {f"{precision}_gate": "skipped"}
            return GateResult(metrics=skipped, report=skipped, notes=[f"{precision} accuracy gate skipped: {why}"])
        logits, labels = [], []
        for images, batch_labels in eval_batches(cfg, meta, cfg.export.eval_samples):
            logits.append(infer_array(runner, images))
            labels.append(batch_labels)
        top1 = top1_accuracy(np.concatenate(logits), np.concatenate(labels))
        drop = fp32_top1 - top1
        check = Check.gate(
            f"trt_{precision}_top1_drop",
            f"top-1 ONNX fp32 - top-1 TensorRT {precision} (pt)",
            drop,
            f"onnx.{precision}_top1_drop_pt",
            detail=f"fp32 {fp32_top1:.2f}%, TensorRT {precision} {top1:.2f}%",
        )
        figures = {f"trt_{precision}_top1": top1, f"trt_{precision}_top1_drop_pt": drop}
        return GateResult([check], figures, dict(figures))


def golden_checks(precision: str, stats: dict) -> list[Check]:
    """The engine's gate on the golden samples: the matching ONNX row of design §2."""
    return PRECISIONS.get(precision, "engine.precision").engine_gate(stats)
