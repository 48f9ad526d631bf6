"""``verify``: the fused student is numerically the same model as the trained one (design §2).

Both run in fp32 in eval mode on a fixed verification set (the first ``verify.samples`` images of
the test split), with TF32 off on GPUs, since TF32 alone moves logits by about 1e-3. The trained model also
runs in float64: where its own fp32 error is larger than the fixed gates (an ill-conditioned network, e.g. a
random-weight EfficientNetV2 with logits in the hundreds), the gates rise to a few times that error, since the
fused model's other order of operations cannot be held below it.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from pipeline.artifacts.checks import Check, Floor
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


# Two fp32 evaluations of one float64 function differ by up to about twice either one's rounding error; the factor
# leaves as much again for the fused arithmetic's other order of operations.
ROUNDING_FACTOR = 4.0
ROUNDING_CAP = 1e-2  # the most a floor may allow, relative to the logits


def fp32_rounding(
    model: torch.nn.Module, images: torch.Tensor, device: torch.device, logits: torch.Tensor
) -> dict[str, float] | None:
    """How far ``model``'s fp32 ``logits`` are from its float64 ones (``max_abs``, ``rel_fro``): the float error of
    its own arithmetic, which no re-associated (fused) fp32 form of it can be held below. Small for a
    well-conditioned network; large for one whose logits reach hundreds from random weights, where it is what
    makes a fixed gate fail a correct fusion. ``None`` for a model that does not run in float64."""
    try:
        exact = batched_logits(copy.deepcopy(model).double(), images, device, dtype=torch.float64)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):  # an op without a float64 kernel
        return None
    stats = diff_stats(exact, logits.double())
    return {"max_abs": stats["max_abs"], "rel_fro": stats["rel_fro"]}


def rounding_floors(rounding: dict[str, float] | None, scale: float) -> dict[str, Floor]:
    """The gates' floors from :func:`fp32_rounding`: a fused model may differ from the trained one by
    :data:`ROUNDING_FACTOR` times the trained model's own fp32 error, whatever the fixed gate says, but never by
    more than :data:`ROUNDING_CAP` of the logits (``scale``: their max abs): a model whose fp32 arithmetic is that far
    from exact cannot be verified in fp32, and fails."""
    if not rounding:
        return {}
    caps = {"max_abs": ROUNDING_CAP * scale, "rel_fro": ROUNDING_CAP}
    labels = {"max_abs": "max |fp32 - float64|", "rel_fro": "‖fp32 - float64‖F / ‖float64‖F"}
    floors = {}
    for key, label in labels.items():
        value = min(ROUNDING_FACTOR * rounding[key], caps[key])
        why = f"{ROUNDING_FACTOR:g} x the trained model's own fp32 error, {label} {rounding[key]:.3g}"
        floors[key] = Floor(value, why + (f", capped at {ROUNDING_CAP:g} of the logits" if value == caps[key] else ""))
    return floors


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
            rounding = fp32_rounding(trained, images, ctx.device, reference)
        stats = diff_stats(reference, candidate)
        top1_ref, top1_fused = top1_accuracy(reference, labels), top1_accuracy(candidate, labels)
        floors = rounding_floors(rounding, magnitude(reference))
        checks = [
            Check.scaled(
                "logits_max_abs",
                "max |fused - trained|",
                stats["max_abs"],
                "fuse.logits_max_abs",
                "fuse.logits_rtol",
                magnitude(reference),
                floors.get("max_abs"),
            ),
            Check.gate(
                "logits_rel_fro", "‖fused - trained‖F / ‖trained‖F", stats["rel_fro"], "fuse.logits_rel_fro"
            ).raised_to(floors.get("rel_fro")),
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
            "fp32_rounding": rounding,  # the trained model's fp32 logits against its float64 ones (None: no float64)
            "top1_trained": top1_ref,
            "top1_fused": top1_fused,
            "abs_diff_histogram": abs_diff_histogram(reference, candidate),  # for the HTML report
        }
        write_json(ctx.out / REPORT, report)
        return StageResult(
            checks=checks, metrics={"max_abs": stats["max_abs"], "top1_fused": top1_fused, "samples": len(labels)}
        )
