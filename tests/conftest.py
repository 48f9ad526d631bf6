"""Shared fixtures: a tiny experiment that runs every stage in seconds on a CPU."""

from __future__ import annotations

import os

import pytest
import torch

# Under pytest-xdist each worker is its own process: one thread each avoids oversubscribing the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_report_header(config) -> str:
    """Which kernels this run's figures come from: trained results differ in the last bits by processor."""
    from pipeline.artifacts.machine import describe_cpu

    return f"cpu: {describe_cpu(torch.get_num_threads())}; torch {torch.__version__}"


TINY = [
    "data.synthetic.train_size=160",
    "data.synthetic.test_size=64",
    "data.num_classes=4",
    "data.batch_size=32",
    "teacher.arch=resnet20",
    "teacher.optim.epochs=1",
    "teacher.optim.milestones=[]",
    "student.arch=resnet20",
    "student.method=kd",
    "student.optim.epochs=1",
    "student.optim.milestones=[]",
    "verify.samples=32",
    "export.parity_samples=16",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


@pytest.fixture
def tiny_cfg():
    from pipeline.config import load_config

    return load_config("default", None, TINY)
