"""Rebuild a model from a checkpoint: architecture, training-time structure, fused form."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.artifacts.checkpoint import (
    ModelMeta,
    has_pipeline_meta,
    load_checkpoint,
    load_state_dict_file,
    load_strict,
)
from pipeline.errors import CheckpointError
from pipeline.models import build_model
from pipeline.models.external import is_external, pretrained_defaults
from pipeline.reparam import apply_reparam, fuse_model


def build_for_meta(meta: ModelMeta) -> nn.Module:
    """An untrained module whose state_dict has exactly the keys and shapes the checkpoint holds."""
    model = build_model(meta.arch, meta.num_classes, meta.input_size)
    if meta.form == "fused":
        return fuse_model(model, inplace=True)
    return apply_reparam(model, meta.reparam)


def load_model(path: str | Path) -> tuple[nn.Module, ModelMeta]:
    """Load a pipeline checkpoint strictly into the module its metadata describes, in eval mode."""
    state, meta = load_checkpoint(path)
    model = build_for_meta(meta)
    load_strict(model, state, str(path))
    return model.eval(), meta


def load_foreign_weights(model: nn.Module, path: str | Path, num_classes: int, dataset: str, log=print) -> None:
    """Load weights made outside the pipeline (safetensors or a torch state-dict file) strictly into ``model``.

    Class-count mismatches are named plainly, and pre-0.4.1 BatchNorm checkpoints are accepted.
    """
    state = load_state_dict_file(path)
    state = select_prefixed(model, state, str(path), log)
    added = fill_legacy_batchnorm(model, state)
    if added:
        log(f"{path} predates PyTorch 0.4.1; added {len(added)} BatchNorm num_batches_tracked counters")
    check_class_count(model, state, num_classes, str(path), dataset)
    load_strict(model, state, str(path))


def foreign_meta(arch: str, data_info, image_size: int | None = None) -> ModelMeta:
    """What to assume about a weights file without pipeline metadata: ``arch`` trained on the configured data.

    A ``timm:``/``torchvision:`` model was trained by its library's scripts with its pretrained config's
    normalization and input size (timm's ``resolve_data_config``), so those are used where the model has
    them; an explicit ``data.image_size`` (``image_size``) still sets the size.
    """
    meta = ModelMeta.from_data(data_info, arch)
    if is_external(arch):
        defaults = pretrained_defaults(arch)
        meta.mean, meta.std = list(defaults.get("mean", meta.mean)), list(defaults.get("std", meta.std))
        meta.input_size = image_size or defaults.get("input_size", meta.input_size)
    return meta


def load_any_model(path: str | Path, describe, log=print) -> tuple[nn.Module, ModelMeta]:
    """A pipeline checkpoint as its metadata describes it; any other weights file as ``describe()`` says.

    ``describe`` returns the :class:`ModelMeta` to assume (architecture and data) for a file without
    pipeline metadata, e.g. a student trained with another codebase.
    """
    if has_pipeline_meta(path):
        return load_model(path)
    meta = describe()
    log(f"{path} has no pipeline metadata: loading it as a {meta.arch} with {meta.num_classes} classes")
    model = build_model(meta.arch, meta.num_classes, meta.input_size)
    try:
        load_foreign_weights(model, path, meta.num_classes, "the configured data", log)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc}. A file without pipeline metadata is read as the configured student: name its architecture "
            "with --set student.arch=NAME (see `models`, or timm:<name> / torchvision:<name>) and its data with "
            "--preset/--data-root or --set data.num_classes=N"
        ) from None
    return model.eval(), meta


def select_prefixed(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, log=print
) -> dict[str, torch.Tensor]:
    """The model's weights when the file keeps them under a wrapper's attribute: a LightningModule's
    ``model.``, a distiller's ``student.``, beside other modules' keys.

    Used only when no key matches the model as is; a prefix is taken when the keys under it are exactly the
    model's (BatchNorm counters aside), and refused by name when several prefixes fit (a teacher and a student
    of the same architecture).
    """
    expected = set(model.state_dict())
    if not expected or expected & set(state):
        return state
    needed = {k for k in expected if not k.endswith(".num_batches_tracked")}
    anchor = min(needed or expected)
    prefixes = sorted({k[: -len(anchor)] for k in state if k.endswith("." + anchor)})
    fits = []
    for prefix in prefixes:
        keys = {k[len(prefix) :] for k in state if k.startswith(prefix)}
        if needed <= keys <= expected:
            fits.append(prefix)
    if len(fits) > 1:
        raise CheckpointError(
            f"{source} holds weights for this architecture under several prefixes ({', '.join(fits)}): save the "
            "one to load alone, without its prefix, as a bare state dict"
        )
    if not fits:
        return state
    prefix = fits[0]
    chosen = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    others = len(state) - len(chosen)
    log(
        f"{source}: loading the {len(chosen)} weights under {prefix!r}"
        + (f", ignoring {others} other keys" if others else "")
    )
    return chosen


def fill_legacy_batchnorm(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Add the ``num_batches_tracked`` counters that checkpoints saved before PyTorch 0.4.1 lack.

    BatchNorm reads the counter only with ``momentum=None``; it fills it in the same way when it loads
    such a checkpoint itself. Returns the keys that were added.
    """
    added = []
    for key, value in model.state_dict().items():
        if key.endswith(".num_batches_tracked") and key not in state:
            prefix = key[: -len("num_batches_tracked")]
            if f"{prefix}running_mean" in state:
                state[key] = torch.zeros_like(value)
                added.append(key)
    return added


def check_class_count(
    model: nn.Module, state: dict[str, torch.Tensor], num_classes: int, source: str, dataset: str = "the dataset"
) -> None:
    """Name a class-count mismatch plainly, before :func:`load_strict` would call it a shape mismatch.

    The keys whose shape depends on the class count are found by building the architecture for one
    more class, so this works for any head (linear or convolutional) without naming its keys.
    """
    expected = model.state_dict()
    differing = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if not differing:
        return
    arch = model.info.name
    other = build_model(arch, num_classes + 1, model.info.input_size).state_dict()
    counts = {}
    for key in differing:
        want, have = list(expected[key].shape), list(state[key].shape)
        axes = [i for i, (a, b) in enumerate(zip(want, other[key].shape)) if a != b]
        if len(axes) != 1 or len(have) != len(want):
            return  # not a class-count difference: load_strict describes it
        counts[key] = have.pop(axes[0])
        if have != want[: axes[0]] + want[axes[0] + 1 :]:
            return
    if len(set(counts.values())) == 1:
        key = max(sorted(counts), key=lambda k: state[k].dim())  # the weight rather than the bias
        raise CheckpointError(
            f"{source} has {counts[key]} outputs ({key}: {tuple(state[key].shape)}) but {dataset} has "
            f"{num_classes} classes; import a {arch} trained on this dataset's classes"
        )
