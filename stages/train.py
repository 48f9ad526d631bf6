"""``train``: distill the student from the teacher with the configured method."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pipeline.artifacts.checkpoint import ModelMeta, save_checkpoint
from pipeline.config import Config
from pipeline.data import WithIndices
from pipeline.distill.catalog import build_distiller, resolve_method_args
from pipeline.errors import CheckpointError
from pipeline.models import build_model, count_parameters
from pipeline.models.loading import load_model
from pipeline.stage_files import HISTORY, STUDENT_CHECKPOINT, TEACHER_CHECKPOINT
from pipeline.training import History, check_optim, evaluate, fit, make_loader
from pipeline.training.speed import describe as describe_speed
from stages.base import Stage, StageContext, StageResult, register_stage
from stages.support.kit import bundle, data_params, training_params, write_json

CHECKPOINT = STUDENT_CHECKPOINT


@register_stage
class TrainStage(Stage):
    name = "train"
    outputs = (CHECKPOINT, HISTORY)
    description = "distill the student (--method)"
    distributed = True

    def requires(self, cfg: Config) -> tuple[str, ...]:
        return ("teacher",)

    def validate(self, cfg: Config) -> None:
        check_optim(cfg.student.optim, "student.optim")

    def params(self, cfg: Config) -> dict:
        method_args, _ = resolve_method_args(cfg.student.method, cfg.student.method_args, cfg.student.optim.epochs)
        return {
            "arch": cfg.student.arch,
            "method": cfg.student.method,
            "method_args": method_args,  # as built: a warm-up left unset is scaled to the run
            "optim": dataclasses.asdict(cfg.student.optim),
            "training": training_params(cfg),
            "data": data_params(cfg),
            "seed": cfg.seed,
        }

    def run(self, ctx: StageContext) -> StageResult:
        cfg, data, device = ctx.cfg, bundle(ctx.cfg), ctx.device
        teacher, teacher_meta = load_model(ctx.inputs["teacher"].path(TEACHER_CHECKPOINT))
        if teacher_meta.num_classes != data.info.num_classes:
            raise CheckpointError(
                f"the teacher has {teacher_meta.num_classes} classes but the dataset has {data.info.num_classes}"
            )
        torch.manual_seed(cfg.seed)
        student = build_model(cfg.student.arch, data.info.num_classes, data.info.input_size)
        vanilla_params = count_parameters(student)
        train_set = data.dataset("train", augment=True)
        method_args, warmup_note = resolve_method_args(
            cfg.student.method, cfg.student.method_args, cfg.student.optim.epochs
        )
        distiller = build_distiller(cfg.student.method, student, teacher, method_args, num_samples=len(train_set))
        if distiller.needs_indices:
            train_set = WithIndices(train_set)
        if warmup_note:
            ctx.log(f"[train] {warmup_note}")
        for note in distiller.notes():
            ctx.log(f"[train] {note}")
        test_loader = make_loader(data.dataset("test"), cfg.data, train=False, device=device)
        history = fit(
            distiller,
            make_loader(
                train_set, cfg.data, train=True, seed=cfg.seed, device=device, on_device=cfg.training.device_data
            ),
            make_loader(data.dataset("val"), cfg.data, train=False, device=device) if len(data.source("val")) else None,
            cfg.student.optim,
            device,
            scratch=ctx.scratch,
            log=ctx.log,
            desc=f"student ({cfg.student.method})",
            seed=cfg.seed,
            training=cfg.training,
            logdir=ctx.logdir,
            # per-epoch test top-1 in history.json, for `compare --best`; each pass costs a test-split evaluation
            test_loader=test_loader if cfg.training.test_each_epoch else None,
        )
        student = distiller.student
        meta = ModelMeta.from_data(data.info, cfg.student.arch, reparam=distiller.reparam_settings())
        save_checkpoint(ctx.out / CHECKPOINT, student.state_dict(), meta)
        write_json(ctx.out / HISTORY, history.epochs)
        return StageResult(
            metrics={
                "test_top1": _final_test_top1(history, student, test_loader, device),
                "teacher_test_top1": ctx.inputs["teacher"].manifest.metrics.get("test_top1"),
                "val_top1": history.last.get("val_top1"),
                "train_parameters": count_parameters(student),
                "vanilla_parameters": vanilla_params,
                "training_speed": describe_speed(cfg.training, device),  # what any `auto` became here
            }
        )


def _final_test_top1(history: History, student: nn.Module, loader, device: torch.device) -> float:
    """The last epoch's test score is that of the final weights: reuse it rather than score them twice."""
    last = history.last.get("test_top1")
    return last if last is not None else evaluate(student, loader, device, desc="student test")["top1"]
