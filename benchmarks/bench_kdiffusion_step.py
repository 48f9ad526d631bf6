"""Training-step cost of each KDiffusion variant relative to plain KD, on the same teacher/student pair.

Every configuration (KD, then each variant at each m) is built once; timing rounds then visit them in
a fresh random order, so load from other processes on a shared machine spreads over all of them. A step
is forward, backward and an SGD update. Per configuration the script reports the fastest round (the
least disturbed by other processes, so the primary figure for ratios) and the median round; ratios are
against KD's figure from the same run.

Peak step memory is the peak of the bytes held by tensors created during one step (activations, saved
tensors, gradients, temporaries), tracked op by op with a ``TorchDispatchMode``: CPU tensors bypass
``tracemalloc``, the profiler reports per-op allocations rather than a peak, and peak RSS mostly shows
the allocator. Parameters and optimizer state exist before the step; the trainable parameter count is
listed beside.

    python benchmarks/bench_kdiffusion_step.py --m 2 4 8 --rounds 10 --steps 2
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.artifacts.machine import describe_cpu
from pipeline.distill import build_distiller
from pipeline.models import build_model

VARIANTS = ("kdiffusion_single_avg", "kdiffusion_single", "kdiffusion_multi", "kdiffusion")


def configurations(ms: list[int]) -> list[tuple[str, int]]:
    return [("kd", 0)] + [(variant, m) for m in ms for variant in VARIANTS]


def build(method: str, m: int, args: argparse.Namespace):
    torch.manual_seed(0)
    teacher = build_model(args.teacher, args.classes)
    student = build_model(args.student, args.classes)
    method_args = {} if method == "kd" else {"m": m, "warmup_epochs": 0}
    distiller = build_distiller(method, student, teacher, method_args).train()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9)
    return distiller, optimizer


def step(distiller, optimizer, images, labels) -> None:
    _, losses = distiller(images, labels)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()


def batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    return images, torch.randint(0, args.classes, (args.batch,), generator=gen)


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created while the mode is active."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                ref = StorageWeakRef(storage)
                self.live.setdefault(ref.cdata, (ref, storage.nbytes()))
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


def step_memory(distiller, optimizer, images, labels) -> float:
    """Peak MiB of the tensors one training step creates."""
    with PeakTensorMemory() as tracker:
        step(distiller, optimizer, images, labels)
    return tracker.peak / 2**20


def measure(args: argparse.Namespace) -> dict[tuple[str, int], dict]:
    configs = configurations(args.m)
    built = {c: build(*c, args) for c in configs}
    images, labels = batch(args)
    for distiller, optimizer in built.values():
        for _ in range(2):
            step(distiller, optimizer, images, labels)
    samples: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    order = list(configs)
    rng = random.Random(0)
    for r in range(args.rounds):
        rng.shuffle(order)
        for config in order:
            distiller, optimizer = built[config]
            tic = time.perf_counter()
            for _ in range(args.steps):
                step(distiller, optimizer, images, labels)
            samples[config].append((time.perf_counter() - tic) / args.steps)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    return {
        c: {
            "best_s": min(v),
            "median_s": statistics.median(v),
            "memory_mib": step_memory(*built[c], images, labels),
            "trainable": sum(p.numel() for p in built[c][0].trainable_parameters()),
        }
        for c, v in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="wrn_16_2")
    parser.add_argument("--student", default="mobile_half")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--m", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration and round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    figures = measure(args)
    kd = figures[("kd", 0)]
    print(
        f"teacher {args.teacher} -> student {args.student}, batch {args.batch} at {args.size} px, "
        f"{describe_cpu(torch.get_num_threads())}, torch {torch.__version__}"
    )
    print(f"{args.rounds} rounds x {args.steps} steps per configuration\n")
    print(
        "| method | m | trainable params | step, best round (ms) | vs KD | step, median round (ms) | vs KD "
        "| peak step memory (MiB) | vs KD |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for (method, m), f in figures.items():
        row = {"method": method, "m": m, **f}
        row |= {"best_ratio": f["best_s"] / kd["best_s"], "median_ratio": f["median_s"] / kd["median_s"]}
        row["memory_ratio"] = f["memory_mib"] / kd["memory_mib"]
        rows.append(row)
        print(
            f"| {method} | {m or '-'} | {f['trainable']:,} | {1e3 * f['best_s']:.1f} | {row['best_ratio']:.2f} | "
            f"{1e3 * f['median_s']:.1f} | {row['median_ratio']:.2f} | {f['memory_mib']:.1f} | "
            f"{row['memory_ratio']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
