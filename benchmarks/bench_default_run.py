"""Wall time of `python -m pipeline run all` on the built-in default, per stage, from a cold run folder.

Usage: python benchmarks/bench_default_run.py [--repeats 1] [--write docs/bench-default-run.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from pipeline.artifacts.machine import describe_cpu
from stages import stage_order


def one_run(extra: list[str]) -> tuple[float, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        env = dict(os.environ, PIPELINE_PROGRESS="0")
        tic = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", "run", "all", "--out", str(out), *extra], check=True, env=env)
        total = time.perf_counter() - tic
        manifests = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/manifest.json")}
        stages = {name: manifests[name]["meta"]["duration_s"] for name in stage_order() if name in manifests}
    return total, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--write", type=Path, default=None, help="Markdown file to write the results to.")
    parser.add_argument("extra", nargs="*", help="Extra arguments for `run all`.")
    args = parser.parse_args()
    runs = [one_run(args.extra) for _ in range(args.repeats)]
    lines = [
        "# Default run wall time",
        "",
        f"- date: {date.today().isoformat()}",
        f"- machine: {describe_cpu()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, no GPU",
        f"- command: `python benchmarks/bench_default_run.py --repeats {args.repeats}` "
        "(each repeat: `python -m pipeline run all` into a fresh folder, process start included)",
        "",
        "| repeat | total (s) | " + " | ".join(runs[0][1]) + " |",
        "|---" * (len(runs[0][1]) + 2) + "|",
    ]
    for i, (total, stages) in enumerate(runs, 1):
        lines.append(f"| {i} | {total:.1f} | " + " | ".join(f"{v:.1f}" for v in stages.values()) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        args.write.write_text(text)


if __name__ == "__main__":
    main()
