"""``fuse``: fold the student's training-time branches and BatchNorms into its plain convs.

The fused student must be exactly the deploy form of the vanilla architecture: same state_dict keys
and shapes as a freshly built vanilla student with its BatchNorms folded, same parameter count, same
FLOPs. Numerical equivalence is the ``verify`` stage's job.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.artifacts.checkpoint import ModelMeta, save_checkpoint
from pipeline.artifacts.checks import Check
from pipeline.config import Config
from pipeline.errors import library_errors
from pipeline.models import count_parameters
from pipeline.models.loading import build_for_meta, load_model
from pipeline.reparam import fuse_model
from pipeline.reparam.multibranch import block_fusion_errors
from pipeline.stage_files import FUSED_CHECKPOINT, STUDENT_CHECKPOINT
from stages.base import Stage, StageContext, StageResult, register_stage

CHECKPOINT = FUSED_CHECKPOINT
BLOCK_CHECK_IMAGES = 8


def count_flops(model: torch.nn.Module, input_size: int) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    return counter.get_total_flops()


def fuse_checks(fused: torch.nn.Module, meta: ModelMeta) -> tuple[list[Check], dict]:
    """Compare a fused student with the deploy form of a freshly built vanilla student."""
    reference = build_for_meta(meta)
    ref_state, state = reference.state_dict(), fused.state_dict()
    same_keys = set(ref_state) == set(state) and all(ref_state[k].shape == state[k].shape for k in state)
    loads = True
    try:
        reference.load_state_dict(state, strict=True)
    except RuntimeError:
        loads = False
    params, ref_params = count_parameters(fused), count_parameters(reference)
    flops, ref_flops = count_flops(fused, meta.input_size), count_flops(reference, meta.input_size)
    checks = [
        Check.of("strict_load_into_vanilla_deploy_form", "loads", float(loads and same_keys), 1.0, "=="),
        Check.of("parameter_count", "fused - vanilla", params - ref_params, 0, "=="),
        Check.of("flops", "fused - vanilla", flops - ref_flops, 0, "=="),
    ]
    return checks, {"parameters": params, "flops": flops}


def block_checks(student: torch.nn.Module, input_size: int) -> list[Check]:
    """One gate per m-branch block: its fused conv vs the eval-mode branch mean, on a fixed random batch."""
    images = torch.randn(BLOCK_CHECK_IMAGES, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    return [
        Check.scaled(
            f"block_max_abs[{name}]",
            "max |fused conv - mean of branches|",
            stats["max_abs"],
            "fuse.block_max_abs",
            "fuse.block_rtol",
            stats["scale"],
        )
        for name, stats in block_fusion_errors(student, images).items()
    ]


@register_stage
class FuseStage(Stage):
    name = "fuse"
    outputs = (CHECKPOINT,)
    description = "fold branches and BatchNorms into the plain student"

    def requires(self, cfg: Config) -> tuple[str, ...]:
        return ("train",)

    def params(self, cfg: Config) -> dict:
        return {}

    def run(self, ctx: StageContext) -> StageResult:
        student, meta = load_model(ctx.inputs["train"].path(STUDENT_CHECKPOINT))
        with library_errors("fuse", "re-parameterization and BatchNorm folding", meta.arch):  # one line
            fused = fuse_model(student)
        fused_meta = dataclasses.replace(meta, form="fused")
        checks, metrics = fuse_checks(fused, fused_meta)
        blocks = block_checks(student, meta.input_size)
        checks += blocks
        metrics["unfused_parameters"] = count_parameters(student)
        metrics["fused_blocks"] = len(blocks)
        save_checkpoint(ctx.out / CHECKPOINT, fused.state_dict(), fused_meta)
        return StageResult(checks=checks, metrics=metrics)
