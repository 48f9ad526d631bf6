"""Any timm or torchvision classifier by name: ``timm:<name>`` and ``torchvision:<name>``.

These models are not in the zoo's registry: they are built on demand (never with downloaded weights:
timm with ``pretrained=False``, torchvision with ``weights=None``) for the run's class count and input
size, and their :class:`ModelInfo` (feature taps, KDiffusion sites, teacher head) is found by probing
the built model (:mod:`pipeline.models.autotap`) instead of being declared by hand.

The built model is the library's own module, unchanged except that in-place activations are switched
to out-of-place (same function and state_dict), so a tensor a hook captured is never overwritten.
"""

from __future__ import annotations

import difflib
import functools

from torch import nn

from pipeline.errors import ConfigError, one_line, raised_in_library
from pipeline.models.spec import ModelInfo

__all__ = ["LIBRARIES", "build_external", "check_external", "external_info", "is_external", "pretrained_defaults"]

LIBRARIES = ("timm", "torchvision")
# what a library model raises for an input size or option it does not take (timm asserts, ValueErrors, ...)
MODEL_ERRORS = (RuntimeError, ValueError, AssertionError, TypeError, IndexError)


def split_name(name: str) -> tuple[str, str] | None:
    """``("timm", "resnet50")`` for ``"timm:resnet50"``; ``None`` for a zoo name."""
    lib, sep, model = name.partition(":")
    return (lib, model) if sep and lib in LIBRARIES else None


def is_external(name: str) -> bool:
    return split_name(name) is not None


@functools.cache
def _names(lib: str) -> tuple[str, ...]:
    if lib == "timm":
        import timm

        return tuple(timm.list_models())
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def check_external(name: str) -> None:
    """Refuse an unknown ``timm:``/``torchvision:`` name in one line that lists the closest names."""
    lib, model = split_name(name) or ("", "")
    if not lib:
        raise ConfigError(f"{name!r} is not a timm: or torchvision: model name")
    base = model
    if lib == "timm":
        from timm.models import split_model_name_tag

        base = split_model_name_tag(model)[0]
    names = _names(lib)
    if base in names:
        if base != model and not pretrained_defaults(name):
            raise ConfigError(f"timm model {base!r} has no pretrained config tagged {model[len(base) + 1 :]!r}")
        return
    close = difflib.get_close_matches(base, names, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(f'{lib}:{c}' for c in close)}" if close else ""
    raise ConfigError(f"unknown {lib} model {model!r}{hint}")


def pretrained_defaults(name: str) -> dict:
    """``{"input_size", "mean", "std"}`` from the model's own pretrained config (no download), ``{}`` if none."""
    lib, model = split_name(name)
    if lib == "timm":
        from timm.models import get_pretrained_cfg

        try:
            cfg = get_pretrained_cfg(model)
        except RuntimeError:  # an unknown pretrained tag
            cfg = None
        if cfg is None:
            return {}
        return {"input_size": int(cfg.input_size[-1]), "mean": list(cfg.mean), "std": list(cfg.std)}
    from torchvision.models import get_model_weights

    try:
        weights = get_model_weights(model).DEFAULT
    except (ValueError, AttributeError, KeyError):
        return {}
    transforms = weights.transforms()
    crop = getattr(transforms, "crop_size", None)
    out = {"mean": list(transforms.mean), "std": list(transforms.std)}
    if crop:
        out["input_size"] = int(crop[0])
    return out


def build_external(name: str, num_classes: int, input_size: int | None = None) -> nn.Module:
    """The library's model, randomly initialized, with ``model.info`` found by probing it at ``input_size``."""
    check_external(name)
    lib, model_name = split_name(name)
    size = input_size or pretrained_defaults(name).get("input_size") or 224
    build = _build_timm if lib == "timm" else _build_torchvision
    try:
        model = build(model_name, num_classes, size)
    except MODEL_ERRORS as exc:  # e.g. a token grid the size cannot make
        raise ConfigError(f"cannot build {name} for {size} px inputs: {describe_error(exc)}") from None
    for module in model.modules():  # a captured feature must not be overwritten by a later in-place activation
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    try:
        model.info = external_info(name, size, model)
    except MODEL_ERRORS as exc:  # the probe's forward pass, e.g. an input too small for the model's strides
        raise ConfigError(f"cannot run {name} on {size} px inputs: {describe_error(exc)}") from None
    return model


def describe_error(exc: BaseException) -> str:
    """The library's message in one line; for a bare ``assert`` (timm's ``_assert(cond, '')``), its type and the
    library module that raised it, which is all the user can act on."""
    message = one_line(exc)
    if message:
        return message
    where = raised_in_library(exc, LIBRARIES) or "the model"
    return f"{type(exc).__name__} raised in {where} (an input size the model does not accept?)"


def _build_timm(name: str, num_classes: int, size: int) -> nn.Module:
    import timm

    try:  # transformers fix their token grid at build time; CNNs take no img_size
        return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=size)
    except TypeError:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)


def _build_torchvision(name: str, num_classes: int, size: int) -> nn.Module:
    from torchvision.models import get_model

    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):
        kwargs |= {"aux_logits": False, "init_weights": True}  # logits only, as every other classifier
    if name.startswith("vit_"):
        kwargs["image_size"] = size
    return get_model(name, **kwargs)


_INFO_CACHE: dict[tuple[str, int], ModelInfo] = {}


def external_info(name: str, input_size: int, model: nn.Module | None = None) -> ModelInfo:
    """The probed :class:`ModelInfo` of ``name`` at ``input_size`` (cached: it does not depend on the class count)."""
    key = (name, input_size)
    if key not in _INFO_CACHE:
        from pipeline.models.autotap import discover

        if model is None:
            return build_external(name, 2, input_size).info
        lib, model_name = split_name(name)
        found = discover(model, input_size)
        _INFO_CACHE[key] = ModelInfo(
            name=name,
            family=lib,
            input_size=input_size,
            stages=found.stages,
            reparam_sites=found.sites,
            head=found.head,
            description=f"{lib} {model_name}, taps and sites found automatically",
            extra={
                "source": name,
                "pretrained_cfg": pretrained_defaults(name),
                "skipped_sites": list(found.skipped),
                "embedding": found.embedding,
            },
        )
    return _INFO_CACHE[key]
