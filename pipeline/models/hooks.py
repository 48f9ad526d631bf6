"""Feature taps: read named intermediate tensors through forward hooks.

Distillation needs features from inside the teacher and the student, but a model's ``forward`` must stay
``x -> logits`` so that it exports cleanly (design §4). As in torchdistill's ``ForwardHookManager``, the
features are captured by hooks on modules named by ``get_submodule`` paths, and the hooks live only as
long as a ``with`` block, so no model is left carrying stale hooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from pipeline.errors import ConfigError
from pipeline.models.spec import Tap, model_name

__all__ = ["FeatureTaps", "as_nchw", "submodule"]


class FeatureTaps:
    """Context manager that captures the tensors at ``taps`` on every forward pass of ``model``.

    All paths are resolved on entry, before any hook is registered, so a typo fails at once with a
    :class:`ConfigError` naming the path and the model, and leaves the model untouched. Captured tensors
    are kept as they are (not detached or copied) because distillation losses back-propagate through
    them; each forward pass overwrites the previous capture. A module that runs several times in one
    pass reports its last call.

    Example:
        >>> model = build_model("resnet32x4", num_classes=100)
        >>> with FeatureTaps(model, {"s2": Tap("layer2.4.act", io="input")}) as taps:
        ...     logits = model(torch.randn(64, 3, 32, 32))
        >>> taps.features["s2"].shape  # layer2's last block, after the residual sum and before its ReLU
        torch.Size([64, 128, 16, 16])

    Args:
        model: The module to tap.
        taps: Feature name -> where to read it.
    """

    def __init__(self, model: nn.Module, taps: Mapping[str, Tap]):
        self.model = model
        self.taps = dict(taps)
        self.features: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> FeatureTaps:
        modules = {name: self._resolve(name, tap) for name, tap in self.taps.items()}
        try:
            for name, module in modules.items():
                self._handles.append(module.register_forward_hook(self._capture(name, self.taps[name].io)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def remove(self) -> None:
        """Detach every hook; the features captured so far stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _resolve(self, name: str, tap: Tap) -> nn.Module:
        if tap.io not in ("input", "output"):
            raise ConfigError(f"tap {name!r} has io={tap.io!r}; use 'input' or 'output'")
        try:
            return submodule(self.model, tap.path)
        except ConfigError as err:
            raise ConfigError(f"tap {name!r}: {err}") from None

    def _capture(self, name: str, io: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        tap = self.taps[name]

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            self.features[name] = as_nchw(inputs[0] if io == "input" else output, tap)

        return hook


def as_nchw(tensor: Tensor, tap: Tap) -> Tensor:
    """The tapped tensor as an ``N x C x H x W`` map, whatever layout ``tap.layout`` says it has."""
    if tap.layout == "nchw":
        return tensor
    if tap.layout == "nhwc":
        return tensor.permute(0, 3, 1, 2)
    if tap.layout == "nc":
        return tensor.flatten(1)[:, :, None, None]
    if tap.layout == "nlc":
        tokens = tensor[:, tap.prefix_tokens :]
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ConfigError(f"tap {tap.path!r}: {tokens.shape[1]} tokens do not form a square grid")
        return tokens.transpose(1, 2).unflatten(2, (side, side))
    raise ConfigError(f"tap {tap.path!r} has layout={tap.layout!r}; use nchw, nhwc, nlc or nc")


def submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)``, or a :class:`ConfigError` naming the model and the path."""
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise ConfigError(f"model {model_name(model)!r} has no submodule {path!r} ({err})") from None
