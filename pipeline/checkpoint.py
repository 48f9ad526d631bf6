"""Weights as safetensors with JSON metadata: nothing here ever unpickles a file.

The metadata says how to rebuild the module the weights belong to (architecture, class count, the
re-parameterization and fusion state), plus what a deployed model must know about its inputs
(size, normalization, class names).
"""

from __future__ import annotations

import json
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
            "or save them with pipeline.checkpoint.save_checkpoint"
        )
    try:
        return ModelMeta(**json.loads(raw))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has malformed pipeline metadata ({exc})") from None


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


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a foreign file: safetensors, or a torch file read with ``weights_only=True``.

    Accepts the common wrappers ``{'model': sd}``, ``{'state_dict': sd}`` and the key prefixes that
    DataParallel/DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) leave, in any nesting.
    """
    path = _existing(path)
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad or unsafe pickles
            raise CheckpointError(f"{path} cannot be loaded as weights with weights_only=True ({exc})") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    while state and (prefix := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


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
    model.load_state_dict(state, strict=True)


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path
