"""A frozen model's forward as a graph optimized for inference: the distillation teacher's, on a CPU.

A teacher is never trained, so its forward can be traced once, its weights frozen into the graph and the graph
handed to TorchScript's inference passes: BatchNorm folded into the convolutions, convolutions with ReLU and
additions fused, weights pre-packed in oneDNN's layout instead of reordered on every call. On a CPU the
teacher's forward is most of a KD step (WRN-16-2 has about 8x the FLOPs of MobileNetV2-half); the graph computes
the same logits up to float rounding (folding changes the order of operations, as channels_last does), so it
is not in the stage fingerprints (docs/training.md, "Speed"). The methods that read the teacher's features trace
it with them as outputs (:class:`pipeline.distill.features.TappedModel`), and each is checked like the logits.

The KD step with the graph (WRN-16-2 -> MobileNetV2-half, batch 64, 2 threads; docs/bench-cpu-speed.md): 1.19x of
channels_last alone and 1.71x the peer-style loop on an AMD EPYC (2026-12-06), 1.04x and 1.43x on an Intel Xeon
with AMX (2026-12-07), where the teacher's forward alone went from 75 to 52 ms. TorchScript's tracing is
deprecated in favour of ``torch.compile``, but ``torch.compile(freezing=True)`` of the same teacher gained about
1.1x of eager in a rough check (a loaded machine, 1 thread) against about 1.5x for the traced graph, and needs a
C++ compiler at run time.
Where tracing fails or is gone, or the graph's outputs depart from the module's, the module itself runs and the
reason is returned for the log.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

# The graph must reproduce the module's logits to this relative error (of their largest magnitude) on the batch
# it was traced with: float rounding, not a different function.
TOLERANCE = 1e-4


def inference_graph(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module | None, str]:
    """``model`` (in eval mode, not trained) traced on ``example``, frozen and optimized for inference; or
    ``(None, why)`` where that cannot be had. ``model`` returns a tensor or a tuple of tensors (logits and
    features), each of which the graph must reproduce to :data:`TOLERANCE` of its largest magnitude."""
    if not hasattr(torch.jit, "optimize_for_inference"):
        return None, f"torch {torch.__version__} has no torch.jit.optimize_for_inference"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer notices, once per run
            graph = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, example)))
            expected, got = model(example), graph(example)
    except Exception as exc:  # any model the tracer cannot follow (data-dependent control flow, odd outputs)
        first = (str(exc).splitlines() or [""])[0][:200]
        return None, f"tracing failed ({type(exc).__name__}: {first})"
    expected, got = _tensors(expected), _tensors(got)
    if expected is None or got is None or [t.shape for t in got] != [t.shape for t in expected]:
        return None, "the traced graph's output differs in kind or shape from the module's"
    for i, (want, have) in enumerate(zip(expected, got)):
        scale = float(want.abs().max()) if want.numel() else 1.0
        error = float((have.float() - want.float()).abs().max()) / (scale or 1.0) if want.numel() else 0.0
        if not error <= TOLERANCE:  # NaN too
            what = "logits" if i == 0 else f"feature {i}"
            return None, f"the traced graph's {what} depart from the module's (relative error {error:.2g})"
    return graph, ""


def _tensors(out: object) -> list[torch.Tensor] | None:
    """A forward's output as a list of tensors, ``None`` where it is anything else."""
    items = list(out) if isinstance(out, (tuple, list)) else [out]
    return items if items and all(isinstance(t, torch.Tensor) for t in items) else None
