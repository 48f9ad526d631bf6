"""Training-step cost of each KDiffusion variant relative to plain KD, on the same teacher/student pair.

Every configuration (KD, then each variant at each m) is built once; timing rounds then visit them in
a fresh random order, so load from other processes on a shared machine spreads over all of them. A step
is forward, backward and an SGD update; the figure per configuration is the median over rounds of the
mean step time of a round, and ratios are against KD's median from the same run.

Peak memory is measured in a fresh subprocess per configuration: the peak resident set size during
a few steps minus the resident size just before them (models, optimizer and one warm-up step
included in the base), i.e. what a training step adds on top of the resident model. CPU tensors do not
go through ``tracemalloc``, and the torch profiler reports per-op allocations, not a peak; RSS is
coarse (allocator caching included) but comparable between configurations.

    python benchmarks/bench_kdiffusion_step.py --m 2 4 8 --rounds 5 --steps 5
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_probe(method: str, m: int, args: argparse.Namespace) -> dict:
    distiller, optimizer = build(method, m, args)
    images, labels = batch(args)
    step(distiller, optimizer, images, labels)
    base = rss_mib()
    for _ in range(3):
        step(distiller, optimizer, images, labels)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"base_mib": base, "peak_mib": peak, "step_mib": peak - base}


def time_steps(args: argparse.Namespace) -> dict[tuple[str, int], float]:
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
    return {c: statistics.median(v) for c, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="mobile_half")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--m", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--memory-probe", nargs=2, metavar=("METHOD", "M"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe[0], int(args.memory_probe[1]), args)))
        return

    timings = time_steps(args)
    memory = {}
    for method, m in configurations(args.m):
        cmd = [sys.executable, __file__, "--memory-probe", method, str(m)]
        cmd += ["--teacher", args.teacher, "--student", args.student, "--classes", str(args.classes)]
        cmd += ["--batch", str(args.batch), "--size", str(args.size)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        memory[(method, m)] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    kd_time, kd_mem = timings[("kd", 0)], memory[("kd", 0)]["step_mib"]
    print(
        f"teacher {args.teacher} -> student {args.student}, batch {args.batch} at {args.size} px, "
        f"{torch.get_num_threads()} torch threads, {platform.machine()}, torch {torch.__version__}"
    )
    print(f"median of {args.rounds} rounds x {args.steps} steps; memory = peak RSS added by training steps\n")
    print("| method | m | step (ms) | vs KD | peak step memory (MiB) | vs KD |")
    print("|---|---|---|---|---|---|")
    rows = []
    for (method, m), seconds in timings.items():
        mem = memory[(method, m)]["step_mib"]
        rows.append(
            {
                "method": method,
                "m": m,
                "step_ms": 1e3 * seconds,
                "time_ratio": seconds / kd_time,
                "step_mib": mem,
                "memory_ratio": mem / kd_mem if kd_mem > 0 else float("nan"),
            }
        )
        print(
            f"| {method} | {m or '-'} | {1e3 * seconds:.1f} | {seconds / kd_time:.2f} | {mem:.0f} | "
            f"{rows[-1]['memory_ratio']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
