"""Feature plumbing the feature-based methods share: which taps to read, their shapes, and pairing.

Every method reads features through the zoo's declared taps (``model.info.stages``: pre-activation,
shallow to deep) with :class:`~pipeline.models.hooks.FeatureTaps`, so no model's ``forward`` changes. Shapes
needed to size connectors come from one dummy forward when the method is built. A teacher and a
student with different numbers of stages are paired from the deep end (as mdistiller's
``_align_list`` does): the deepest stage with the deepest, and so on. Where a pair's spatial sizes
differ, the larger map is average-pooled to the smaller one (as mdistiller's AT and OFD and
RepDistiller's VID do).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import ConfigError
from pipeline.models.hooks import FeatureTaps
from pipeline.models.spec import Tap, model_name

__all__ = [
    "TappedModel",
    "aligned_pairs",
    "bn_before_taps",
    "embedding_tap",
    "match_spatial",
    "paired_stage_taps",
    "probe_shapes",
    "stage_taps",
    "tap_channels",
    "tapped_forward",
    "teacher_head",
    "warmup_factor",
]


def stage_taps(model: nn.Module, method: str) -> tuple[Tap, ...]:
    """The model's declared stage taps; a clear error if it declares none."""
    stages = getattr(getattr(model, "info", None), "stages", ())
    if not stages:
        raise ConfigError(
            f"method {method!r} reads stage features, but model {model_name(model)!r} declares no stage taps"
        )
    return tuple(stages)


def _dummy_input(model: nn.Module, requires_grad: bool = False) -> Tensor:
    size = getattr(getattr(model, "info", None), "input_size", 32)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return torch.zeros(1, 3, size, size, device=device, requires_grad=requires_grad)


class _EvalMode:
    """Run a probe in eval mode (BN running statistics untouched) and restore every module's mode."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for module, mode in self.modes:
            module.training = mode


def probe_shapes(model: nn.Module, taps: Sequence[Tap]) -> list[torch.Size]:
    """Shapes of ``taps`` for one input of the model's declared size (batch 1)."""
    with _EvalMode(model), torch.no_grad():
        _, feats = tapped_forward(model, taps, _dummy_input(model))
    return [f.shape for f in feats]


def tap_channels(model: nn.Module, taps: Sequence[Tap]) -> list[int]:
    """The channels of each tap's feature (:func:`probe_shapes`)."""
    return [shape[1] for shape in probe_shapes(model, taps)]


def embedding_tap(model: nn.Module) -> Tap:
    """The input of the last ``nn.Linear`` the forward pass runs: the pooled embedding the classifier sees.

    This is RepDistiller's ``feat[-1]`` (the penultimate feature CRD and ReviewKD use), found without
    knowing what the head module is called.
    """
    calls: list[str] = []
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        with _EvalMode(model), torch.no_grad():
            model(_dummy_input(model))
    finally:
        for handle in handles:
            handle.remove()
    if not calls:
        name = getattr(getattr(model, "info", None), "name", type(model).__name__)
        raise ConfigError(f"model {name!r} has no nn.Linear classifier, so it has no embedding to distill")
    return Tap(calls[-1], "input")


def teacher_head(model: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """The head that maps the model's last stage tap (as an NCHW map) to its logits, ``None`` if it has none.

    Zoo models and timm CNNs: ``forward_head``. Models whose last tap is the pooled classifier input
    (``info.head`` names that ``nn.Linear``): the Linear on the flattened map.
    """
    head = getattr(getattr(model, "info", None), "head", "")
    if head:
        linear = model.get_submodule(head)
        return lambda x: linear(x.flatten(1))
    if head is None:
        return None
    forward_head = getattr(model, "forward_head", None)
    return forward_head if callable(forward_head) else None


def tapped_forward(model: nn.Module, taps: Sequence[Tap], images: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``model(images)`` and the features at ``taps``, in order."""
    with FeatureTaps(model, {str(i): tap for i, tap in enumerate(taps)}) as captured:
        logits = model(images)
    return logits, [captured.features[str(i)] for i in range(len(taps))]


class TappedModel(nn.Module):
    """``model`` with its features at ``taps`` as outputs after the logits: one forward a tracer can record."""

    def __init__(self, model: nn.Module, taps: Sequence[Tap]):
        super().__init__()
        self.model, self.taps = model, tuple(taps)
        self.training = model.training  # its own flag only: the model's modules keep theirs

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        logits, features = tapped_forward(self.model, self.taps, images)
        return (logits, *features)


def aligned_pairs(num_student: int, num_teacher: int) -> list[tuple[int, int]]:
    """(student stage, teacher stage) index pairs, matched from the deepest stage down."""
    n = min(num_student, num_teacher)
    return [(num_student - n + i, num_teacher - n + i) for i in range(n)]


def paired_stage_taps(
    student: nn.Module,
    teacher: nn.Module,
    method: str,
    pair: Callable[[int, int], list[tuple[int, int]]] = aligned_pairs,
) -> tuple[list[Tap], list[Tap]]:
    """The student's and the teacher's stage taps, matched by ``pair`` (index pairs from the two counts)."""
    s_taps, t_taps = stage_taps(student, method), stage_taps(teacher, method)
    pairs = pair(len(s_taps), len(t_taps))
    return [s_taps[i] for i, _ in pairs], [t_taps[j] for _, j in pairs]


def match_spatial(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool whichever of two NCHW maps is larger to the other's size."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    if a.shape[-2] * a.shape[-1] > b.shape[-2] * b.shape[-1]:
        return F.adaptive_avg_pool2d(a, b.shape[-2:]), b
    return a, F.adaptive_avg_pool2d(b, a.shape[-2:])


def warmup_factor(progress: float, warmup_epochs: float) -> float:
    """Linear ramp from 0 to 1 over the first ``warmup_epochs`` epochs (mdistiller's DKD/ReviewKD warm-up)."""
    return 1.0 if warmup_epochs <= 0 else min(progress / warmup_epochs, 1.0)


def bn_before_taps(model: nn.Module, taps: Sequence[Tap]) -> list[nn.BatchNorm2d]:
    """For each tap, the BatchNorm whose output makes (or last enters) that pre-activation feature.

    Found generically from one dummy forward's autograd graph: starting at the tap's tensor, walk back
    through residual additions only and take the nearest BatchNorm output; when a sum has several at
    the same depth (a projection shortcut), take the one that ran last (the block's residual branch in
    the zoo's blocks). A tap reached only through other ops (e.g. a concatenation) has no single BN,
    and raises a :class:`ConfigError`.
    """
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    produced: dict[object, tuple[int, str]] = {}  # autograd node -> (call order, BN name)

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            produced[output.grad_fn] = (len(produced), name)

        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in norms.items()]
    try:
        with _EvalMode(model), torch.enable_grad():
            _, feats = tapped_forward(model, taps, _dummy_input(model, requires_grad=True))
    finally:
        for handle in handles:
            handle.remove()
    found = []
    for tap, feat in zip(taps, feats):
        frontier, hits = [feat.grad_fn], []
        while frontier and not hits:
            hits = [produced[node] for node in frontier if node in produced]
            frontier = [
                child
                for node in frontier
                if node is not None and node not in produced and node.name().startswith("AddBackward")
                for child, _ in node.next_functions
                if child is not None
            ]
        if not hits:
            name = getattr(getattr(model, "info", None), "name", type(model).__name__)
            raise ConfigError(
                f"model {name!r}: no BatchNorm produces the tap {tap.path!r} ({tap.io}) directly or through a "
                "residual sum, so its pre-ReLU statistics are unknown"
            )
        found.append(norms[max(hits)[1]])
    return found
