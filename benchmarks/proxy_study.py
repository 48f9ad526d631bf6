"""Proxy accuracy study of the KDiffusion variants on the built-in synthetic task (or any preset).

One teacher is trained once (or imported with ``--teacher-checkpoint``) and shared by every cell. The
cells are the vanilla student, KD, Single Layer Average, and Single Layer, Multiple Layer and + Target
Guide KDiffusion each with the ``mean`` and ``student_noise`` targets; every cell runs for each seed (the
seed sets the student's initialisation, branch permutations and batch order; the data split is fixed).
The figure is the last epoch's test top-1, mean ± sample std over seeds; the held-out val top-1 is
reported beside it (that is the split to choose a default on).

Results are appended to ``<out>/results.jsonl`` as each run finishes, so an interrupted study resumes
where it stopped; the table is printed and written to ``<out>/table.md``.

    python benchmarks/proxy_study.py --out runs/proxy              # the full study (~40 min on 2 idle cores)
    python benchmarks/proxy_study.py --out /tmp/proxy --quick      # a seconds-scale check of every cell
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.artifacts.checkpoint import ModelMeta, load_state_dict_file, load_strict, save_checkpoint
from pipeline.artifacts.hashing import sha256_json
from pipeline.config import Config, load_config
from pipeline.data import load_data
from pipeline.distill import build_distiller
from pipeline.models import build_model
from pipeline.training import NonFiniteLossError, evaluate, fit, make_loader

# (label, method, method_args); method_args come on top of the preset's own for KDiffusion methods.
CELLS: list[tuple[str, str, dict]] = [
    ("vanilla student", "vanilla", {}),
    ("KD", "kd", {}),
    ("Single Layer Average", "kdiffusion_single_avg", {}),
    ("Single Layer (mean)", "kdiffusion_single", {"target_mode": "mean"}),
    ("Single Layer (student_noise)", "kdiffusion_single", {"target_mode": "student_noise"}),
    ("Multiple Layer (mean)", "kdiffusion_multi", {"target_mode": "mean"}),
    ("Multiple Layer (student_noise)", "kdiffusion_multi", {"target_mode": "student_noise"}),
    ("+ Target Guide (mean)", "kdiffusion", {"target_mode": "mean"}),
    ("+ Target Guide (student_noise)", "kdiffusion", {"target_mode": "student_noise"}),
]

QUICK = [  # enough teacher steps for its BN running statistics to settle; the student gets one epoch
    "data.synthetic.train_size=320",
    "data.synthetic.test_size=64",
    "data.batch_size=32",
    "teacher.optim.epochs=3",
    "teacher.optim.milestones=[]",
    "student.optim.epochs=1",
    "student.optim.milestones=[]",
]


def study_config(args: argparse.Namespace) -> Config:
    overrides = list(QUICK) if args.quick else []
    if not args.quick:
        for who, epochs in (("teacher", args.teacher_epochs), ("student", args.epochs)):
            overrides += [f"{who}.optim.epochs={epochs}", f"{who}.optim.milestones=[{int(epochs * 0.75)}]"]
    return load_config(args.preset, None, overrides + list(args.set))  # --set wins


def teacher_model(cfg: Config, data, device, out: Path, checkpoint: Path | None) -> tuple[torch.nn.Module, float]:
    teacher = build_model(cfg.teacher.arch, data.info.num_classes)
    recipe = {
        "arch": cfg.teacher.arch,
        "optim": dataclasses.asdict(cfg.teacher.optim),
        "data": dataclasses.asdict(cfg.data),
    }
    path = checkpoint or out / f"teacher-{sha256_json({**recipe, 'seed': cfg.seed})[:12]}.safetensors"
    if path.is_file():
        load_strict(teacher, load_state_dict_file(path), str(path))
    else:
        torch.manual_seed(cfg.seed)
        distiller = build_distiller("vanilla", teacher, None)
        train = make_loader(data.dataset("train", augment=True), cfg.data, train=True, seed=cfg.seed, device=device)
        fit(distiller, train, None, cfg.teacher.optim, device, log=_log, desc="teacher", seed=cfg.seed)
        save_checkpoint(path, teacher.state_dict(), ModelMeta.from_data(data.info, cfg.teacher.arch))
    test = make_loader(data.dataset("test"), cfg.data, train=False, device=device)
    return teacher, evaluate(teacher, test, device)["top1"]


def run_cell(cfg: Config, data, device, teacher, method: str, method_args: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    student = build_model(cfg.student.arch, data.info.num_classes)
    if method.startswith("kdiffusion"):
        method_args = {**cfg.student.method_args, **method_args}
    distiller = build_distiller(method, student, teacher, method_args)
    train = make_loader(data.dataset("train", augment=True), cfg.data, train=True, seed=seed, device=device)
    val = make_loader(data.dataset("val"), cfg.data, train=False, device=device) if len(data.source("val")) else None
    tic = time.perf_counter()
    history = fit(distiller, train, val, cfg.student.optim, device, log=lambda _: None, desc=method, seed=seed)
    test = make_loader(data.dataset("test"), cfg.data, train=False, device=device)
    return {
        "test_top1": evaluate(distiller.student, test, device)["top1"],
        "val_top1": history.last.get("val_top1"),
        "best_val_top1": max((e.get("val_top1", 0.0) for e in history.epochs), default=None),
        "seconds": time.perf_counter() - tic,
    }


def table(results: list[dict], labels: list[str]) -> str:
    lines = [
        "| cell | method | test top-1 (last epoch) | val top-1 (last epoch) | seeds | s/run |",
        "|---|---|---|---|---|---|",
    ]
    for label in labels:
        rows = [r for r in results if r["cell"] == label]
        if not rows:
            continue
        ok = [r for r in rows if r["test_top1"] is not None]
        test, val = [r["test_top1"] for r in ok], [r["val_top1"] for r in ok if r["val_top1"] is not None]
        seeds = f"{len(ok)}" + (f" ({len(rows) - len(ok)} diverged)" if len(ok) < len(rows) else "")
        seconds = statistics.mean(r["seconds"] for r in ok) if ok else 0.0
        test_text, val_text = (_mean_std(test) if test else "-"), (_mean_std(val) if val else "-")
        lines.append(f"| {label} | {rows[0]['method']} | {test_text} | {val_text} | {seeds} | {seconds:.0f} |")
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the teacher, results.jsonl and table.md")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15, help="student epochs (LR x0.1 at 75%%)")
    parser.add_argument("--teacher-epochs", type=int, default=20, help="teacher epochs (LR x0.1 at 75%%)")
    parser.add_argument("--cells", nargs="+", help="run only the cells whose label contains one of these")
    parser.add_argument("--teacher-checkpoint", type=Path, help="a trained teacher to use instead of training one")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="tiny data, 1 epoch, first seed: checks every cell runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds = args.seeds[:1]
    cells = [c for c in CELLS if not args.cells or any(key in c[0] for key in args.cells)]
    cfg = study_config(args)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    data = load_data(cfg.data, cfg.seed)
    tic = time.perf_counter()
    teacher, teacher_top1 = teacher_model(cfg, data, device, args.out, args.teacher_checkpoint)
    _log(f"teacher {cfg.teacher.arch}: test top-1 {teacher_top1:.2f} ({time.perf_counter() - tic:.0f} s)")

    results_path = args.out / "results.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.is_file() else []
    setting = {"cfg": dataclasses.asdict(cfg), "quick": args.quick}
    done = [r for r in done if r["setting"] == setting]
    for label, method, method_args in cells:
        for seed in args.seeds:
            if any(r["cell"] == label and r["seed"] == seed for r in done):
                continue
            try:
                result = run_cell(cfg, data, device, teacher, method, method_args, seed)
                _log(f"{label} seed {seed}: test top-1 {result['test_top1']:.2f} ({result['seconds']:.0f} s)")
            except NonFiniteLossError as exc:  # a diverged run is a result too; the study goes on
                result = {"test_top1": None, "val_top1": None, "best_val_top1": None, "seconds": 0.0, "error": str(exc)}
                _log(f"{label} seed {seed}: diverged ({exc})")
            record = {"cell": label, "method": method, "method_args": method_args, "seed": seed, **result}
            with results_path.open("a") as f:
                f.write(json.dumps({**record, "setting": setting}) + "\n")
            done.append({**record, "setting": setting})
    header = (
        f"teacher {cfg.teacher.arch} (test top-1 {teacher_top1:.2f}) -> student {cfg.student.arch}, "
        f"{cfg.data.dataset} data, {cfg.student.optim.epochs} student epochs, seeds {args.seeds}"
    )
    text = header + "\n\n" + table(done, [c[0] for c in cells])
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
