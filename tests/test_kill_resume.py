"""SIGKILL in the middle of an epoch, run the same command again: the weights equal an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.xdist_group("subprocess")

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    "data.synthetic.train_size=72",
    "data.synthetic.test_size=16",
    "data.num_classes=4",
    "data.batch_size=8",  # 65 training samples: 8 steps per epoch, so the kill lands well inside the first
    "teacher.arch=resnet20",
    "teacher.optim.epochs=3",
    "teacher.optim.milestones=[2]",
    "training.checkpoint_every=1",
]


# The DataLoader path, and the device-resident data path with metrics read once per log interval.
PATHS = {"dataloader": [], "device_data": ["training.device_data=true", "training.defer_metrics=true"]}


def _command(out: Path, extra: list[str]) -> list[str]:
    sets = [a for item in SETTINGS + extra for a in ("--set", item)]
    return [sys.executable, "-m", "pipeline", "run", "teacher", "--device", "cpu", "--out", str(out), *sets]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINE_PROGRESS": "0"}


@pytest.mark.slow  # 97 s here per path (2 CPU cores, one thread)
@pytest.mark.parametrize("path", PATHS)
def test_sigkill_mid_epoch_then_rerun_reproduces_the_uninterrupted_weights(tmp_path, path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_command(reference, PATHS[path]), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)

    process = subprocess.Popen(_command(killed, PATHS[path]), cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(killed.glob(".scratch/teacher-*/resume.pt")):  # the first checkpoint: epoch 1, step 1
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "teacher").exists()  # a killed stage leaves no artifact

    command = _command(killed, PATHS[path])
    rerun = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "teacher: resumed at epoch 1, step " in rerun.stderr  # from the middle of the first epoch
    a = load_file(reference / "teacher" / "teacher.safetensors")
    b = load_file(killed / "teacher" / "teacher.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])]
    assert not list(killed.glob(".scratch/teacher-*"))  # the resume state is dropped once the stage is committed
