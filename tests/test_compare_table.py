"""The comparison table and the report on hand-made run folders: figures come from manifests, never recomputed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.artifacts.manifest import Manifest
from pipeline.artifacts.store import RunStore, describe_file
from pipeline.report import write_report
from pipeline.report.table import Stat, build_comparison, published, render

DATA = {"dataset": "cifar100"}


def _stage(root: Path, stage: str, params: dict, metrics: dict, files: dict[str, str]) -> None:
    store = RunStore(root)
    staged = store.staging(stage)
    for name, text in files.items():
        (staged / name).write_text(text)
    outputs = [describe_file(staged, name) for name in files]
    store.commit(staged, Manifest(stage, "ok", params, [], outputs, [], "code", metrics=metrics))


def fake_run(
    root: Path, method: str, seed: int, top1: float, history: list[float] = (), optim: dict | None = None
) -> Path:
    _stage(
        root,
        "teacher",
        {"arch": "resnet32x4", "data": DATA, "seed": 0},
        {"test_top1": 79.0},
        {"teacher.safetensors": "t"},
    )
    epochs = [{"epoch": i + 1, "loss/ce": 1.0 / (i + 1), "test_top1": v} for i, v in enumerate(history)]
    _stage(
        root,
        "train",
        {"arch": "ShuffleV1", "method": method, "seed": seed, "data": DATA, **({"optim": optim} if optim else {})},
        {"test_top1": top1},
        {"history.json": json.dumps(epochs)},
    )
    _stage(root, "fuse", {}, {"parameters": 949258, "flops": 38_000_000}, {"fused.txt": "f"})
    return root


def test_stat_is_mean_and_sample_std():
    assert Stat([70.0, 72.0, 74.0]).format() == "72.00 ± 2.00"
    assert Stat([71.5]).format() == "71.50" and Stat([]).format() == "-"


def test_published_figures_come_from_the_matching_preset():
    pair = ("cifar100", "resnet32x4", "ShuffleV1")
    assert published(pair, "kdiffusion") == 78.14  # the preset's expected.method row
    assert published(pair, "vanilla") == 70.50 and published(pair, "teacher") == 79.42
    assert published(pair, "reviewkd") == 77.45 and published(pair, "kdiffusion_single") == 76.62
    assert published(pair, "dkd") is None
    assert published(("synthetic", "wrn_16_2", "mobile_half"), "kd") is None


def test_comparison_groups_seeds_and_gives_deltas(tmp_path):
    runs = [
        fake_run(tmp_path / "v0", "vanilla", 0, 70.0),
        fake_run(tmp_path / "v1", "vanilla", 1, 72.0),
        fake_run(tmp_path / "k0", "kd", 0, 73.0, history=[60.0, 74.5, 73.0]),
        fake_run(tmp_path / "k1", "kd", 1, 75.0, history=[61.0, 75.0, 75.0]),
        fake_run(tmp_path / "d0", "kdiffusion", 0, 77.0),
    ]
    c = build_comparison(runs)
    pair = ("cifar100", "resnet32x4", "ShuffleV1")
    assert c.rows == ["teacher", "vanilla", "kd", "kdiffusion"] and c.pairs == [pair]
    assert c.get("teacher", pair).top1.values == [79.0]  # one teacher file, counted once
    kd = c.get("kd", pair)
    assert kd.top1.mean == 74.0 and kd.top1.n == 2 and kd.delta_vanilla == pytest.approx(3.0)
    assert kd.best.values == [74.5, 75.0]
    diffusion = c.get("kdiffusion", pair)
    assert diffusion.delta_kd == pytest.approx(3.0) and diffusion.published == 78.14
    assert diffusion.params == 949258

    table = render(c, "table", best=True)
    assert "71.00 ± 1.41" in table and "+3.00" in table and "78.14" in table and "74.75 ± 0.35 (best)" in table
    assert "top-1 (best epoch)" not in render(c, "table")  # only when asked
    markdown = render(c, "markdown")
    assert markdown.splitlines()[1].startswith("|---|")
    entries = json.loads(render(c, "json"))["entries"]
    assert {e["method"] for e in entries} == {"teacher", "vanilla", "kd", "kdiffusion"}
    assert render(c, "csv").splitlines()[0].startswith("method,dataset,teacher,student,n,")


def test_a_run_named_twice_or_copied_counts_once(tmp_path):
    """A second copy of one run would pass for a second seed (n=2, std 0)."""
    import shutil

    k0, k1 = fake_run(tmp_path / "k0", "kd", 0, 73.0), fake_run(tmp_path / "k1", "kd", 1, 75.0)
    shutil.copytree(k0, tmp_path / "copy")
    c = build_comparison([k0, k1, k0, tmp_path / "copy"])
    assert c.get("kd", ("cifar100", "resnet32x4", "ShuffleV1")).top1.values == [73.0, 75.0]
    assert f"{k0}: named more than once (itself, or as a cell of a sweep); counted once" in c.notes
    assert f"{tmp_path / 'copy'} is a copy of {k0} (the same train manifest); counted once" in c.notes
    assert f"{tmp_path / 'copy'} is a copy" in render(c, "table")


@pytest.mark.parametrize("command", ["compare", "report"])
def test_an_output_that_cannot_be_written_is_one_line(tmp_path, capsys, command):
    from pipeline.cli import run_cli

    run = fake_run(tmp_path / "k0", "kd", 0, 73.0)
    (tmp_path / "file.txt").write_text("x")
    for output, message in (
        (
            tmp_path / "file.txt" / "out.md",
            f"cannot write {tmp_path / 'file.txt' / 'out.md'} (a file stands where one of its folders should be)",
        ),
        ("", "--output . is a folder; give a file name"),
    ):
        assert run_cli([command, str(run), "--output", str(output)]) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}" + ("; choose another --output" * bool(output))
    assert run_cli([command, str(run), "--output", str(tmp_path / "new" / "dir" / "out")]) == 0  # folders made
    assert (tmp_path / "new" / "dir" / "out").stat().st_size > 0


def test_a_sweep_cell_named_on_its_own_too_keeps_its_sweep_labels(tmp_path):
    from pipeline.experiments.grid import expand_grid
    from pipeline.report.collect import read_runs

    sweep = expand_grid(tmp_path / "sweep", [], None, ["kd"], [0], ["data.num_classes=4"])
    sweep.write()
    cell = fake_run(sweep.cells[0].folder(tmp_path / "sweep"), "kd", 0, 73.0)
    notes: list[str] = []
    runs, _ = read_runs([cell, tmp_path / "sweep"], notes)
    assert len(runs) == 1 and runs[0].labels["method"] == "kd" and runs[0].name == sweep.cells[0].name
    assert notes == [f"{runs[0].root}: named more than once (itself, or as a cell of a sweep); counted once"]


def test_runs_of_other_recipes_are_rows_of_their_own_and_compared_like_for_like(tmp_path):
    """Two sweeps of other lengths named together: one mean over both would pool two recipes."""
    short, long_ = {"epochs": 16, "lr": 0.05}, {"epochs": 32, "lr": 0.05}
    runs = [
        fake_run(tmp_path / "v16", "vanilla", 0, 70.0, optim=short),
        fake_run(tmp_path / "v32", "vanilla", 0, 72.0, optim=long_),
        fake_run(tmp_path / "k16-0", "kd", 0, 73.0, optim=short),
        fake_run(tmp_path / "k16-1", "kd", 1, 75.0, optim=short),
        fake_run(tmp_path / "k32", "kd", 0, 77.0, optim=long_),
    ]
    c = build_comparison(runs)
    pair = ("cifar100", "resnet32x4", "ShuffleV1")
    assert c.rows == [
        "teacher",
        "vanilla [student.optim.epochs=16]",
        "vanilla [student.optim.epochs=32]",
        "kd [student.optim.epochs=16]",
        "kd [student.optim.epochs=32]",
    ]
    assert c.get("kd [student.optim.epochs=16]", pair).top1.values == [73.0, 75.0]  # seeds still pool
    assert c.get("kd [student.optim.epochs=16]", pair).delta_vanilla == pytest.approx(4.0)  # against vanilla at 16
    assert c.get("kd [student.optim.epochs=32]", pair).delta_vanilla == pytest.approx(5.0)
    assert c.get("vanilla [student.optim.epochs=32]", pair).delta_kd == pytest.approx(-5.0)


def test_an_edited_history_is_refused_and_a_missing_one_is_absent(tmp_path):
    """compare reads the stage's files as a stage reads its inputs: re-hashed against the manifest."""
    from pipeline.errors import ArtifactError

    run = fake_run(tmp_path / "k0", "kd", 0, 73.0, history=[60.0, 73.0])
    (run / "train" / "history.json").write_text(json.dumps([{"epoch": 1, "test_top1": 99.0}]))
    with pytest.raises(ArtifactError, match=r"history.json: modified \(it does not match the train stage's manifest"):
        build_comparison([run])
    (run / "train" / "history.json").unlink()  # a partial copy of the folder
    kd = build_comparison([run]).get("kd", ("cifar100", "resnet32x4", "ShuffleV1"))
    assert kd.top1.values == [73.0] and kd.best.values == []


def test_report_of_a_partial_run_says_what_is_missing(tmp_path):
    run = fake_run(tmp_path / "run", "kd", 0, 73.0, history=[60.0, 73.0])
    html = write_report(run).read_text()
    assert html.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in html
    assert 'data-table="stages"' in html and 'data-plot="curves-train"' in html
    assert "The verify stage has not run." in html and "The export stage has not run." in html
    assert "<script" not in html and "http" not in html.replace("http-equiv", "")


def test_compare_refuses_a_folder_that_is_not_a_run(tmp_path):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="neither a run folder"):
        build_comparison([tmp_path])


def test_report_takes_several_folders_and_names_the_int8_target(tmp_path, monkeypatch):
    """As `compare A B`: one page over all; the INT8 latency column says which INT8 model was timed (a
    TensorRT-placed Q/DQ model runs unfused in ONNX Runtime on a CPU, which is not INT8 speed)."""
    from pipeline.cli import run_cli

    runs = [fake_run(tmp_path / "k0", "kd", 0, 73.0), fake_run(tmp_path / "v0", "vanilla", 0, 70.0)]
    for run in runs:
        latency = {p: {"median_ms": ms} for p, ms in (("fp32", 0.27), ("int8", 1.19))}
        _stage(run, "export", {"int8_target": "tensorrt"}, {}, {"report.json": json.dumps({"latency": latency})})
    assert "ORT int8 (tensorrt Q/DQ) ms" in render(build_comparison(runs), "table")
    monkeypatch.chdir(tmp_path)
    assert run_cli(["report", *map(str, runs)]) == 0
    html = (tmp_path / "report.html").read_text()
    assert str(runs[0]) in html and str(runs[1]) in html and "ORT int8 (tensorrt Q/DQ) ms" in html
    assert 'data-table="deployment"' in html


def test_a_cpu_target_int8_figure_gets_its_own_labelled_column(tmp_path):
    """Where the export timed a cpu-target INT8 model beside the TensorRT one, the table shows it in a column
    named by its target, with a note; without such a figure there is no such column."""
    runs = [fake_run(tmp_path / "k0", "kd", 0, 73.0), fake_run(tmp_path / "v0", "vanilla", 0, 70.0)]
    latency = {p: {"median_ms": ms} for p, ms in (("fp32", 0.27), ("int8", 1.19))}
    report = {"latency": latency, "int8": {"target": "tensorrt"}}
    _stage(runs[1], "export", {"int8_target": "tensorrt"}, {}, {"report.json": json.dumps(report)})
    assert "ORT int8 (cpu target) ms" not in render(build_comparison(runs), "table")
    report["int8_cpu_latency"] = {"median_ms": 0.123, "target": "cpu"}
    _stage(runs[0], "export", {"int8_target": "tensorrt"}, {}, {"report.json": json.dumps(report)})
    table = render(build_comparison(runs), "table")
    header, _, *lines = [re.split(r"\s{2,}", line) for line in table.split("\n\n")[1].splitlines()]
    rows = {row[1]: dict(zip(header, row)) for row in lines}
    assert header.index("ORT int8 (cpu target) ms") == header.index("ORT int8 (tensorrt Q/DQ) ms") + 1
    assert rows["kd"]["ORT int8 (cpu target) ms"] == "0.123" and rows["vanilla"]["ORT int8 (cpu target) ms"] == "-"
    assert "a cpu-target INT8 model (uint8 activations, fused by ONNX Runtime) timed on the same CPU" in table
    entries = {e["method"]: e for e in build_comparison(runs).to_dict()["entries"]}
    assert entries["kd"]["latency_int8_cpu_ms"] == 0.123 and entries["vanilla"]["latency_int8_cpu_ms"] is None
    html = write_report(runs[0], tmp_path / "k0.html").read_text()
    assert "int8 (tensorrt target)" in html and "int8 (cpu target, timed only)" in html


def test_the_run_page_lists_latencies_in_precision_order_not_in_the_files_key_order():
    from pipeline.report.pages import latency_by_label

    stored = {p: {"median_ms": 1.0} for p in sorted(["fp32", "fp16", "int8"])}  # report.json sorts its keys
    report = {"latency": stored, "int8": {"target": "tensorrt"}}
    assert list(latency_by_label(report)) == ["fp32", "fp16", "int8 (tensorrt target)"]
