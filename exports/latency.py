"""A cheap latency figure per exported model: ONNX Runtime on the CPU, batch 1, median of a few runs.

It is a comparison between precisions on the machine that ran the export, not a deployment benchmark
(the engine on the target device is that); the report states the provider, threads and run count.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from exports.runners import OnnxrtRunner


def onnx_latency(
    path: str | Path, input_size: int, batch: int = 1, warmup: int = 3, runs: int = 20, optimization: str = "all"
) -> dict:
    """Median and 90th-percentile wall time of ``runs`` forward passes after ``warmup`` ones, in ms."""
    with OnnxrtRunner(path, optimization=optimization) as runner:
        return runner_latency(runner, input_size, batch, warmup, runs)


def runner_latency(runner: OnnxrtRunner, input_size: int, batch: int = 1, warmup: int = 3, runs: int = 20) -> dict:
    """:func:`onnx_latency` on a session already open (the one the export's checks ran)."""
    feed = np.random.default_rng(0).standard_normal((batch, 3, input_size, input_size)).astype(np.float32)
    feed = {runner.input_names[0]: feed}
    for _ in range(warmup):
        runner.infer(feed)
    times = []
    for _ in range(runs):
        tic = time.perf_counter()
        runner.infer(feed)
        times.append((time.perf_counter() - tic) * 1e3)
    options = runner.session.get_session_options()
    return {
        "batch": batch,
        "median_ms": float(np.median(times)),
        "p90_ms": float(np.quantile(times, 0.9)),
        "runs": runs,
        "provider": runner.session.get_providers()[0],
        "intra_op_threads": options.intra_op_num_threads,
        "optimization": runner.optimization,
    }
