"""SIGKILL `run all` at random moments, rerun the same command, and check that nothing was lost or corrupted.

One uninterrupted run gives the reference and the run's length; each trial starts a fresh run, kills it with
SIGKILL after a delay drawn uniformly over that length (so the kill lands in any stage: training, fuse, verify,
export, a manifest write, the report), then runs the same command again. A trial passes when the rerun exits 0,
`inspect` finds every stage intact (exit 0), no staging leftovers or resume state remain, and the trained
weights (teacher and student) are those of the uninterrupted run, bit for bit: what a kill interrupts is
either discarded or resumed exactly.

    python benchmarks/kill_anywhere.py --trials 12 --seed 0 [--out /tmp/kill-anywhere]

Prints one line per trial (the delay, the stages finished at the kill, the rerun's time) and a summary; exit 1
if any trial failed. The results of a run are in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    "data.synthetic.train_size=480",
    "data.synthetic.test_size=640",  # enough images that the INT8 gate (a drop of at most 1 point) is fair
    "data.num_classes=4",
    "data.batch_size=16",
    "teacher.arch=resnet20",
    "teacher.optim.epochs=2",
    "teacher.optim.lr=0.02",
    "student.arch=resnet20",  # KDiffusion's m-branch blocks, so fuse has branches to fold
    "student.optim.epochs=2",
    "verify.samples=64",
    "export.parity_samples=32",
    "training.checkpoint_every=3",
]
WEIGHTS = ("teacher/teacher.safetensors", "train/student.safetensors")


def command(out: Path, stages: str = "all") -> list[str]:
    sets = [a for item in SETTINGS for a in ("--set", item)]
    return [sys.executable, "-m", "pipeline", "run", stages, "--device", "cpu", "--out", str(out), *sets]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINE_PROGRESS": "0"}


def digests(run: Path) -> dict[str, str]:
    return {name: hashlib.sha256((run / name).read_bytes()).hexdigest() for name in WEIGHTS}


def finished(run: Path) -> list[str]:
    """The stages whose manifest was committed, in pipeline order."""
    order = ["teacher", "train", "fuse", "verify", "export", "engine"]
    return [name for name in order if (run / name / "manifest.json").is_file()]


def trial(reference: dict[str, str], run: Path, delay: float) -> tuple[bool, str]:
    process = subprocess.Popen(command(run), cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    at_kill = finished(run) if run.exists() else []
    start = time.monotonic()
    rerun = subprocess.run(command(run), cwd=ROOT, env=environment(), capture_output=True, text=True)
    seconds = time.monotonic() - start
    problems = []
    if rerun.returncode != 0:
        problems.append(f"rerun exit {rerun.returncode}: {rerun.stderr.strip().splitlines()[-1:]}")
    else:
        check = subprocess.run([sys.executable, "-m", "pipeline", "inspect", str(run)], cwd=ROOT,
                               env=environment(), capture_output=True, text=True)  # fmt: skip
        if check.returncode != 0:
            problems.append(f"inspect exit {check.returncode}: {check.stderr.strip().splitlines()[-1:]}")
        leftovers = [p.name for p in (run / ".staging").iterdir()] + [p.name for p in (run / ".scratch").glob("*")]
        if leftovers:
            problems.append(f"leftovers: {leftovers}")
        if digests(run) != reference:
            problems.append("weights differ from the uninterrupted run's")
    stages = ",".join(at_kill) or "-"
    line = f"kill at {delay:5.2f} s  finished then: {stages:<40}  rerun {seconds:5.1f} s  "
    return not problems, line + ("ok" if not problems else "; ".join(problems))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="work folder [default: a temporary one]")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="kill-anywhere-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    subprocess.run(command(work / "reference"), cwd=ROOT, env=environment(), check=True, capture_output=True)
    length = time.monotonic() - start
    reference = digests(work / "reference")
    print(f"uninterrupted run: {length:.1f} s; {args.trials} trials, kills drawn in (0, {length:.1f}) s", flush=True)
    draw = random.Random(args.seed)
    results = []
    for i in range(args.trials):
        run = work / f"trial-{i}"
        ok, line = trial(reference, run, draw.uniform(0, length))
        print(line, flush=True)
        results.append(ok)
        if ok:
            shutil.rmtree(run)
    print(json.dumps({"trials": len(results), "passed": sum(results), "run_seconds": round(length, 1)}))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
