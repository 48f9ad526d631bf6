"""Kill a sweep midway (SIGKILL), run the same command again: only the unfinished cells run."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("subprocess"), pytest.mark.accuracy]
ROOT = Path(__file__).resolve().parents[1]
CELLS = ["default-vanilla-seed0", "default-vanilla-seed1", "default-kd-seed0", "default-kd-seed1"]


def _command(out: Path) -> list[str]:
    sets = [a for item in [*TINY, "export.precisions=[fp32]"] for a in ("--set", item)]
    methods = ["--method", "vanilla,kd", "--seed", "0,1", "--jobs", "2", "--device", "cpu"]
    return [sys.executable, "-m", "pipeline", "sweep", "--out", str(out), *methods, *sets]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINE_PROGRESS": "0"}


def _finished(out: Path) -> set[str]:
    return {c for c in CELLS if (out / "cells" / c / "sweep-task.json").is_file()}


def _wait_unlocked(folder: Path, timeout: float = 60) -> None:
    """The killed sweep's cells die with it (SIGTERM from the kernel); wait until none holds its run folder."""
    lock = folder / ".lock"
    deadline = time.monotonic() + timeout
    while lock.is_file():
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError:
                assert time.monotonic() < deadline, f"{folder} is still locked"
                time.sleep(0.2)


def test_a_killed_sweep_reruns_only_its_unfinished_cells(tmp_path):
    out = tmp_path / "sweep"
    process = subprocess.Popen(_command(out), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 900
    while not _finished(out):  # the teacher and at least one cell are done, others are running or waiting
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()
    done_before = _finished(out)
    assert done_before and done_before != set(CELLS)
    for cell in CELLS:
        _wait_unlocked(out / "cells" / cell)
    teacher_manifest = next((out / "teachers").glob("*/teacher/manifest.json"))
    teacher_started = json.loads(teacher_manifest.read_text())["meta"]["started"]
    started = {c: json.loads((out / "cells" / c / "train/manifest.json").read_text())["meta"] for c in done_before}

    rerun = subprocess.run(_command(out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1800)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    status = {line.split()[0]: line.split()[1] for line in rerun.stdout.splitlines()[1:] if len(line.split()) >= 2}
    for cell in CELLS:
        assert status[cell] == ("up" if cell in done_before else "ran"), rerun.stdout  # "up to date" or "ran"
    assert [s for name, s in status.items() if name.startswith("teacher-")] == ["up"]  # trained once, never again
    assert json.loads(teacher_manifest.read_text())["meta"]["started"] == teacher_started
    for cell, meta in started.items():  # finished cells were not touched
        assert json.loads((out / "cells" / cell / "train/manifest.json").read_text())["meta"] == meta
    assert _finished(out) == set(CELLS)
    assert "sweep: 5/5 done, 0 running, 0 failed" in rerun.stderr

    table = subprocess.run(
        [sys.executable, "-m", "pipeline", "compare", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert table.returncode == 0, table.stderr
    rows = [line.split()[0] for line in table.stdout.splitlines()[2:5]]
    assert rows == ["teacher", "vanilla", "kd"]
    assert "2" in table.stdout.splitlines()[3].split()[:5]  # vanilla: mean ± std over n = 2 seeds
