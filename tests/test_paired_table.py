"""benchmarks/paired_table.py on hand-made sweep cells: the figures the Fashion-MNIST table in docs is made of."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pipeline.artifacts.manifest import Manifest
from pipeline.artifacts.store import RunStore, describe_file
from pipeline.experiments.grid import expand_grid

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_table.py"
DATA = {"dataset": "fashion_mnist"}


@pytest.fixture(scope="module")
def paired_table():
    spec = importlib.util.spec_from_file_location("paired_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commit(root: Path, stage: str, params: dict, metrics: dict, files: dict, meta: dict | None = None) -> None:
    store = RunStore(root)
    staged = store.staging(stage)
    for name, text in files.items():
        (staged / name).write_text(text)
    outputs = [describe_file(staged, name) for name in files]
    store.commit(staged, Manifest(stage, "ok", params, [], outputs, [], "code", metrics=metrics, meta=meta or {}))


def sweep(root: Path, methods: list[str], seeds: list[int]) -> Path:
    """The sweep's record, as ``python -m pipeline sweep`` writes it, before any cell ran."""
    expand_grid(root, [], None, methods, seeds, []).write()
    return root


def cell(
    sweep: Path, method: str, seed: int, test: float, vals: list[float], minutes: float = 2.0, every: int = 1
) -> None:
    """A finished cell whose val top-1 is ``vals``, one every ``every`` epochs (``training.val_every``)."""
    root = sweep / "cells" / f"default-{method}-seed{seed}"
    _commit(root, "teacher", {"arch": "resnet20", "data": DATA, "seed": 0}, {"test_top1": 94.62}, {"t.bin": "t"})
    history = [{"epoch": i + 1} for i in range(len(vals) * every)]
    for i, v in enumerate(vals):
        history[(i + 1) * every - 1]["val_top1"] = v
    metrics = {"test_top1": test, "val_top1": vals[-1], "teacher_test_top1": 94.62}
    params = {"arch": "mobile_half", "method": method, "seed": seed, "data": DATA}
    files = {"history.json": json.dumps(history)}
    _commit(root, "train", params, metrics, files, {"duration_s": minutes * 60})


def test_rows_pairs_and_plateau_come_from_the_cells(tmp_path, paired_table):
    flat, rising = [80.0] * 8 + [85.0, 85.2], [80.0] * 8 + [83.0, 85.0]
    sweep(tmp_path, ["kd", "vanilla"], [0, 1, 2])
    for seed, (kd, vanilla) in enumerate([(85.0, 83.0), (86.0, 83.5), (84.5, 83.5)]):
        cell(tmp_path, "kd", seed, kd, flat, minutes=4.0)
        cell(tmp_path, "vanilla", seed, vanilla, rising if seed == 2 else flat)
    text = paired_table.table(tmp_path, [("kd", "vanilla")], 0.5, 10_000)

    assert text.startswith("6 finished cells, 5 at their plateau.")
    assert "| teacher |  |  |  | 94.62 | | |" in text
    assert "| kd | 85.00 | 86.00 | 84.50 | 85.17 ± 0.76 | 85.20 ± 0.00 | 4.0 min |" in text
    assert "| kd - vanilla | +2.00 | +2.50 | +1.00 | +1.83 |" in text
    assert "- vanilla seed 2: no (83.00-85.00 over the last 2 of 10 epochs)" in text
    assert "- kd seed 0: yes (85.00-85.20 over the last 2 of 10 epochs)" in text
    assert "= 0.30 point" in text  # the binomial standard error near 90 % on 10,000 images


def test_the_plateau_window_is_a_fifth_of_the_epochs_and_a_missing_seed_leaves_a_gap(tmp_path, paired_table):
    sweep(tmp_path, ["kd", "kdiffusion"], [0, 1])
    cell(tmp_path, "kd", 0, 85.0, [70.0] * 12 + [84.0, 84.2, 84.9])  # 15 epochs: the last 3 count
    cell(tmp_path, "kdiffusion", 1, 88.0, [88.0] * 15)
    text = paired_table.table(tmp_path, [("kdiffusion", "kd")], 0.5, 10_000)
    assert "- kd seed 0: no (84.00-84.90 over the last 3 of 15 epochs)" in text
    assert "| kdiffusion - kd |  |  | - |" in text  # no seed has both


def test_a_cell_that_scored_val_every_few_epochs_says_so(tmp_path, paired_table):
    sweep(tmp_path, ["kd"], [0])
    cell(tmp_path, "kd", 0, 85.0, [70.0] * 8 + [84.0, 84.2], every=2)  # val after epochs 2, 4, ..., 20
    text = paired_table.table(tmp_path, [], 0.5, 10_000)
    assert "- kd seed 0: yes (84.00-84.20 over the last 2 of 10 scored epochs of 20)" in text


def test_a_sweep_with_no_finished_cell_is_one_line(tmp_path, paired_table):
    sweep(tmp_path, ["kd"], [0])
    with pytest.raises(SystemExit, match="no cell has finished"):
        paired_table.table(tmp_path, [], 0.5, 10_000)
