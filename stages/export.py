"""``export``: the fused student as ONNX, checked in ONNX Runtime against PyTorch (design §2)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from exports.onnx_export import export_onnx
from exports.ort import ort_run, ort_session
from pipeline.checks import Check
from pipeline.compare import allclose_fraction, diff_stats
from pipeline.config import Config
from pipeline.hashing import sha256_file
from pipeline.loading import load_model
from pipeline.reparam import fuse_model
from stages.base import Stage, StageContext, StageResult, register_stage
from stages.common import bundle, write_json
from stages.fuse import CHECKPOINT as FUSED_CHECKPOINT
from stages.verify import batched_logits, verification_batch

ONNX_FP32 = "model.onnx"


def sample_inputs(cfg: Config, input_size: int, n: int) -> tuple[np.ndarray, str]:
    """Real images when the run's dataset fits the model's input size, else seeded Gaussian images."""
    if bundle(cfg).info.input_size == input_size:
        images, _ = verification_batch(cfg, n)
        return images.numpy(), f"{cfg.data.dataset} test split"
    gen = torch.Generator().manual_seed(cfg.seed)
    return torch.randn(n, 3, input_size, input_size, generator=gen).numpy(), "gaussian noise"


@register_stage
class ExportStage(Stage):
    name = "export"
    description = "export ONNX and check it in ONNX Runtime"

    def requires(self, cfg: Config) -> tuple[str, ...]:
        return () if cfg.export.checkpoint else ("fuse", "verify")

    def externals(self, cfg: Config) -> dict[str, str]:
        return {"checkpoint": cfg.export.checkpoint} if cfg.export.checkpoint else {}

    def params(self, cfg: Config) -> dict:
        params = dataclasses.asdict(cfg.export)
        params.pop("checkpoint")
        params["data"] = cfg.data.dataset
        params["seed"] = cfg.seed
        return params

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.cfg
        source = (
            ctx.external_path("checkpoint")
            if "checkpoint" in ctx.external
            else ctx.inputs["fuse"].path(FUSED_CHECKPOINT)
        )
        model, meta = load_model(source)
        if meta.form != "fused":
            model = fuse_model(model)
        metadata = {
            "arch": meta.arch,
            "num_classes": meta.num_classes,
            "input_size": meta.input_size,
            "mean": meta.mean,
            "std": meta.std,
            "class_names": meta.class_names,
            "recipe": meta.recipe,
            "source_sha256": sha256_file(source),
        }
        onnx_path = export_onnx(
            model, ctx.out / ONNX_FP32, meta.input_size, cfg.export.opset, cfg.export.dynamo, metadata
        )
        images, origin = sample_inputs(cfg, meta.input_size, cfg.export.parity_samples)
        reference = batched_logits(model, torch.from_numpy(images), torch.device("cpu")).numpy()
        session = ort_session(onnx_path)
        candidate = ort_run(session, images)
        stats = diff_stats(reference, candidate)
        single = np.concatenate([ort_run(session, images[i : i + 1]) for i in range(min(len(images), 8))])
        batch_stats = diff_stats(candidate[: len(single)], single)
        checks = [
            Check.gate("onnx_fp32_max_abs", "max |ORT - PyTorch|", stats["max_abs"], "onnx.fp32_max_abs"),
            Check.of(
                "onnx_fp32_allclose",
                "fraction beyond atol and rtol",
                allclose_fraction(reference, candidate, atol=1e-4, rtol=1e-3),
                0.0,
            ),
            Check.gate(
                "onnx_top1_agreement", "fraction of equal argmax", stats["top1_agreement"], "onnx.top1_agreement", ">="
            ),
            Check.gate("batch_consistency", "max |alone - in batch|", batch_stats["max_abs"], "onnx.batch_max_abs"),
        ]
        write_json(
            ctx.out / "parity.json", {"inputs": origin, "samples": len(images), "fp32": stats, "batch": batch_stats}
        )
        return StageResult(
            checks=checks,
            metrics={"opset": cfg.export.opset, "dynamo": cfg.export.dynamo, "onnx_max_abs": stats["max_abs"]},
        )
