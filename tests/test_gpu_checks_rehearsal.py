"""The GPU check script rehearsed on the CPU: every step it runs on a lent GPU runs here for a few steps, so the
one GPU call a session may get never fails on a typo, a renamed option or a missing file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.test_fashion_mnist import write_idx_set

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # about 2 minutes on 2 CPU cores


def _rehearse(tmp_path: Path, **env: str) -> tuple[Path, str]:
    """Run the script's CPU rehearsal with a 600 s budget; its output folder and summary."""
    out = tmp_path / "checks"
    write_idx_set(tmp_path / "idx", n_train=400, n_test=200)  # the real files' format; the GPU pass reads the real set
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "GPU_CHECKS_BUDGET": "600",
        "FMNIST_ROOT": str(tmp_path / "idx"),
        **env,
    }
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_checks.sh"), str(out), "--rehearse"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return out, summary


def test_every_step_of_the_gpu_script_runs_in_its_cpu_rehearsal(tmp_path):
    out, summary = _rehearse(tmp_path)
    steps = dict(re.findall(r"^== ([\w-]+): (.*)$", summary, re.M))
    assert set(steps) >= {"preflight", "throughput", "profile", "fmnist-sweep", "tests-gpu", "total"}, summary
    # A one-epoch model on 64 test images may fail its INT8 gate (exit 1) by processor: the rehearsal checks that
    # every cell runs through every stage, not the verdicts; the table below needs each cell's trained student.
    allowed = {"preflight": "0", "throughput": "0", "profile": "0", "tests-gpu": "0", "fmnist-sweep": "01"}
    for name, codes in allowed.items():
        log = (out / f"{name}.log").read_text()[-3000:]
        assert steps[name].split()[:2] in [["exit", c] for c in codes], f"{name}: {steps[name]}\n{log}"
    assert "| peer |" in (out / "throughput.md").read_text()
    table = (out / "fmnist.md").read_text()
    for method in ("vanilla", "kd", "kdiffusion"):
        assert re.search(rf"^\| {method} \|", table, re.M), table
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("train/manifest.json") for n in names) and "./summary.txt" in names
    assert not any(n.endswith((".safetensors", ".onnx")) for n in names)  # weights stay on the GPU machine


def test_the_sweep_run_alone_takes_the_budget_the_other_steps_leave(tmp_path):
    """The six rows do not fit beside the other steps: `GPU_CHECKS_ONLY=preflight,fmnist-sweep` gives the sweep the
    whole budget (less the preflight and the packing time), not its share of a full pass."""
    _, summary = _rehearse(tmp_path, GPU_CHECKS_ONLY="preflight,fmnist-sweep", FMNIST_METHODS="vanilla")
    assert "== throughput: not selected" in summary and "== tests-gpu: not selected" in summary
    limit = int(re.search(r"^== fmnist-sweep: exit [01] in \d+ s \(limit (\d+) s\)$", summary, re.M).group(1))
    assert 600 - 25 - 60 < limit <= 600 - 25, summary  # a full pass gives it at most 300 s in a rehearsal
