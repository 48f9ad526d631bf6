"""A sweep's table as a reader of one dataset asks for it: mean ± std, paired differences, plateau checks.

Reads a ``sweep`` folder (cells' manifests and ``history.json`` only, nothing is re-run) and prints markdown:

- per method, test top-1 of every seed, mean ± std, held-out val top-1 and the cell's training time;
- the paired difference per seed of each ``--pair A-B`` (same seed: same initialisation and data order),
  against the resolution of the test split (one image, and the binomial standard error of one top-1);
- whether each cell trained to its plateau: the spread of held-out val top-1 over the last fifth of the
  epochs (at least two) within ``--plateau`` points.

Usage: python benchmarks/paired_table.py SWEEP [--pair kdiffusion-kd --pair kd-vanilla] [--plateau 0.5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.report.collect import RunData, read_runs
from pipeline.report.table import Stat


def plateau(run: RunData, points: float) -> tuple[bool | None, str]:
    """(reached, detail): val top-1 spread over the last fifth of the scored epochs, at least two of them
    (``training.val_every`` above 1 scores fewer epochs than were trained, and the detail says so)."""
    history = run.history("train")
    vals = [e["val_top1"] for e in history if isinstance(e.get("val_top1"), (int, float))]
    if len(vals) < 2:
        return None, "no per-epoch val top-1"
    tail = vals[-max(2, math.ceil(len(vals) / 5)) :]
    spread = max(tail) - min(tail)
    of = f"{len(vals)} epochs" if len(vals) == len(history) else f"{len(vals)} scored epochs of {len(history)}"
    return spread <= points, f"{min(tail):.2f}-{max(tail):.2f} over the last {len(tail)} of {of}"


def table(root: Path, pairs: list[tuple[str, str]], points: float, test_images: int) -> str:
    runs, _ = read_runs([root])
    done = [r for r in runs if r.metric("train", "test_top1") is not None]
    if not done:
        raise SystemExit(f"{root}: no cell has finished its train stage yet")
    by_method: dict[str, dict[int, RunData]] = {}
    for run in done:
        by_method.setdefault(run.method or "?", {})[run.seed] = run
    seeds = sorted({s for cells in by_method.values() for s in cells})
    teacher = next((r.metric("train", "teacher_test_top1") for r in done), None)

    out = [
        f"| row | {' | '.join(f'seed {s}' for s in seeds)} | test top-1 % (mean ± std) | val top-1 % "
        "| train time per cell |",
        "|---|" + "---:|" * (len(seeds) + 3),
    ]
    if teacher is not None:
        out.append(f"| teacher | {' | '.join('' for _ in seeds)} | {teacher:.2f} | | |")
    for method, cells in by_method.items():
        tests = [cells[s].metric("train", "test_top1") for s in seeds if s in cells]
        vals = [v for s in seeds if s in cells and (v := cells[s].metric("train", "val_top1")) is not None]
        minutes = [cells[s].manifests["train"].meta.get("duration_s", 0) / 60 for s in seeds if s in cells]
        row = [f"{cells[s].metric('train', 'test_top1'):.2f}" if s in cells else "" for s in seeds]
        out.append(
            f"| {method} | {' | '.join(row)} | {Stat(tests).format()} | {Stat(vals).format()} "
            f"| {statistics.mean(minutes):.1f} min |"
        )

    se = 100 * math.sqrt(0.9 * 0.1 / test_images)
    out += [
        "",
        f"Paired by seed, test top-1 points (one image = {100 / test_images:.2f} point; binomial standard "
        f"error of one top-1 near 90 % on {test_images:,} images = {se:.2f} point):",
        "",
    ]
    out += [f"| difference | {' | '.join(f'seed {s}' for s in seeds)} | mean |", "|---|" + "---:|" * (len(seeds) + 1)]
    for a, b in pairs:
        diffs = {
            s: by_method[a][s].metric("train", "test_top1") - by_method[b][s].metric("train", "test_top1")
            for s in seeds
            if s in by_method.get(a, {}) and s in by_method.get(b, {})
        }
        row = [f"{diffs[s]:+.2f}" if s in diffs else "" for s in seeds]
        mean = f"{statistics.mean(diffs.values()):+.2f}" if diffs else "-"
        out.append(f"| {a} - {b} | {' | '.join(row)} | {mean} |")

    out += ["", f"Plateau (held-out val top-1 over the last fifth of the epochs within {points} point):", ""]
    reached = 0
    for method, cells in by_method.items():
        for s in seeds:
            if s in cells:
                ok, detail = plateau(cells[s], points)
                reached += bool(ok)
                out.append(f"- {method} seed {s}: {'yes' if ok else 'no' if ok is False else '?'} ({detail})")
    out.insert(0, f"{len(done)} finished cells, {reached} at their plateau.\n")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--pair", action="append", default=None, help="A-B: methods to difference per seed")
    parser.add_argument("--plateau", type=float, default=0.5, help="points of val top-1 (default 0.5)")
    parser.add_argument("--test-images", type=int, default=10_000, help="size of the test split (default 10,000)")
    args = parser.parse_args(argv)
    pairs = [tuple(p.split("-", 1)) for p in (args.pair or ["kdiffusion-kd", "kd-vanilla"])]
    if any(len(p) != 2 for p in pairs):
        parser.error("--pair takes A-B, two method names")
    print(table(args.sweep, pairs, args.plateau, args.test_images), end="")


if __name__ == "__main__":
    main()
