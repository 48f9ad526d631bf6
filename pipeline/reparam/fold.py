"""BatchNorm folding and the fuse walker (design §1 ``fuse``)."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv_path, bn_path)`` for every BatchNorm that directly and solely consumes a conv's output.

    Found on the traced graph rather than by module order, so a BN that precedes its conv (as in
    pre-activation WideResNets) or a conv whose output also feeds another op is never folded.
    """
    if not any(isinstance(m, _BN) for m in model.modules()):
        return []
    graph = fx.Tracer().trace(model)
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN):
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), _CONV)
            and len(source.users) == 1
        ):
            pairs.append((source.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every conv -> BN pair into the conv (which gains a bias); the BN becomes ``Identity``.

    Module paths are kept, so the folded model's state_dict keys are the vanilla ones minus the
    folded BNs' keys, plus a bias for each folded conv.
    """
    model = model if inplace else copy.deepcopy(model)
    was_training = model.training
    model.eval()
    for conv_path, bn_path in conv_bn_pairs(model):
        fused = fuse_conv_bn_eval(model.get_submodule(conv_path), model.get_submodule(bn_path))
        model.set_submodule(conv_path, fused)
        model.set_submodule(bn_path, nn.Identity())
    return model.train(was_training)


@torch.no_grad()
def fuse_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every module that implements ``fuse()``, then fold the remaining BatchNorms."""
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    targets = [name for name, m in model.named_modules() if name and callable(getattr(m, "fuse", None))]
    # Outermost first; a fused parent removes its children, which are then skipped.
    for name in targets:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if callable(getattr(module, "fuse", None)):
            model.set_submodule(name, module.fuse())
    return fold_batchnorm(model, inplace=True)
