"""Deployed cost of a KDiffusion student: the fused student against the vanilla student in ONNX Runtime.

For each architecture, the vanilla student (BN folded, its deploy form) and a KDiffusion student (m-branch
blocks at every re-parameterization site), both with random trained-like BN statistics and fused by the
pipeline's ``fuse_model``, are exported with the pipeline's ONNX exporter and timed on ONNX Runtime's CPU provider at
batch 1 and 32. Rounds alternate the two models in a random order; each figure is the median over rounds
of the mean latency of a round, and the ratio is fused / vanilla from the same run.

    python benchmarks/bench_deploy_cost.py --arch mobile_half resnet8x4 ShuffleV2 --rounds 11
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exports.onnx_export import export_onnx
from exports.runners import OnnxrtRunner
from pipeline.artifacts.machine import describe_cpu
from pipeline.models import build_model, count_parameters, model_info
from pipeline.reparam import fuse_model
from pipeline.reparam.multibranch import apply_multibranch


def randomize_batchnorms(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Trained-like BN statistics and affine terms, so that no two folded tensors coincide (the exporter would
    share equal initializers, which changes the graph without changing its cost)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.weight.copy_(1 + 0.1 * torch.randn(n, generator=gen))
            bn.bias.copy_(0.1 * torch.randn(n, generator=gen))
    return model.eval()


def vanilla_student(arch: str, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return fuse_model(randomize_batchnorms(build_model(arch, classes), 1))


def kdiffusion_student(arch: str, classes: int, m: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = apply_multibranch(build_model(arch, classes), model_info(arch).reparam_sites, m=m, mixed_kernels=True)
    return fuse_model(randomize_batchnorms(model, 1))


def graph_signature(path: Path) -> tuple:
    """Node op types with their attributes, and initializer shapes: equal means the same computation graph."""
    import onnx

    proto = onnx.load(str(path))
    nodes = tuple(
        (n.op_type, tuple(sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)))
        for n in proto.graph.node
    )
    return nodes, tuple(sorted(tuple(t.dims) for t in proto.graph.initializer))


def latency(session, images: np.ndarray, runs: int) -> float:
    name = session.get_inputs()[0].name
    tic = time.perf_counter()
    for _ in range(runs):
        session.run(None, {name: images})
    return (time.perf_counter() - tic) / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["mobile_half", "resnet8x4", "ShuffleV2"])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--runs", type=int, default=20, help="least inferences per model, batch and round")
    parser.add_argument("--round-seconds", type=float, default=0.3, help="least time per model, batch and round")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()

    print(f"ONNX Runtime CPU provider, {args.threads or 'default'} intra-op threads, {describe_cpu()}")
    print(
        f"median over {args.rounds} rounds of >= {args.runs} inferences and >= {args.round_seconds} s; "
        f"fused = KDiffusion student (m={args.m}, mixed kernels) after fusion\n"
    )
    print(
        "| student | params vanilla | params fused | same ONNX graph | batch | vanilla (ms) | fused (ms) "
        "| fused / vanilla |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            models = {
                "vanilla": vanilla_student(arch, args.classes),
                "fused": kdiffusion_student(arch, args.classes, args.m),
            }
            params = {k: count_parameters(v) for k, v in models.items()}
            size = model_info(arch).input_size
            runners, sessions, graphs = {}, {}, {}
            for kind, model in models.items():
                path = export_onnx(model, Path(tmp) / f"{arch}_{kind}.onnx", size, opset=18, dynamo=True)
                runners[kind] = OnnxrtRunner(path, threads=args.threads)
                runners[kind].activate()
                sessions[kind] = runners[kind].session  # timed directly, without the runner's checks
                graphs[kind] = graph_signature(path)
            same = "yes" if graphs["vanilla"] == graphs["fused"] else "NO"
            for batch in args.batches:
                images = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
                samples = {kind: [] for kind in sessions}
                estimate = min(latency(session, images, 5) for session in sessions.values())  # also the warm-up
                runs = max(args.runs, math.ceil(args.round_seconds / estimate))
                for _ in range(args.rounds):
                    order = list(sessions)
                    rng.shuffle(order)
                    for kind in order:
                        samples[kind].append(latency(sessions[kind], images, runs))
                vanilla, fused = (statistics.median(samples[k]) for k in ("vanilla", "fused"))
                print(
                    f"| {arch} | {params['vanilla']:,} | {params['fused']:,} | {same} | {batch} | "
                    f"{1e3 * vanilla:.3f} | {1e3 * fused:.3f} | {fused / vanilla:.3f} |"
                )
            for runner in runners.values():
                runner.deactivate()
            sessions.clear()
            if params["vanilla"] != params["fused"] or same != "yes":
                raise SystemExit(
                    f"{arch}: the fused student has {params['fused']} parameters, vanilla {params['vanilla']}"
                )


if __name__ == "__main__":
    main()
