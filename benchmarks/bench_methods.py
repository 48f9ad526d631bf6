"""Training-step time and peak memory of every distillation method, as ratios to the vanilla student.

All methods share one teacher and start from the same student weights. Times come from one process,
in interleaved rounds (every method once per round), so load on a shared machine hits them alike; the
figure is the median step time over rounds. Peak memory is measured per method in a fresh process: on
CUDA the peak allocated tensor memory of the steps, on CPU the growth of the process's peak resident
set (``VmHWM``, reset just before the first step) over its size then: the steps' working memory, as far
as the allocator returns freed memory to the system.

Usage:
    python benchmarks/bench_methods.py [--teacher resnet56 --student mobile_half] [--methods kd crd ...]
        [--variant LABEL METHOD '{"arg": 1}' ...] [--write docs/bench-methods.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from method_rows import add_row_options, rows

from pipeline.artifacts.machine import describe_cpu
from pipeline.distill import build_distiller
from pipeline.models import build_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="wrn_16_2")
    parser.add_argument("--student", default="mobile_half")
    add_row_options(parser)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--samples", type=int, default=50_000, help="Training-set size (CRD's memory bank).")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per method per round.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps per method first.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads [default: torch's].")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="Skip the per-method memory processes.")
    parser.add_argument("--write", type=Path, default=None, help="Markdown file to write the results to.")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class Bench:
    """One teacher, one batch, and a distiller per row built from the same student weights."""

    def __init__(self, args: argparse.Namespace, which: list[tuple[str, str, dict]]):
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        self.teacher = build_model(args.teacher, args.classes).to(self.device).eval()
        student = build_model(args.student, args.classes)
        size = student.info.input_size
        self.images = torch.randn(args.batch_size, 3, size, size, device=self.device)
        self.targets = torch.randint(0, args.classes, (args.batch_size,), device=self.device)
        self.indices = torch.randperm(args.samples, device=self.device)[: args.batch_size]
        self.runs = {}
        for label, method, options in which:
            fresh = build_model(args.student, args.classes)
            fresh.load_state_dict(student.state_dict())
            teacher = None if method == "vanilla" else self.teacher
            distiller = build_distiller(method, fresh, teacher, options, num_samples=args.samples).to(self.device)
            distiller.train().set_progress(1000.0)  # past every warm-up: the full loss is computed
            optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=1e-3, momentum=0.9)
            self.runs[label] = (distiller, optimizer)

    def step(self, label: str) -> None:
        distiller, optimizer = self.runs[label]
        extra = (self.indices,) if distiller.needs_indices else ()
        _, losses = distiller(self.images, self.targets, *extra)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    def time_steps(self, label: str, steps: int) -> float:
        self._sync()
        tic = time.perf_counter()
        for _ in range(steps):
            self.step(label)
        self._sync()
        return (time.perf_counter() - tic) / steps

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def measure_times(args: argparse.Namespace, which: list[tuple[str, str, dict]]) -> dict[str, list[float]]:
    bench = Bench(args, which)
    for label in bench.runs:
        for _ in range(args.warmup):
            bench.step(label)
    times: dict[str, list[float]] = {label: [] for label in bench.runs}
    for r in range(args.rounds):
        for label in bench.runs:
            times[label].append(bench.time_steps(label, args.steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()))
    return times


def _status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (VmRSS: resident now; VmHWM: peak resident since reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak of the steps alone can be read."""
    Path("/proc/self/clear_refs").write_text("5")


def memory_worker(args: argparse.Namespace) -> None:
    """Print one JSON line: peak memory of ``args.steps`` steps of one row, in a fresh process."""
    which = [row for row in rows(args) if row[0] == args.memory_worker]
    bench = Bench(args, which)
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
        base = torch.cuda.memory_allocated(bench.device)
        for _ in range(args.steps):
            bench.step(args.memory_worker)
        torch.cuda.synchronize(bench.device)
        total = torch.cuda.max_memory_allocated(bench.device)
        peak = total - base
    else:
        _reset_peak_rss()
        base = _status_bytes("VmRSS")
        for _ in range(args.steps):
            bench.step(args.memory_worker)
        total = _status_bytes("VmHWM")
        peak = total - base
    print(json.dumps({"step_bytes": peak, "total_bytes": total}))


def measure_memory(argv: list[str], label: str) -> dict:
    cmd = [sys.executable, __file__, *argv, "--memory-worker", label]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(args: argparse.Namespace, argv: list[str], times: dict, memory: dict) -> str:
    base_time = statistics.median(times["vanilla"])
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    mem_kind = "peak allocated CUDA memory" if device != "CPU" else "peak RSS growth over the pre-step RSS"
    lines = [
        "# Training-step cost of the distillation methods",
        "",
        f"- date: {date.today().isoformat()}",
        f"- machine: {describe_cpu()}, {os.cpu_count()} CPU cores, device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads",
        f"- command: `python benchmarks/bench_methods.py {' '.join(argv)}`",
        f"- pair: teacher {args.teacher} -> student {args.student}, batch {args.batch_size}, {args.classes} classes, "
        f"{args.samples} training samples (CRD bank); every method at its defaults, past its warm-up",
        f"- time: median over {args.rounds} interleaved rounds of {args.steps} steps (after {args.warmup} warm-up "
        "steps), forward + backward + SGD step",
        f"- memory: {mem_kind} over {args.steps} steps, one fresh process per method",
        "",
        "| method | step (ms) | x vanilla | step memory (MiB) | x vanilla | peak during steps (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base_mem = memory.get("vanilla", {}).get("step_bytes")
    for label, values in times.items():
        t = statistics.median(values)
        mem = memory.get(label)
        if mem:
            step_mib, total_mib = mem["step_bytes"] / 2**20, mem["total_bytes"] / 2**20
            ratio = f"{mem['step_bytes'] / base_mem:.2f}" if base_mem else "-"
            mem_cells = f"{step_mib:.0f} | {ratio} | {total_mib:.0f}"
        else:
            mem_cells = "- | - | -"
        lines.append(f"| {label} | {t * 1e3:.0f} | {t / base_time:.2f} | {mem_cells} |")
    return "\n".join(lines) + "\n"


def _without_option(argv: list[str], option: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args)
        return
    which = rows(args)
    times = measure_times(args, which)
    memory = {}
    if not args.no_memory:
        forwarded = _without_option(argv, "--write")
        for label, _, _ in which:
            memory[label] = measure_memory(forwarded, label)
            print(f"memory {label}: {memory[label]['step_bytes'] / 2**20:.0f} MiB per step")
    text = report(args, argv, times, memory)
    print(text)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)


if __name__ == "__main__":
    main()
