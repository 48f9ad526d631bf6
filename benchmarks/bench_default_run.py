"""Wall time of `python -m pipeline run all` on the built-in default, per stage, from a cold run folder.

With ``--baseline KEY=VALUE`` (repeatable) the same run is timed again with those settings, interleaved with the
default in each repeat, so the ratio default/baseline comes from one machine in one sitting (issue 21: the default
at most 0.7x of the stage time before the CPU speed settings, ``--baseline training.channels_last=false``, with the
same accuracy within noise). Repeat ``i`` runs with ``seed=i`` in both arms, so the accuracies pair by seed.

Usage: python benchmarks/bench_default_run.py [--repeats 1] [--baseline KEY=VALUE ...] [--write docs/x.md]
    [-- extra `run all` arguments]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from pipeline.artifacts.machine import describe_cpu
from stages import stage_order

TRAINING_STAGES = ("teacher", "train")  # the stages the CPU speed settings act on


def one_run(extra: list[str]) -> dict:
    """Wall time of one ``run all``, each stage's own duration, and the teacher's and student's test top-1."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        env = dict(os.environ, PIPELINE_PROGRESS="0")
        tic = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", "run", "all", "--out", str(out), *extra], check=True, env=env)
        total = time.perf_counter() - tic
        manifests = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/manifest.json")}
    stages = {name: manifests[name]["meta"]["duration_s"] for name in stage_order() if name in manifests}
    top1 = {name: manifests[name]["metrics"].get("test_top1") for name in TRAINING_STAGES if name in manifests}
    speed = manifests.get("train", {}).get("metrics", {}).get("training_speed", "")
    return {"total": total, "stages": stages, "top1": top1, "speed": speed}


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def table(label: str, runs: list[dict]) -> list[str]:
    names = list(runs[0]["stages"])
    lines = [
        f"| {label} | seed | total (s) | " + " | ".join(names) + " | teacher top-1 | student top-1 |",
        "|---" * (len(names) + 5) + "|",
    ]
    for r in runs:
        lines.append(
            f"| {r['arm']} | {r['seed']} | {r['total']:.1f} | "
            + " | ".join(f"{r['stages'].get(n, 0):.1f}" for n in names)
            + f" | {r['top1'].get('teacher', 0):.2f} | {r['top1'].get('train', 0):.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--baseline", action="append", default=[], help="a setting of the baseline arm (KEY=VALUE)")
    parser.add_argument("--write", type=Path, default=None, help="Markdown file to append the results to.")
    parser.add_argument("extra", nargs="*", help="Extra arguments for `run all` (both arms).")
    args = parser.parse_args()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    arms = {"default": []} | ({"baseline": sets(args.baseline)} if args.baseline else {})
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in range(args.repeats):
        for arm, arm_sets in arms.items():  # interleaved: a drift in the machine's speed hits both arms alike
            runs[arm].append({"arm": arm, "seed": seed, **one_run([*args.extra, *sets([f"seed={seed}"]), *arm_sets])})
    command = "python benchmarks/bench_default_run.py " + " ".join(sys.argv[1:])
    lines = [
        f"## {started}: `run all`" + (f" against {' '.join(args.baseline)}" if args.baseline else ""),
        "",
        f"- machine: {describe_cpu()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        f"- command: `{command}` (each run: `python -m pipeline run all` into a fresh folder, process start "
        "included; durations in seconds; test top-1 in %)",
        f"- the default's training speed settings: {runs['default'][0]['speed'] or '-'}",
        "",
        *table("arm", runs["default"] + runs.get("baseline", [])),
    ]
    if args.baseline:
        lines += ["", *summary(runs["default"], runs["baseline"])]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + text)


def summary(default: list[dict], baseline: list[dict]) -> list[str]:
    """Time ratios default/baseline (all stages, training stages) and the paired top-1 differences."""

    def train_s(r: dict) -> float:
        return sum(r["stages"].get(n, 0) for n in TRAINING_STAGES)

    total = statistics.mean(d["total"] for d in default) / statistics.mean(b["total"] for b in baseline)
    training = statistics.mean(map(train_s, default)) / statistics.mean(map(train_s, baseline))
    lines = [
        f"- time, default / baseline: **{training:.2f}x** for the training stages (teacher + train), "
        f"{total:.2f}x for the whole run",
    ]
    for stage, label in (("teacher", "teacher"), ("train", "student")):
        diffs = [d["top1"].get(stage, 0) - b["top1"].get(stage, 0) for d, b in zip(default, baseline)]
        lines.append(f"- {label} test top-1, default - baseline per seed: {', '.join(f'{x:+.2f}' for x in diffs)}")
    return lines


if __name__ == "__main__":
    main()
