"""Find a classifier's feature taps, teacher head and KDiffusion sites by probing it, instead of declaring them.

One eval-mode forward pass at the run's input size, with a hook on every module, tells which module
produced which tensor, in which order, and at which resolution:

- **Stages.** timm models name their stage modules in ``feature_info``; for the others a stage is the
  shallowest module that is the last to produce a map at its resolution (``layer3``, ``features.13``,
  ``conv5``). The last three stages are the taps; their layout (NCHW, timm's NHWC, ViT tokens) is
  recorded so every method receives NCHW maps.
- **Teacher head.** Where ``forward_features`` ends at a module with an NCHW map (timm's CNNs) that map
  is the last tap and ``forward_head`` the guide's head, as in the zoo. Otherwise the last tap is the
  pooled input of the classifier ``nn.Linear`` (read as a 1x1 map) and that Linear is the head: exactly
  linear, as spec §2.2 says of Swin's head.
- **KDiffusion sites** (spec §2.1 D2/D3): for each of the last three stages, walk back on the autograd
  graph from the stage's output through residual sums, activations, concatenations, reshapes and pooling
  to the nearest BatchNorm (the residual path's before a projection shortcut's, else the one that ran last)
  whose input is a conv's sole output (the fx-traced pairs of :func:`~pipeline.reparam.fold.conv_bn_pairs`).
  That conv+BN is the last one of the stage's final unit.
  A site that cannot be branched is skipped with the reason. Branch features are read at the block's
  own output (``s_i = x_i``, the spec's "otherwise" case), which stays exact whatever follows the block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pipeline.models.spec import ReparamSite, Tap
from pipeline.reparam.fold import conv_bn_pairs

__all__ = ["Found", "discover"]

# Autograd nodes a stage's output may pass through after its last conv+BN: affine glue, activations, pooling.
_PASS_THROUGH = (
    "Add",
    "Relu",
    "Threshold",
    "Hardtanh",
    "Hardswish",
    "Silu",
    "Gelu",
    "Elu",
    "LeakyRelu",
    "Mish",
    "Cat",
    "View",
    "UnsafeView",
    "Reshape",
    "Transpose",
    "Permute",
    "Clone",
    "Mean",
    "AdaptiveAvgPool2D",
    "MaxPool",
    "AvgPool",
    "Squeeze",
    "Unsqueeze",
    "Expand",
    "AsStrided",
    "Split",
    "Chunk",
    "Slice",
    "Select",
)
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_SHORTCUT_NAMES = ("downsample", "shortcut")  # projection shortcuts in timm and torchvision blocks


@dataclass
class Found:
    stages: tuple[Tap, ...] = ()
    sites: tuple[ReparamSite, ...] = ()
    head: str | None = None
    skipped: list[str] = field(default_factory=list)
    embedding: str = ""


@dataclass
class _Call:
    order: int
    name: str
    output: Tensor


@contextmanager
def _recorded(model: nn.Module) -> Iterator[list[_Call]]:
    """Every module call of a forward pass whose output is a tensor, in the order the calls finished."""
    calls: list[_Call] = []

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output) -> None:
            if isinstance(output, Tensor):
                calls.append(_Call(len(calls), name, output))

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if name]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def discover(model: nn.Module, input_size: int) -> Found:
    """Stages, head and sites of ``model`` (left as it was: eval-mode probe, modes restored)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return _discover(model, input_size)
    finally:
        for module, mode in modes:
            module.training = mode


def _discover(model: nn.Module, input_size: int) -> Found:
    param = next(model.parameters())
    images = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    images = images.to(param.device, param.dtype).requires_grad_(True)
    with torch.enable_grad(), _recorded(model) as calls:
        logits = model(images)
    found = Found()
    linears = [c for c in calls if isinstance(model.get_submodule(c.name), nn.Linear)]
    classifier = next((c for c in reversed(linears) if c.output is logits), None)
    spatial = _timm_stages(model, calls) if hasattr(model, "feature_info") else _resolution_stages(model, calls)
    final = _forward_features_call(model, images)
    if final is not None:
        final = (_last_call(calls, final[0].name), final[1])
        size = _hw(*final)
        # forward_features' end replaces the stage at its resolution (efficientnet's conv_head after blocks.6)
        spatial = [c for c in spatial if c[0].output is not final[0].output and (size is None or _hw(*c) != size)]
        spatial = [*spatial, final][-3:]
    if final is not None and final[1] == "nchw" and callable(getattr(model, "forward_head", None)):
        found.head = ""
        found.stages = tuple(_tap(model, c, layout) for c, layout in spatial[-3:])
    elif classifier is not None:
        found.head = classifier.name
        pooled = Tap(classifier.name, "input", layout="nc")
        found.stages = (*(_tap(model, c, layout) for c, layout in spatial[-2:]), pooled)
    else:
        found.stages = tuple(_tap(model, c, layout) for c, layout in spatial[-3:])
        found.skipped.append("no teacher head: the last nn.Linear does not produce the logits (no target guide)")
    if linears:
        found.embedding = linears[-1].name
    found.sites, skipped = _sites(model, calls, [c for c, layout in spatial[-3:] if layout == "nchw"])
    found.skipped += skipped
    return found


def _tap(model: nn.Module, call: _Call, layout: str) -> Tap:
    return Tap(call.name, layout=layout, prefix_tokens=getattr(model, "num_prefix_tokens", 0) if layout == "nlc" else 0)


def _layout(model: nn.Module, output: Tensor) -> str | None:
    if output.dim() == 3:
        return "nlc"
    if output.dim() == 4:
        return "nhwc" if getattr(model, "output_fmt", "NCHW") == "NHWC" else "nchw"
    return None


def _hw(call: _Call, layout: str) -> tuple[int, int] | None:
    """The spatial size of a map (``None`` for tokens)."""
    shape = call.output.shape
    return tuple(shape[-2:]) if layout == "nchw" else tuple(shape[1:3]) if layout == "nhwc" else None


def _last_call(calls: list[_Call], name: str) -> _Call | None:
    return next((c for c in reversed(calls) if c.name == name), None)


def _timm_stages(model: nn.Module, calls: list[_Call]) -> list[tuple[_Call, str]]:
    """The modules timm's ``feature_info`` names, in order, each with its layout."""
    out, seen = [], set()
    for entry in model.feature_info:
        name = entry.get("module", "")
        call = _last_call(calls, name) if name not in seen else None
        seen.add(name)
        layout = _layout(model, call.output) if call is not None else None
        if layout is not None:
            out.append((call, layout))
    return out


def _resolution_stages(model: nn.Module, calls: list[_Call]) -> list[tuple[_Call, str]]:
    """Per resolution (in order of appearance), the shallowest module that last produced an NCHW map there.

    Calls from the first pooling module or Linear on are the head and are left out. A model that runs a
    Linear inside its body (torchvision's ViT, Swin, MaxViT: token layouts this rule cannot read) has none.
    """
    body = []
    last_linear = next((c for c in reversed(calls) if isinstance(model.get_submodule(c.name), nn.Linear)), None)
    # A pool nested in a block is squeeze-and-excitation: its module's 1x1 maps are not a stage.
    gates = tuple(
        c.name.rsplit(".", 1)[0] + "."
        for c in calls
        if "." in c.name and isinstance(model.get_submodule(c.name), _POOLS)
    )
    for call in calls:
        module = model.get_submodule(call.name)
        nested_pool = "." in call.name and isinstance(module, _POOLS)
        if (
            isinstance(module, nn.Linear)
            and call is not last_linear
            and not any(
                isinstance(model.get_submodule(c.name), _POOLS) and "." not in c.name for c in calls[: call.order]
            )
        ):
            return []
        if isinstance(module, (nn.Linear, *_POOLS)) and not nested_pool:
            break
        if call.output.dim() == 4 and not nested_pool and not (call.name + ".").startswith(gates):
            body.append(call)
    groups: dict[tuple[int, int], list[_Call]] = {}
    for call in body:
        groups.setdefault(tuple(call.output.shape[-2:]), []).append(call)
    stages = []
    for group in groups.values():
        depth = min(c.name.count(".") for c in group)
        stages.append(max((c for c in group if c.name.count(".") == depth), key=lambda c: c.order))
    return [(c, "nchw") for c in sorted(stages, key=lambda c: c.order)]


def _forward_features_call(model: nn.Module, images: Tensor) -> tuple[_Call, str] | None:
    """The module whose output ``forward_features`` returns (timm models), with its layout."""
    forward_features = getattr(model, "forward_features", None)
    if not callable(forward_features):
        return None
    with torch.no_grad(), _recorded(model) as calls:
        features = forward_features(images)
    match = next((c for c in reversed(calls) if c.output is features), None)
    layout = _layout(model, features) if match is not None else None
    return (match, layout) if layout is not None else None


def _sites(model: nn.Module, calls: list[_Call], stages: list[_Call]) -> tuple[tuple[ReparamSite, ...], list[str]]:
    """One branchable conv+BN per stage (the last one of its final unit), and why any stage has none."""
    from pipeline.reparam.multibranch import check_branchable

    pairs = {bn: conv for conv, bn in conv_bn_pairs(model)}
    norms = {
        c.output.grad_fn: c
        for c in calls
        if isinstance(model.get_submodule(c.name), nn.modules.batchnorm._BatchNorm) and c.output.grad_fn is not None
    }
    sites: list[ReparamSite] = []
    skipped: list[str] = []
    if not norms:
        return (), ["no BatchNorm layers (LayerNorm/attention blocks or convs without BN): nothing to branch"]
    if not pairs:
        skipped.append("torch.fx found no conv -> BatchNorm pair (untraceable model, or no BN directly after a conv)")
    for stage in stages:
        reasons = []
        for bn_call in _nearest_norms(stage.output, norms):
            conv_path = pairs.get(bn_call.name)
            if conv_path is None:
                reasons.append(f"{bn_call.name}: not the sole consumer of a conv's output")
                continue
            try:
                check_branchable(model.get_submodule(conv_path), model.get_submodule(bn_call.name))
            except ValueError as exc:
                reasons.append(f"{conv_path}: {exc}")
                continue
            if all(s.conv != conv_path for s in sites):
                sites.append(ReparamSite(conv_path, bn_call.name, Tap(conv_path)))
            break
        else:
            skipped.append(f"stage {stage.name}: no branchable conv+BN ({'; '.join(reasons) or 'none reached'})")
    return tuple(sites), skipped


def _nearest_norms(feature: Tensor, norms: dict) -> Iterator[_Call]:
    """BatchNorm calls behind ``feature`` on the autograd graph, through pass-through ops only: nearest first,
    and at one distance the main path before a shortcut's projection, then the one that ran last."""
    frontier, seen = [feature.grad_fn], set()
    while frontier:
        hits = [norms[node] for node in frontier if node in norms]
        yield from sorted(hits, key=lambda c: (any(w in c.name for w in _SHORTCUT_NAMES), -c.order))
        nxt = []
        for node in frontier:
            if node is None or node in seen or node in norms or not node.name().startswith(_PASS_THROUGH):
                continue
            seen.add(node)
            nxt += [child for child, _ in node.next_functions if child is not None]
        frontier = nxt
