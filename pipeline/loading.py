"""Rebuild a model from a checkpoint: architecture, training-time structure, fused form."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from pipeline.checkpoint import ModelMeta, load_checkpoint, load_strict
from pipeline.models import build_model
from pipeline.reparam import apply_reparam, fuse_model


def build_for_meta(meta: ModelMeta) -> nn.Module:
    """An untrained module whose state_dict has exactly the keys and shapes the checkpoint holds."""
    model = build_model(meta.arch, meta.num_classes)
    if meta.form == "fused":
        return fuse_model(model, inplace=True)
    return apply_reparam(model, meta.reparam)


def load_model(path: str | Path) -> tuple[nn.Module, ModelMeta]:
    """Load a pipeline checkpoint strictly into the module its metadata describes, in eval mode."""
    state, meta = load_checkpoint(path)
    model = build_for_meta(meta)
    load_strict(model, state, str(path))
    return model.eval(), meta
