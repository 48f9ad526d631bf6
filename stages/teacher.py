"""``teacher``: train the teacher on the dataset, or import a given checkpoint and evaluate it."""

from __future__ import annotations

import dataclasses

import torch

from pipeline.checkpoint import ModelMeta, load_state_dict_file, load_strict, save_checkpoint
from pipeline.config import Config
from pipeline.distill import build_distiller
from pipeline.models import build_model
from pipeline.training import evaluate, fit, make_loader
from stages.base import Stage, StageContext, StageResult, register_stage
from stages.common import bundle, data_params, training_params, write_json

CHECKPOINT = "teacher.safetensors"


@register_stage
class TeacherStage(Stage):
    name = "teacher"
    description = "train the teacher, or import --teacher-checkpoint"
    distributed = True

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
        model = build_model(cfg.teacher.arch, data.info.num_classes)
        device = ctx.device
        test_loader = make_loader(data.dataset("test"), cfg.data, train=False, device=device)
        metrics: dict = {}
        if "checkpoint" in ctx.external:
            path = ctx.external_path("checkpoint")
            load_strict(model, load_state_dict_file(path), str(path))
            model.to(device)
            metrics["imported_from"] = str(path)
        else:
            distiller = build_distiller("vanilla", model, None)
            history = fit(
                distiller,
                make_loader(data.dataset("train", augment=True), cfg.data, train=True, seed=cfg.seed, device=device),
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
            write_json(ctx.out / "history.json", history.epochs)
            metrics["val_top1"] = history.last.get("val_top1")
        metrics["test_top1"] = evaluate(model, test_loader, device, desc="teacher test")["top1"]
        meta = ModelMeta.from_data(data.info, cfg.teacher.arch)
        save_checkpoint(ctx.out / CHECKPOINT, model.state_dict(), meta)
        return StageResult(metrics=metrics)
