"""Proxy accuracy of every distillation method on the built-in synthetic data: mean ± std over seeds.

One teacher is trained once (seed 0) and imported by every cell (``teacher.checkpoint``), so the
methods differ only in how they distill. Each cell (method x seed) is a normal pipeline run of the
``teacher`` (import) and ``train`` stages in its own folder under ``--work``, so an interrupted table
resumes where it stopped. The figure is the last epoch's student evaluated on the test split (never a
checkpoint picked on it), with the held-out validation accuracy beside it.

Warm-ups are given in epochs of the 240-epoch CIFAR recipe (20 for DKD and ReviewKD); a short proxy
run would never finish them, so by default a method's ``warmup_epochs`` is scaled to the same fraction
of the run (``--warmup-fraction``, 20/240) unless the method's options set it.

Usage:
    python benchmarks/proxy_methods.py [--preset default] [--set KEY=VALUE ...] [--methods kd dkd ...]
        [--variant LABEL METHOD '{"arg": 1}' ...] [--seeds 0 1 2] [--work runs/proxy-methods] [--write FILE]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from method_rows import add_row_options, rows

from pipeline.config import load_config
from pipeline.distill import METHODS
from pipeline.runner import run_stages
from pipeline.store import RunStore
from stages.teacher import CHECKPOINT as TEACHER_CHECKPOINT

RECIPE_WARMUP_FRACTION = 20 / 240  # mdistiller's DKD/ReviewKD warm-up over the CIFAR recipe's epochs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_row_options(parser)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--warmup-fraction", type=float, default=RECIPE_WARMUP_FRACTION)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads [default: torch's].")
    parser.add_argument("--work", type=Path, default=Path("runs/proxy-methods"), help="Folder for the runs.")
    parser.add_argument("--write", type=Path, default=None, help="Markdown file to write the table to.")
    return parser.parse_args(argv)



def with_scaled_warmup(method: str, options: dict, epochs: int, fraction: float) -> dict:
    if "warmup_epochs" in options or "warmup_epochs" not in inspect.signature(METHODS.get(method).__init__).parameters:
        return options
    return {**options, "warmup_epochs": round(fraction * epochs, 4)}


def run_cell(args, label: str, method: str, options: dict, seed: int, teacher_path: Path) -> dict:
    base = load_config(args.preset, None, args.overrides)
    options = with_scaled_warmup(method, options, base.student.optim.epochs, args.warmup_fraction)
    sets = [
        *args.overrides,
        f"seed={seed}",
        f"student.method={method}",
        f"student.method_args={json.dumps(options)}",
        f"teacher.checkpoint={json.dumps(str(teacher_path))}",
    ]
    cfg = load_config(args.preset, None, sets)
    tic = time.perf_counter()
    run_stages(cfg, args.work / f"{label}-seed{seed}", ("teacher", "train"), log=lambda _: None)
    manifest = RunStore(args.work / f"{label}-seed{seed}").manifest("train")
    return {
        "test": manifest.metrics["test_top1"],
        "val": manifest.metrics.get("val_top1"),
        "seconds": manifest.meta.get("duration_s", time.perf_counter() - tic),
        "options": options,
    }


def _mean_std(values: list[float]) -> str:
    if not values or any(v is None for v in values):
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def report(args, argv, cfg, teacher_top1: float, results: dict, seconds: float) -> str:
    lines = [
        "# Proxy accuracy of the distillation methods (synthetic data)",
        "",
        f"- date: {date.today().isoformat()}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads",
        f"- command: `python benchmarks/proxy_methods.py {' '.join(argv)}`",
        f"- setting: preset `{args.preset}` ({cfg.teacher.arch} -> {cfg.student.arch}, "
        f"{cfg.data.synthetic.train_size} synthetic training images, {cfg.student.optim.epochs} student epochs); "
        f"one teacher (seed 0, test top-1 {teacher_top1:.2f}%) imported by every cell",
        f"- figures: last-epoch student, top-1 % on the test split, mean ± sample std over seeds {args.seeds}; "
        "val is the held-out slice of the training split",
        f"- warm-ups scaled to {args.warmup_fraction:.4f} of the run where a method has one",
        f"- total wall time: {seconds / 60:.1f} min",
        "",
        "| method | test top-1 | val top-1 | per seed (test) | s per cell | options |",
        "|---|---:|---:|---|---:|---|",
    ]
    for label, cells in results.items():
        tests = [c["test"] for c in cells]
        vals = [c["val"] for c in cells]
        per_seed = ", ".join(f"{v:.2f}" for v in tests)
        secs = statistics.mean(c["seconds"] for c in cells)
        options = json.dumps(cells[0]["options"]) if cells[0]["options"] else ""
        lines.append(f"| {label} | {_mean_std(tests)} | {_mean_std(vals)} | {per_seed} | {secs:.0f} | {options} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tic = time.perf_counter()
    cfg = load_config(args.preset, None, [*args.overrides, "seed=0", "teacher.checkpoint=null"])
    run_stages(cfg, args.work / "teacher", ("teacher",), log=lambda line: print(line, file=sys.stderr))
    teacher_manifest = RunStore(args.work / "teacher").manifest("teacher")
    teacher_path = (args.work / "teacher" / "teacher" / TEACHER_CHECKPOINT).resolve()
    results: dict[str, list[dict]] = {}
    for label, method, options in rows(args):
        for seed in args.seeds:
            cell = run_cell(args, label, method, options, seed, teacher_path)
            results.setdefault(label, []).append(cell)
            print(f"{label} seed {seed}: test {cell['test']:.2f}%, {cell['seconds']:.0f}s", flush=True)
    text = report(args, argv, cfg, teacher_manifest.metrics["test_top1"], results, time.perf_counter() - tic)
    print(text)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)


if __name__ == "__main__":
    main()
