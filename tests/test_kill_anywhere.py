"""benchmarks/kill_anywhere.py, one trial: the script that kills `run all` at random moments keeps working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("subprocess")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 50 s: the reference run, one killed run and its rerun
def test_one_random_kill_and_rerun_passes(tmp_path):
    script = ROOT / "benchmarks" / "kill_anywhere.py"
    done = subprocess.run(
        [sys.executable, str(script), "--trials", "1", "--seed", "3", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[1].startswith("kill at ") and lines[1].endswith(" ok")
    assert json.loads(lines[-1]) == {**json.loads(lines[-1]), "trials": 1, "passed": 1}
    assert not (tmp_path / "trial-0").exists()  # a passed trial's folder is removed; the reference stays
    assert (tmp_path / "reference" / "train" / "student.safetensors").is_file()
