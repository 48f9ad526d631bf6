"""``verify``: the fused student is numerically the same model as the trained one (design §2).

Both run in fp32 in eval mode on a fixed verification set (the first ``verify.samples`` images of
the test split), with TF32 off on GPUs, since TF32 alone moves logits by about 1e-3.
"""

from __future__ import annotations

import contextlib

import torch

from pipeline.artifacts.checks import Check
from pipeline.compare import abs_diff_histogram, diff_stats, magnitude, tie_detail, top1_accuracy
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.models.loading import load_model
from pipeline.stage_files import FUSED_CHECKPOINT, REPORT, STUDENT_CHECKPOINT
from stages.base import Stage, StageContext, StageResult, register_stage
from stages.support.kit import batched_logits, bundle, write_json


@contextlib.contextmanager
def tf32_disabled():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def verification_batch(cfg: Config, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``samples`` test images, evaluation transform, in a fixed order."""
    test = bundle(cfg).dataset("test")
    n = min(samples, len(test))
    items = [test[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


@register_stage
class VerifyStage(Stage):
    name = "verify"
    outputs = (REPORT,)
    description = "check the fused student against the trained one"

    def requires(self, cfg: Config) -> tuple[str, ...]:
        return ("train", "fuse")

    def validate(self, cfg: Config) -> None:
        if cfg.verify.samples < 1:
            raise ConfigError(f"verify.samples must be at least 1, got {cfg.verify.samples}")

    def params(self, cfg: Config) -> dict:
        return {"samples": cfg.verify.samples, "data": cfg.data.dataset, "seed": cfg.seed}

    def run(self, ctx: StageContext) -> StageResult:
        trained, _ = load_model(ctx.inputs["train"].path(STUDENT_CHECKPOINT))
        fused, _ = load_model(ctx.inputs["fuse"].path(FUSED_CHECKPOINT))
        images, labels = verification_batch(ctx.cfg, ctx.cfg.verify.samples)
        with tf32_disabled():
            reference = batched_logits(trained, images, ctx.device)
            candidate = batched_logits(fused, images, ctx.device)
        stats = diff_stats(reference, candidate)
        top1_ref, top1_fused = top1_accuracy(reference, labels), top1_accuracy(candidate, labels)
        checks = [
            Check.scaled(
                "logits_max_abs",
                "max |fused - trained|",
                stats["max_abs"],
                "fuse.logits_max_abs",
                "fuse.logits_rtol",
                magnitude(reference),
            ),
            Check.gate("logits_rel_fro", "‖fused - trained‖F / ‖trained‖F", stats["rel_fro"], "fuse.logits_rel_fro"),
            Check.gate(
                "top1_agreement",
                "fraction of equal argmax, near-ties excused",
                stats["top1_agreement"],
                "fuse.top1_agreement",
                ">=",
                detail=tie_detail(stats),
            ),
            Check.gate(
                "top1_delta", "|top1 fused - top1 trained| (pt)", abs(top1_fused - top1_ref), "fuse.top1_delta_pt"
            ),
        ]
        report = {
            "samples": len(labels),
            "device": str(ctx.device),
            "stats": stats,
            "top1_trained": top1_ref,
            "top1_fused": top1_fused,
            "abs_diff_histogram": abs_diff_histogram(reference, candidate),  # for the HTML report
        }
        write_json(ctx.out / REPORT, report)
        return StageResult(
            checks=checks, metrics={"max_abs": stats["max_abs"], "top1_fused": top1_fused, "samples": len(labels)}
        )
