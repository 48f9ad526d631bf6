"""Accuracy of every distillation method on one recipe (synthetic or real data): mean ± std over seeds.

One teacher is trained once (seed 0) and shared by every cell, so the methods differ only in how they
distill. Each cell (method x seed) is a normal pipeline run of the ``train`` stage in its own folder
under ``--work``, upon a copy of the teacher stage's artifacts, so an interrupted table resumes where it
stopped. The figure is the last epoch's student evaluated on the test split (never a
checkpoint picked on it), with the held-out validation accuracy beside it.

Warm-ups are given in epochs of the 240-epoch CIFAR recipe (20 for DKD and ReviewKD); a short proxy
run would never finish them, so by default a method's ``warmup_epochs`` is scaled to the same fraction
of the run (``--warmup-fraction``, 20/240) unless the method's options set it.

With ``--step-cost`` the table also gives each method's training-step time as a ratio to vanilla,
measured by ``bench_methods.py``'s interleaved rounds on the recipe's pair, batch and class count.
Finished cells are recorded in ``<work>/cells.json``, so a resumed table neither reruns nor rechecks them.

Usage:
    python benchmarks/proxy_methods.py [--preset default] [--set KEY=VALUE ...] [--methods kd dkd ...]
        [--variant LABEL METHOD '{"arg": 1}' ...] [--seeds 0 1 2] [--work runs/proxy-methods] [--write FILE]
        [--device cpu|cuda] [--step-cost] [--title TEXT]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from method_rows import add_row_options, rows

from pipeline.artifacts.machine import describe_cpu
from pipeline.artifacts.store import RunStore
from pipeline.cli.runner import run_stages
from pipeline.config import load_config
from pipeline.data import load_data
from pipeline.distill import METHODS, method_names

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
    parser.add_argument("--device", default=None, help="Run every cell on this device [default: the preset's].")
    parser.add_argument("--step-cost", action="store_true", help="Also time each method's training step.")
    parser.add_argument("--teacher", type=Path, default=None, help="Use this teacher run folder; do not train one.")
    parser.add_argument("--report-only", action="store_true", help="Write the table from finished cells; run none.")
    parser.add_argument("--title", default="Proxy accuracy of the distillation methods (synthetic data)")
    return parser.parse_args(argv)


def base_overrides(args: argparse.Namespace) -> list[str]:
    # The table reads the last epoch only; scoring the test split after every epoch would be wasted time.
    # Every seed trains on the teacher's (seed 0) split: seeds vary the student, not its data.
    sets = ["training.test_each_epoch=false", "data.split_seed=0", *args.overrides]
    return [*sets, *([f"device={args.device}"] if args.device else [])]


class CellLog:
    """Finished cells as one JSON file each in ``<work>/cells/``, plus claim files, so an interrupted table
    resumes by cell and several processes (``--threads 1`` each) can share one table's cells."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, label: str, seed: int, suffix: str) -> Path:
        return self.folder / f"{label}-seed{seed}.{suffix}"

    def get(self, label: str, seed: int, options: dict) -> dict | None:
        path = self._path(label, seed, "json")
        cell = json.loads(path.read_text()) if path.is_file() else None
        return cell if cell is not None and cell.get("row") == options else None

    def claim(self, label: str, seed: int) -> bool:
        """Whether this process may run the cell: nobody else alive is running it."""
        path = self._path(label, seed, "claim")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = int(path.read_text() or 0)
            if owner and owner != os.getpid() and _alive(owner):
                return False
            path.write_text(str(os.getpid()))  # left by a process that died: take it over
            return True
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True

    def put(self, label: str, seed: int, cell: dict) -> None:
        tmp = self._path(label, seed, "tmp")
        tmp.write_text(json.dumps(cell, indent=1, sort_keys=True))
        tmp.replace(self._path(label, seed, "json"))
        self._path(label, seed, "claim").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def step_costs(args: argparse.Namespace, cfg, which: list[tuple[str, str, dict]]) -> dict[str, float]:
    """Median training-step seconds per row (bench_methods.py's interleaved rounds), cached in ``--work``."""
    from bench_methods import measure_times

    cache = args.work / "step_cost.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    device = args.device or ("cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu")
    data = load_data(cfg.data, cfg.seed)
    bench_args = argparse.Namespace(
        teacher=cfg.teacher.arch,
        student=cfg.student.arch,
        classes=data.info.num_classes,
        batch_size=cfg.data.batch_size,
        samples=len(data.source("train")),  # CRD scores against its whole bank: the training split's size
        steps=3,
        rounds=3,
        warmup=1,
        device=device,
    )
    times = {label: statistics.median(v) for label, v in measure_times(bench_args, which).items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(times, indent=1))
    return times


def with_scaled_warmup(method: str, options: dict, epochs: int, fraction: float) -> dict:
    method_names()  # registers the built-in methods
    if "warmup_epochs" in options or "warmup_epochs" not in inspect.signature(METHODS.get(method).__init__).parameters:
        return options
    return {**options, "warmup_epochs": round(fraction * epochs, 4)}


def run_cell(args, label: str, method: str, options: dict, seed: int, teacher_run: Path) -> dict:
    """One method x seed: the ``train`` stage in its own run folder, upon a copy of the shared teacher stage
    (the runner re-hashes it as any upstream artifact), so the teacher is neither retrained nor re-scored."""
    base = load_config(args.preset, None, base_overrides(args))
    options = with_scaled_warmup(method, options, base.student.optim.epochs, args.warmup_fraction)
    sets = [
        *base_overrides(args),
        f"seed={seed}",
        f"student.method={method}",
        f"student.method_args={json.dumps(options)}",
    ]
    cfg = load_config(args.preset, None, sets)
    cell = args.work / f"{label}-seed{seed}"
    if not (cell / "teacher" / "manifest.json").is_file():
        shutil.rmtree(cell / "teacher", ignore_errors=True)
        shutil.copytree(teacher_run / "teacher", cell / "teacher")
    tic = time.perf_counter()
    run_stages(cfg, cell, ("train",), log=lambda _: None)
    manifest = RunStore(cell).manifest("train")
    history = json.loads((cell / "train" / "history.json").read_text())
    return {
        "images_per_s": statistics.mean(e["images_per_s"] for e in history if "images_per_s" in e),
        "test": manifest.metrics["test_top1"],
        "val": manifest.metrics.get("val_top1"),
        "seconds": manifest.meta.get("duration_s", time.perf_counter() - tic),
        "options": options,
        "seed": seed,
    }


def _mean_std(values: list[float]) -> str:
    if not values or any(v is None for v in values):
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    std = statistics.stdev(values)
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def _training_images(cfg) -> str:
    if cfg.data.dataset == "synthetic":
        return f"{cfg.data.synthetic.train_size} synthetic training images"
    share = f"a seeded {cfg.data.train_subset}-image share of" if cfg.data.train_subset else "all of"
    return f"{share} the {cfg.data.dataset} training split ({cfg.data.val_fraction:.0%} of it held out as val)"


def _device(args, cfg) -> str:
    device = args.device or cfg.device
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name(0)
    return "CPU"


def report(args, argv, cfg, teacher_top1: float, results: dict, seconds: float, costs: dict | None = None) -> str:
    optim = cfg.student.optim
    lines = [
        f"# {args.title}",
        "",
        f"- date: {date.today().isoformat()}",
        f"- machine: {describe_cpu()}, {os.cpu_count()} CPU cores, device {_device(args, cfg)}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads",
        f"- command: `python benchmarks/proxy_methods.py {' '.join(argv)}`",
        f"- setting: preset `{args.preset}` ({cfg.teacher.arch} -> {cfg.student.arch}, "
        f"{_training_images(cfg)}, {optim.epochs} student epochs at LR {optim.lr}, batch {cfg.data.batch_size}); "
        f"one teacher (seed 0, test top-1 {teacher_top1:.2f}%) imported by every cell",
        f"- figures: last-epoch student, top-1 % on the test split, mean ± sample std over seeds {args.seeds}; "
        "val is the held-out slice of the training split",
        f"- warm-ups scaled to {args.warmup_fraction:.4f} of the run where a method has one",
        f"- total wall time: {seconds / 60:.1f} min (this invocation; a resumed table counts only its own part)",
        "- train img/s: the cells' own training throughput (mean over epochs and seeds); step x vanilla is its "
        "inverse ratio to vanilla's, the step cost as the cells measured it",
        *(
            ["- step: median training-step time (forward, backward, SGD) over 3 interleaved rounds of 3 steps"]
            if costs
            else []
        ),
        "",
        "| method | test top-1 | val top-1 | per seed (test) | s per cell | train img/s | step x vanilla | options |"
        + (" step (ms) | x vanilla |" if costs else ""),
        "|---|---:|---:|---|---:|---:|---:|---|" + ("---:|---:|" if costs else ""),
    ]
    vanilla = results.get("vanilla") or []
    base_ips = statistics.mean(c["images_per_s"] for c in vanilla) if vanilla else None
    for label, cells in results.items():
        if not cells:
            lines.append(f"| {label} | - | - | not run yet | - | - | - | |" + (" - | - |" if costs else ""))
            continue
        tests = [c["test"] for c in cells]
        vals = [c["val"] for c in cells]
        per_seed = ", ".join(f"{v:.2f}" for v in tests)
        if len(cells) < len(args.seeds):
            per_seed += f" (only {len(cells)} of {len(args.seeds)} seeds)"
        secs = statistics.mean(c["seconds"] for c in cells)
        options = json.dumps(cells[0]["options"]) if cells[0]["options"] else ""
        ips = statistics.mean(c["images_per_s"] for c in cells)
        ratio = f"{base_ips / ips:.2f}" if base_ips else "-"
        row = f"| {label} | {_mean_std(tests)} | {_mean_std(vals)} | {per_seed} | {secs:.0f} | {ips:.1f} | {ratio} "
        row += f"| {options} |"
        if costs:
            row += f" {costs[label] * 1e3:.0f} | {costs[label] / costs['vanilla']:.2f} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tic = time.perf_counter()
    cfg = load_config(args.preset, None, [*base_overrides(args), "seed=0", "teacher.checkpoint=null"])
    teacher_run = args.teacher or args.work / "teacher"
    if args.teacher is None and not args.report_only:
        run_stages(cfg, teacher_run, ("teacher",), log=lambda line: print(line, file=sys.stderr))
    teacher_manifest = RunStore(teacher_run).manifest("teacher")
    which = rows(args)
    costs = step_costs(args, cfg, which) if args.step_cost else None
    done = CellLog(args.work / "cells")
    for seed in args.seeds:  # seed-major: an interrupted table still has every method's first seeds
        for label, method, options in which:
            if not args.report_only and done.get(label, seed, options) is None and done.claim(label, seed):
                cell = {**run_cell(args, label, method, options, seed, teacher_run), "row": options}
                done.put(label, seed, cell)
                print(f"{label} seed {seed}: test {cell['test']:.2f}%, {cell['seconds']:.0f}s", flush=True)
    results = {label: [c for s in args.seeds if (c := done.get(label, s, options))] for label, _, options in which}
    missing = sum(len(args.seeds) - len(cells) for cells in results.values())
    if missing:
        print(f"{missing} cells are not finished (running elsewhere, or interrupted): the table shows the rest")
    text = report(args, argv, cfg, teacher_manifest.metrics["test_top1"], results, time.perf_counter() - tic, costs)
    print(text)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)


if __name__ == "__main__":
    main()
