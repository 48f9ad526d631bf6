"""``teacher``: train the teacher on the dataset, or import a given checkpoint and evaluate it."""

from __future__ import annotations

import dataclasses

import torch

from pipeline.artifacts.checkpoint import ModelMeta, save_checkpoint
from pipeline.config import Config
from pipeline.data import DataBundle
from pipeline.distill.vanilla import Vanilla
from pipeline.errors import ConfigError
from pipeline.models import build_model, list_models, model_info
from pipeline.models.loading import load_foreign_weights
from pipeline.stage_files import HISTORY, TEACHER_CHECKPOINT
from pipeline.training import check_optim, evaluate, fit, make_loader
from pipeline.training.speed import describe as describe_speed
from stages.base import Stage, StageContext, StageResult, register_stage
from stages.support.kit import bundle, data_params, training_params, write_json

CHECKPOINT = TEACHER_CHECKPOINT
SOURCES = ("auto", "import", "train")


@register_stage
class TeacherStage(Stage):
    name = "teacher"
    outputs = (CHECKPOINT,)
    description = "train the teacher, or import --teacher-checkpoint"
    distributed = True

    def validate(self, cfg: Config) -> None:
        check_teacher_source(cfg)
        if not cfg.teacher.checkpoint:
            check_optim(cfg.teacher.optim, "teacher.optim")

    def externals(self, cfg: Config) -> dict[str, str]:
        return {"checkpoint": cfg.teacher.checkpoint} if cfg.teacher.checkpoint else {}

    def params(self, cfg: Config) -> dict:
        params = {"arch": cfg.teacher.arch, "data": data_params(cfg), "seed": cfg.seed}
        if not cfg.teacher.checkpoint:
            params["optim"] = dataclasses.asdict(cfg.teacher.optim)
            params["training"] = training_params(cfg)
        return params

    def run(self, ctx: StageContext) -> StageResult:
        cfg, data = ctx.cfg, bundle(ctx.cfg)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.teacher.arch, data.info.num_classes, data.info.input_size)
        device = ctx.device
        test_loader = make_loader(data.dataset("test"), cfg.data, train=False, device=device)
        metrics: dict = {}
        if "checkpoint" in ctx.external:
            metrics.update(import_teacher(ctx, model, data))
        else:
            distiller = Vanilla(model)
            history = fit(
                distiller,
                make_loader(
                    data.dataset("train", augment=True),
                    cfg.data,
                    train=True,
                    seed=cfg.seed,
                    device=device,
                    on_device=cfg.training.device_data,
                ),
                make_loader(data.dataset("val"), cfg.data, train=False, device=device)
                if len(data.source("val"))
                else None,
                cfg.teacher.optim,
                device,
                scratch=ctx.scratch,
                log=ctx.log,
                desc="teacher",
                seed=cfg.seed,
                training=cfg.training,
                logdir=ctx.logdir,
            )
            write_json(ctx.out / HISTORY, history.epochs)
            metrics["val_top1"] = history.last.get("val_top1")
            metrics["training_speed"] = describe_speed(cfg.training, device)  # what any `auto` became here
        metrics["test_top1"] = evaluate(model, test_loader, device, desc="teacher test")["top1"]
        if "checkpoint" in ctx.external:
            report_import(ctx, metrics["test_top1"], data.info.num_classes)
        meta = ModelMeta.from_data(data.info, cfg.teacher.arch)
        save_checkpoint(ctx.out / CHECKPOINT, model.state_dict(), meta)
        return StageResult(metrics=metrics)


def check_teacher_source(cfg: Config) -> None:
    """``teacher.source=import`` (the paper presets) needs a checkpoint: training a teacher by mistake
    costs hours and gives a different teacher from the one the expected figures were measured with."""
    source, arch = cfg.teacher.source, cfg.teacher.arch
    if source not in SOURCES:
        raise ConfigError(f"teacher.source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "import" and not cfg.teacher.checkpoint:
        example = ""
        if arch in _zoo_names():
            example = f", e.g. {arch}_vanilla/ckpt_epoch_240.pth from the RepDistiller / mdistiller teacher zoo"
        raise ConfigError(
            f"{cfg.name!r} imports its {arch} teacher: pass --teacher-checkpoint FILE (safetensors or a state dict"
            f"{example}), or train one here with --set teacher.source=train ({cfg.teacher.optim.epochs} epochs)"
        )
    if source == "train" and cfg.teacher.checkpoint:
        raise ConfigError("teacher.source=train conflicts with --teacher-checkpoint; drop one of them")


def _zoo_names() -> set[str]:
    return {name for name in list_models() if model_info(name).family == "cifar"}


def import_teacher(ctx: StageContext, model: torch.nn.Module, data: DataBundle) -> dict:
    """Load ``--teacher-checkpoint`` strictly into ``model`` (class count checked first) and score it on
    the held-out split; the caller scores it on the test split like a trained teacher."""
    path = ctx.external_path("checkpoint")
    load_foreign_weights(model, path, data.info.num_classes, f"dataset {data.info.name!r}", ctx.log)
    model.to(ctx.device)
    metrics = {"imported_from": str(path)}
    if len(data.source("val")):
        val_loader = make_loader(data.dataset("val"), ctx.cfg.data, train=False, device=ctx.device)
        metrics["val_top1"] = evaluate(model, val_loader, ctx.device, desc="teacher val")["top1"]
    return metrics


def report_import(ctx: StageContext, test_top1: float, num_classes: int) -> None:
    expected = ctx.cfg.expected_top1("teacher")
    ctx.log(f"teacher: imported, test top-1 {test_top1:.2f}%" + (f" (expected {expected})" if expected else ""))
    chance = 100.0 / num_classes
    if test_top1 < 2 * chance:
        ctx.log(
            f"WARNING: the imported teacher scores {test_top1:.2f}%, near chance ({chance:.2f}%): check that it was "
            "trained on this dataset with the same class order and normalization"
        )
