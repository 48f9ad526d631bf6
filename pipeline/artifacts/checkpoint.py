"""Weights as safetensors with JSON metadata: nothing here ever unpickles a file.

The metadata says how to rebuild the module the weights belong to (architecture, class count, the
re-parameterization and fusion state), plus what a deployed model must know about its inputs
(size, normalization, class names).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

try:
    from safetensors import SafetensorError
except ImportError:  # older safetensors keep it in the compiled module only
    from safetensors._safetensors_rust import SafetensorError

from pipeline.errors import CheckpointError

Form = Literal["train", "fused"]
_KEY = "pipeline"


@dataclass
class ModelMeta:
    arch: str
    num_classes: int
    input_size: int
    mean: list[float]
    std: list[float]
    class_names: list[str] = field(default_factory=list)
    form: Form = "train"  # "train": as trained (may hold m-branch blocks); "fused": deploy form
    reparam: dict = field(default_factory=dict)  # m-branch settings used in training, {} when none
    recipe: str = "cifar"
    color: str = "rgb"  # "gray": trained on grayscale images replicated to three channels
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_data(cls, info, arch: str, **kwargs) -> ModelMeta:
        """Metadata for a model of ``arch`` trained on data described by a :class:`DataInfo`."""
        return cls(
            arch=arch,
            num_classes=info.num_classes,
            input_size=info.input_size,
            mean=list(info.mean),
            std=list(info.std),
            class_names=list(info.class_names),
            recipe=info.recipe,
            color=info.color,
            **kwargs,
        )


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], meta: ModelMeta) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={_KEY: json.dumps(asdict(meta), sort_keys=True)})


def read_meta(path: str | Path) -> ModelMeta:
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    if raw is None:
        raise CheckpointError(
            f"{path} has no pipeline metadata; import foreign weights with --teacher-checkpoint, "
            "or save them with pipeline.artifacts.checkpoint.save_checkpoint"
        )
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        meta = ModelMeta(**data)
    except (TypeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} has malformed pipeline metadata ({str(exc)[:120]})") from None
    problem = meta_problem(meta)
    if problem:
        raise CheckpointError(f"{path} has malformed pipeline metadata: {problem}")
    return meta


MAX_CLASSES = 1 << 20  # far beyond any dataset; a crafted count must not size a 5e15-byte classifier


def meta_problem(meta: ModelMeta) -> str:
    """What is wrong with metadata read from a file (types, sizes, the re-parameterization record), or ``""``.

    Checked before any model is built from it: the class count and the settings size allocations.
    """

    def is_int(value, low: int, high: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    def floats(value) -> bool:
        return (
            isinstance(value, list)
            and len(value) == 3
            and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        )

    if not isinstance(meta.arch, str) or not meta.arch:
        return "arch must be a model name"
    if not is_int(meta.num_classes, 1, MAX_CLASSES):
        return f"num_classes must be an integer in [1, {MAX_CLASSES}], got {str(meta.num_classes)[:40]}"
    if not is_int(meta.input_size, 8, 8192):
        return f"input_size must be an integer in [8, 8192], got {str(meta.input_size)[:40]}"
    if not floats(meta.mean) or not floats(meta.std) or not all(v > 0 for v in meta.std):
        return "mean and std must be three finite numbers each (std positive)"
    if not isinstance(meta.class_names, list) or not all(isinstance(n, str) for n in meta.class_names):
        return "class_names must be a list of strings"
    if meta.class_names and len(meta.class_names) != meta.num_classes:
        return f"{len(meta.class_names)} class_names for {meta.num_classes} classes"
    if meta.form not in ("train", "fused"):
        return f"form must be 'train' or 'fused', got {str(meta.form)[:40]!r}"
    if meta.recipe not in ("cifar", "imagenet") or meta.color not in ("rgb", "gray"):  # they set the preprocessing
        got = f"{meta.recipe!r:.40} and {meta.color!r:.40}"
        return f"recipe must be 'cifar' or 'imagenet' and color 'rgb' or 'gray', got {got}"
    if not isinstance(meta.extra, dict):
        return "extra must be a mapping"
    if not isinstance(meta.reparam, dict):
        return "reparam must be a mapping"
    if meta.reparam:
        kind, sites = meta.reparam.get("kind"), meta.reparam.get("sites")
        if not isinstance(kind, str):
            return "reparam has no 'kind'"
        if not isinstance(sites, list) or not all(
            isinstance(site, list) and len(site) == 2 and all(isinstance(p, str) for p in site) for site in sites
        ):
            return "reparam.sites must be a list of [conv, bn] module paths"
        if "m" in meta.reparam and not is_int(meta.reparam["m"], 1, 64):
            return "reparam.m must be an integer in [1, 64]"
        if not all(isinstance(meta.reparam.get(k, False), bool) for k in ("mixed_kernels", "scale_init")):
            return "reparam.mixed_kernels and reparam.scale_init must be true or false"
    return ""


def has_pipeline_meta(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`save_checkpoint` (unreadable files say no)."""
    from safetensors import safe_open

    try:
        with safe_open(str(_existing(path)), framework="pt") as f:
            return _KEY in (f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return False


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelMeta]:
    meta = read_meta(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({exc})") from None
    return state, meta


WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Where a checkpoint dict keeps the weights, first found wins: torchvision's references write ``model``
# (and ``model_ema``), timm's train.py ``state_dict`` (and ``state_dict_ema`` with --model-ema).
WEIGHT_KEYS = ("model", "state_dict", "model_state_dict", "state_dict_ema", "model_ema")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a foreign file: safetensors, or a torch file read with ``weights_only=True``.

    Accepts a bare state dict or a training script's checkpoint dict (the first of :data:`WEIGHT_KEYS`
    it holds, else its only entry that is a state dict; other entries such as ``optimizer``, ``epoch`` or the
    ``args`` Namespace are ignored) and the key prefixes that DataParallel/DDP (``module.``) and
    ``torch.compile`` (``_orig_mod.``) leave, in any nesting.
    """
    path = _existing(path)
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    else:
        try:
            # timm's and torchvision's training scripts also save their argparse options (``args``)
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad or unsafe pickles
            raise _unloadable(path, exc) from None
    for key in WEIGHT_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            if key == "model_ema":  # torchvision's ExponentialMovingAverage: an AveragedModel of the model
                state = {k: v for k, v in state.items() if k != "n_averaged"}
            break
    else:
        state = _only_nested_state_dict(path, state)
    if not _is_state_dict(state):
        keys = f" (its keys: {', '.join(map(str, list(state)[:6]))})" if isinstance(state, dict) else ""
        raise CheckpointError(f"{path} does not hold a state dict of tensors{keys}")
    while state and (prefix := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _is_state_dict(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())


def _only_nested_state_dict(path: Path, state: object) -> object:
    """A checkpoint dict under a key of its own making (``net`` in many CIFAR repositories, ``student``...):
    its one entry that is a state dict; several are ambiguous and refused by name."""
    if not isinstance(state, dict) or _is_state_dict(state):
        return state
    nested = [key for key, value in state.items() if _is_state_dict(value) and value]
    if len(nested) > 1:
        raise CheckpointError(
            f"{path} holds several state dicts ({', '.join(map(str, nested))}): save the one to load as a bare "
            "state dict (torch.save(ckpt[KEY], 'weights.pth'))"
        )
    return state[nested[0]] if nested else state


def _unloadable(path: Path, exc: Exception) -> CheckpointError:
    """Why ``weights_only`` refused a file: the pickled classes by name when that is the cause, not torch's
    advice to unpickle them (which runs the file's code)."""
    try:
        # the file's own classes (a model's) before torch's building blocks
        names = sorted(
            torch.serialization.get_unsafe_globals_in_checkpoint(str(path)), key=lambda n: (n.startswith("torch."), n)
        )
    except Exception:  # not a zip checkpoint (legacy format, or not torch at all): torch's message names one
        names = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))[:1]
    if not names:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return CheckpointError(f"{path} cannot be loaded as weights with weights_only=True ({first})")
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    model = any(n.startswith("torch.nn.modules.") for n in names)
    what = "a pickled model, not its weights" if model else "pickled Python objects besides the weights"
    return CheckpointError(
        f"{path} holds {what} ({shown}); unpickling them would run code from the file, so it is not loaded "
        "(weights_only=True). Where you trust the file, save only the weights and pass that file: "
        "torch.save(model.state_dict(), 'weights.pth')"
    )


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a message a user can act on."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            k = sorted(shapes)[0]
            parts.append(
                f"{len(shapes)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)})"
            )
        arch = getattr(getattr(model, "info", None), "name", type(model).__name__)
        raise CheckpointError(f"{source} does not fit architecture {arch}: " + "; ".join(parts))
    for key in sorted(expected):  # load_state_dict would cast int or complex into float weights without a word
        problem = _value_problem(state[key], expected[key])
        if problem:
            raise CheckpointError(f"{source}: {key} {problem}")
    if getattr(state, "_metadata", None) is None:
        # safetensors holds tensors only; modules that version their state (torchvision's MNASNet) read the
        # version record torch.save keeps beside them, so give them the freshly built model's
        state = collections.OrderedDict(state)
        state._metadata = getattr(expected, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)


def _value_problem(value: torch.Tensor, expected: torch.Tensor) -> str:
    """Why ``value`` cannot stand for the model's tensor ``expected``: its layout, kind of number, or NaN/inf."""
    if value.layout != torch.strided or value.is_quantized:
        return f"is a {str(value.layout).removeprefix('torch.')} tensor; save it as a plain one (tensor.to_dense())"
    if value.is_complex() or (expected.is_floating_point() and not value.is_floating_point()):
        return f"holds {str(value.dtype).removeprefix('torch.')} numbers where the model has floating-point weights"
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        return f"holds {bad} NaN or infinite values: weights from a run that diverged; use an earlier checkpoint"
    return ""


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path
