"""Two gloo processes under torchrun against one process on the same global batch, through the runner.

A stage that is not distributed-aware (fuse, verify) runs on rank 0 alone in the same command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.artifacts.store import RunStore

pytestmark = pytest.mark.xdist_group("subprocess")

ROOT = Path(__file__).resolve().parents[1]
# Tolerance for 2 processes vs 1: the same global batch, so the only difference is the order of float
# additions (two half-batch means averaged by the all-reduce vs one full-batch mean), ~1e-7 relative per step.
ATOL, RTOL = 1e-6, 1e-5  # measured here: max-abs difference 6e-8 while training moves weights by ~3e-2
OVERRIDES = [
    "data.synthetic.train_size=200",
    "data.synthetic.test_size=40",
    "data.num_classes=4",
    "data.batch_size=32",
    "data.eval_batch_size=16",
    "teacher.arch=plainnet",
    "student.arch=plainnet",
    "teacher.optim.epochs=2",
    "student.optim.epochs=2",
    "teacher.optim.milestones=[1]",
    "student.optim.milestones=[1]",
    "student.method=kd",
    "device=cpu",
    "training.amp=none",  # the default preset's bf16 (where native) would round far beyond the tolerance
]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINE_PROGRESS": "0", "PYTHONPATH": str(ROOT)}


def _run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow  # 79 s here (2 CPU cores, one thread)
def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "tests.plain_pipeline", str(one), *OVERRIDES])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = _run([*torchrun, "-m", "tests.plain_pipeline", str(two), *OVERRIDES])

    for stage, checkpoint in (("teacher", "teacher.safetensors"), ("train", "student.safetensors")):
        a, b = load_file(one / stage / checkpoint), load_file(two / stage / checkpoint)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=ATOL, rtol=RTOL, msg=f"{stage} {key}")
    store_one, store_two = RunStore(one), RunStore(two)
    for stage in ("teacher", "train"):
        manifest = store_two.manifest(stage)
        assert manifest.status == "ok" and manifest.meta["world_size"] == 2
        assert store_one.manifest(stage).meta["world_size"] == 1
        assert manifest.params == store_one.manifest(stage).params  # the process count is not a result parameter
        # Metrics were reduced over both ranks: the held-out accuracy counts every sample once.
        val_one, val_two = store_one.manifest(stage).metrics["val_top1"], manifest.metrics["val_top1"]
        assert val_two == pytest.approx(val_one, abs=1e-6)
        # Rank 0 alone wrote: one event file per stage, nothing left behind by rank 1.
        assert len(list((two / "tensorboard" / stage).glob("events.out.tfevents.*"))) == 1
    for stage in ("fuse", "verify"):  # not distributed-aware: rank 0 ran them as a single process
        manifest = store_two.manifest(stage)
        assert manifest.status == "ok" and all(manifest.checks) and manifest.meta["world_size"] == 1
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert not list((two / ".staging").iterdir())
    assert result.stderr.count("[teacher] running") == 1  # rank 1's log is quiet
