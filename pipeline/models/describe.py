"""What each distillation method reads from a model, with shapes: ``python -m pipeline models --describe NAME``."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models import build_model, count_parameters
from pipeline.models.hooks import FeatureTaps
from pipeline.models.spec import Tap

__all__ = ["describe_model", "format_description"]

# Which taps each method reads (see each method's docstring).
METHOD_TAPS = {
    "kd, dkd, vanilla": "logits",
    "fitnet, at, vid, ofd": "stages",
    "reviewkd": "stages + embedding",
    "crd": "embedding",
    "kdiffusion (as teacher)": "last stages, the last one through head (target guide)",
    "kdiffusion (as student)": "sites (m-branch blocks; branch outputs read at each block)",
}


def describe_model(name: str, num_classes: int = 100, input_size: int | None = None) -> dict:
    """Stage taps, embedding, logits, head and KDiffusion sites of ``name`` with their shapes for one image."""
    model = build_model(name, num_classes, input_size).eval()
    info = model.info
    size = info.input_size
    embedding = _embedding(model)
    taps = {f"stage{i}": tap for i, tap in enumerate(info.stages)}
    taps |= {f"site{i}": Tap(site.conv) for i, site in enumerate(info.reparam_sites)}
    if embedding:
        taps["embedding"] = Tap(embedding, "input", layout="nc")
    with torch.no_grad(), FeatureTaps(model, taps) as captured:
        logits = model(torch.zeros(1, 3, size, size))
    shape = {key: list(value.shape[1:]) for key, value in captured.features.items()}
    sites = []
    for i, site in enumerate(info.reparam_sites):
        conv = model.get_submodule(site.conv)
        sites.append(
            {
                "conv": site.conv,
                "bn": site.bn,
                "kernel": list(conv.kernel_size),
                "stride": list(conv.stride),
                "groups": conv.groups,
                "shape": shape[f"site{i}"],
            }
        )
    return {
        "name": name,
        "family": info.family,
        "input_size": size,
        "parameters": count_parameters(model),
        "stages": [
            {"path": t.path, "io": t.io, "layout": t.layout, "shape": shape[f"stage{i}"]}
            for i, t in enumerate(info.stages)
        ],
        "embedding": {"path": embedding, "io": "input", "shape": shape.get("embedding")} if embedding else None,
        "logits": list(logits.shape[1:]),
        "head": "forward_head" if info.head == "" else info.head,
        "sites": sites,
        "skipped_sites": list(info.extra.get("skipped_sites", [])),
        "methods": METHOD_TAPS,
    }


def _embedding(model: nn.Module) -> str:
    from pipeline.distill.features import embedding_tap
    from pipeline.errors import ConfigError

    try:
        return embedding_tap(model).path
    except ConfigError:
        return ""


def format_description(d: dict) -> str:
    """The description as a short table for a terminal."""
    lines = [f"{d['name']}  ({d['family']}, {d['input_size']} px, {d['parameters']:,} parameters)", "taps:"]
    for i, s in enumerate(d["stages"]):
        lines.append(f"  {'stage' + str(i):13s} {s['path']} ({s['io']}, {s['layout']})  {s['shape']}")
    if d["embedding"]:
        lines.append(f"  embedding     {d['embedding']['path']} (input)  {d['embedding']['shape']}")
    lines.append(f"  logits        {d['logits']}")
    lines.append(f"  teacher head  {d['head'] if d['head'] is not None else 'none (no target guide)'}")
    lines.append("KDiffusion sites:")
    for s in d["sites"]:
        lines.append(
            f"  {s['conv']} + {s['bn']}  kernel {s['kernel']} stride {s['stride']} groups {s['groups']}  {s['shape']}"
        )
    if not d["sites"]:
        lines.append("  none: the KDiffusion methods refuse this model as a student")
    lines += [f"  skipped: {reason}" for reason in d["skipped_sites"]]
    lines.append("methods read:")
    lines += [f"  {method:24s} {what}" for method, what in d["methods"].items()]
    return "\n".join(lines)
