"""Every distillation method, by registry name: build one, list them, check their options.

Imports every method module, so whatever imports this depends on every method's code (pipeline.artifacts.code_version):
the ``train`` stage, which builds the configured method, and the checks run before any stage.
"""

from __future__ import annotations

import inspect
import math

from torch import nn

from pipeline.distill import at, crd, dkd, fitnet, kd, kdiffusion, ofd, reviewkd, vanilla, vid  # noqa: F401 (registers)
from pipeline.distill.base import METHODS, Bound, Distiller
from pipeline.errors import ConfigError

__all__ = [
    "METHODS",
    "build_distiller",
    "check_method_args",
    "method_names",
    "method_options",
    "option_types",
    "resolve_method_args",
]

REFERENCE_EPOCHS = 240  # the run length the methods' default warm-ups were chosen for (mdistiller's CIFAR-100)


def method_names() -> list[str]:
    return METHODS.names()


def build_distiller(
    name: str, student: nn.Module, teacher: nn.Module | None, args: dict | None = None, num_samples: int | None = None
) -> Distiller:
    """Instantiate method ``name`` with ``args`` (from ``student.method_args``), checking the names first.

    ``num_samples`` (the training set's size) goes to methods with ``needs_indices`` (memory banks).
    """
    cls = check_method_args(name, args)
    args = dict(args or {})
    if cls.requires_teacher and teacher is None:
        raise ConfigError(f"method {name!r} needs a teacher")
    if cls.needs_indices:
        if num_samples is None or num_samples < 1:
            raise ConfigError(f"method {name!r} keeps per-sample state and needs the training set's size")
        args["num_samples"] = num_samples
    try:
        return cls(student, teacher, **args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"method {name!r}: {exc}") from None


def resolve_method_args(name: str, args: dict | None, epochs: int) -> tuple[dict, str]:
    """``args`` with a ``warmup_epochs`` the user left unset scaled to this run: the default's fraction of
    :data:`REFERENCE_EPOCHS` of ``epochs`` (20 of 240, so 1.67 of 20), as the default would ramp the feature
    losses over a whole short run. Returns the args and a line saying what was used ('' when nothing was)."""
    args = dict(args or {})
    if "warmup_epochs" not in method_options(name) or "warmup_epochs" in args:
        return args, ""
    default = inspect.signature(METHODS.get(name).__init__).parameters["warmup_epochs"].default
    args["warmup_epochs"] = round(default * epochs / REFERENCE_EPOCHS, 4)
    note = (
        f"warmup_epochs={args['warmup_epochs']:g}: the default {default:g} of {REFERENCE_EPOCHS} epochs scaled to"
        f" this run's {epochs} (set student.method_args.warmup_epochs to choose)"
    )
    return args, note


def method_options(name: str) -> set[str]:
    """The option names method ``name`` accepts in ``student.method_args``."""
    injected = ("self", "student", "teacher", "num_samples")
    return {
        p.name
        for p in inspect.signature(METHODS.get(name).__init__).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in injected
    }


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def option_types(name: str) -> dict[str, type]:
    """Each option's type, from the annotations of the method's ``__init__`` (or its default's type)."""
    types = {}
    for param in inspect.signature(METHODS.get(name).__init__).parameters.values():
        if param.name in method_options(name):
            annotation = param.annotation
            kind = _TYPES.get(annotation, annotation) if isinstance(annotation, str) else annotation
            if kind is inspect.Parameter.empty:
                kind = type(param.default)
            types[param.name] = kind
    return types


def check_method_args(name: str, args: dict | None) -> type[Distiller]:
    """The method class, once ``args`` are known options with values of the right type and range; no model is
    built.

    The runner calls this before any stage runs, so a typo in ``method_args`` never costs a teacher run.
    """
    accepted = method_options(name)
    cls = METHODS.get(name)
    args = dict(args or {})
    unknown = sorted(set(args) - accepted)
    if unknown:
        raise ConfigError(
            f"method {name!r} has no option {str(unknown[0])[:60]!r}; "
            f"its options: {', '.join(sorted(accepted)) or 'none'}"
        )
    kinds = option_types(name)
    for key, value in args.items():
        problem = _option_problem(kinds[key], cls.option_bounds.get(key), value)
        if problem:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ConfigError(f"method {name!r}: option {key} {problem}, got {shown}")
    try:
        cls.check_args(args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"method {name!r}: {exc}") from None
    return cls


def _option_problem(kind: type, bound: Bound | None, value: object) -> str:
    """Why ``value`` is not a valid option of type ``kind`` within ``bound``, or ``""``."""
    if kind is bool:
        return "" if isinstance(value, bool) else "must be true or false"
    if kind is str:
        return "" if isinstance(value, str) else "must be a string"
    if kind in (int, float):
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or (kind is int and not isinstance(value, int)):
            return f"must be {'an integer' if kind is int else 'a number'}"
        if isinstance(value, int) and abs(value) > 2**53:
            return "is out of range"
        if not math.isfinite(value):
            return "must be a finite number"
        return bound.problem(value) if bound else ""
    return ""
