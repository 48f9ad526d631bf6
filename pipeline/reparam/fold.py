"""BatchNorm folding and the fuse walker (design §1 ``fuse``)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class NormTail(nn.Module):
    """What stays of a norm-and-activation layer (timm's ``BatchNormAct2d``) once its BatchNorm is folded away.

    The children keep their names (``drop``, ``act``), so an activation with parameters keeps its state_dict keys.
    """

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(x))


def norm_tail(bn: nn.Module) -> nn.Module:
    """The module that replaces a folded BatchNorm: ``Identity``, or the activation a timm norm-act layer applies."""
    if isinstance(getattr(bn, "act", None), nn.Module):
        drop = getattr(bn, "drop", None)
        return NormTail(drop if isinstance(drop, nn.Module) else nn.Identity(), bn.act)
    return nn.Identity()


class _NormLeafTracer(fx.Tracer):
    """fx's tracer, with every BatchNorm subclass (timm's norm-act layers) kept as one call, like ``nn.BatchNorm2d``."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BN) or super().is_leaf_module(m, qualname)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv_path, bn_path)`` for every BatchNorm that directly and solely consumes a conv's output.

    Found on the traced graph rather than by module order, so a BN that precedes its conv (as in
    pre-activation WideResNets) or a conv whose output also feeds another op is never folded. A model
    that torch.fx cannot trace has no pairs: its BatchNorms stay as they are (still exportable).
    """
    if not any(isinstance(m, _BN) for m in model.modules()):
        return []
    try:
        graph = _NormLeafTracer().trace(model)
    except Exception:  # fx raises many types on data-dependent control flow
        return []
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
    """Fold every conv -> BN pair into the conv (which gains a bias); the BN becomes ``Identity`` (or its tail).

    Module paths are kept, so the folded model's state_dict keys are the vanilla ones minus the
    folded BNs' keys, plus a bias for each folded conv.
    """
    model = model if inplace else copy.deepcopy(model)
    was_training = model.training
    model.eval()
    for conv_path, bn_path in conv_bn_pairs(model):
        bn = model.get_submodule(bn_path)
        fused = fuse_conv_bn_eval(model.get_submodule(conv_path), bn)
        model.set_submodule(conv_path, fused)
        model.set_submodule(bn_path, norm_tail(bn))
    return model.train(was_training)


@torch.no_grad()
def fuse_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Re-parameterize the model's own multi-branch blocks, replace every module that implements ``fuse()``,
    then fold the remaining BatchNorms.

    Blocks that re-parameterize themselves in place (timm's RepVGG, MobileOne and FastViT blocks,
    ``reparameterize()``) run first, outermost first, and library blocks with ``fuse()`` (timm's RepViT, iFormer,
    SHViT), each after any m-branch block inside it has been turned back into the conv + BatchNorm it expects.
    """
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    reparameterize_blocks(model)
    targets = [name for name, m in model.named_modules() if name and callable(getattr(m, "fuse", None))]
    # Outermost first; a fused parent removes its children, which are then skipped.
    for name in targets:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if callable(getattr(module, "fuse", None)):
            if not callable(getattr(module, "fuse_conv_bn", None)):  # a library block, not an m-branch block
                restore_conv_bn(model, name, module)
            model.set_submodule(name, module.fuse())
    return fold_batchnorm(model, inplace=True)


def restore_conv_bn(model: nn.Module, path: str, module: nn.Module) -> None:
    """Turn every m-branch block inside ``module`` (at ``path`` in ``model``) back into the conv + BatchNorm that
    the module's own fusion reads (timm's RepVGG/MobileOne ``reparameterize()``, RepViT's ``fuse()``)."""
    for name, inner in list(module.named_modules()):
        if inner is not module and callable(getattr(inner, "fuse_conv_bn", None)):
            conv, bn = inner.fuse_conv_bn()
            model.set_submodule(f"{path}.{name}" if path else name, conv)
            model.set_submodule(inner.norm_path, bn)


def reparameterize_blocks(model: nn.Module) -> int:
    """Call ``reparameterize()`` on every module that has one, outermost first (in place); returns how many ran.

    A block's own ``reparameterize()`` may remove or replace its children (timm's ``RepMixer`` re-parameterizes
    its ``mixer`` and ``norm`` and then deletes them), so the module list is collected again after each call and
    only modules still in the model are visited, as timm's ``reparameterize_model`` does. A child that survives
    its parent's call is visited too; timm's blocks return early when already re-parameterized.
    """
    done: dict[int, nn.Module] = {}  # holds the visited modules, so a new module can never reuse an id
    while True:
        host = next(
            (
                (name, m)
                for name, m in model.named_modules()
                if id(m) not in done and callable(getattr(m, "reparameterize", None))
            ),
            None,
        )
        if host is None:
            return len(done)
        path, module = host
        done[id(module)] = module
        restore_conv_bn(model, path, module)
        module.reparameterize()
