"""Sweeps without training: grid expansion, the scheduling loop, up-to-date records and the submitit path."""

from __future__ import annotations

import io
import itertools
import json
import re
import sys
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.experiments.grid import expand_grid, read_sweep, split_values
from pipeline.experiments.scheduler import StatusLine, Task, run_tasks
from pipeline.experiments.state import RECORD, is_up_to_date, mark_finished
from pipeline.experiments.sweep import SweepFailedError, check_results, results_table, sweep_tasks

TINY_SETS = ["data.num_classes=4", "teacher.arch=resnet20", "student.arch=resnet20"]


def test_split_values_keeps_yaml_lists_and_quoted_commas_whole():
    assert split_values("a,b") == ["a", "b"]
    assert split_values("[1,2],[3]") == ["[1,2]", "[3]"]
    assert split_values("'x,y',z") == ["'x,y'", "z"]
    assert split_values("{a: 1, b: 2}") == ["{a: 1, b: 2}"]


def test_grid_is_methods_by_seeds_by_axes_with_one_shared_teacher(tmp_path):
    sweep = expand_grid(
        tmp_path, [], None, ["kd", "vanilla", "dkd"], [0, 1], [*TINY_SETS, "student.optim.lr=0.01,0.05"]
    )
    assert len(sweep.cells) == 3 * 2 * 2
    assert len(sweep.teachers) == 1  # neither the method, the seed nor the student's LR changes the teacher
    teacher = sweep.teachers[0]
    assert teacher.args[:2] == ("run", "teacher") and "--seed" in teacher.args
    for cell in sweep.cells:
        args = list(cell.args)
        assert args[:2] == ["run", "all"]
        assert args[args.index("--teacher-checkpoint") + 1] == str(teacher.checkpoint(tmp_path).resolve())
        assert "teacher.source=import" in args
        assert cell.teacher == teacher.key
    names = {c.name for c in sweep.cells}
    assert "default-kd-seed1-student.optim.lr=0.05" in names
    # seed-major within each axis combination: a sweep cut short has each method's first seed
    assert [c.labels["seed"] for c in sweep.cells[:6]] == [0, 0, 0, 1, 1, 1]
    assert [c.labels["method"] for c in sweep.cells[:3]] == ["kd", "vanilla", "dkd"]
    labels = next(c.labels for c in sweep.cells if c.name == "default-dkd-seed0-student.optim.lr=0.01")
    assert labels == {"preset": "default", "method": "dkd", "seed": 0, "student.optim.lr": "0.01"}


def test_a_teacher_axis_gives_one_teacher_per_value(tmp_path):
    sweep = expand_grid(tmp_path, [], None, ["kd"], [0], [*TINY_SETS, "teacher.optim.epochs=1,2"])
    assert len(sweep.teachers) == 2
    assert {c.teacher for c in sweep.cells} == {t.key for t in sweep.teachers}


def test_a_user_teacher_is_imported_by_every_cell_and_nothing_is_trained(tmp_path):
    ckpt = tmp_path / "t.safetensors"
    ckpt.write_bytes(b"x")
    sweep = expand_grid(tmp_path, [], None, ["kd", "vanilla"], [0], [*TINY_SETS, f"teacher.checkpoint={ckpt}"])
    assert sweep.teachers == [] and all(c.teacher is None for c in sweep.cells)


def test_grid_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'kdd'"):
        expand_grid(tmp_path, [], None, ["kdd"], [0], TINY_SETS)
    with pytest.raises(ConfigError, match="unknown config key"):
        expand_grid(tmp_path, [], None, ["kd"], [0], ["student.optim.lrr=0.1,0.2"])
    with pytest.raises(ConfigError, match="unknown preset"):
        expand_grid(tmp_path, ["nope"], None, ["kd"], [0], [])


def test_sweep_record_round_trips_and_a_rerun_with_another_seed_adds_cells(tmp_path):
    first = expand_grid(tmp_path, [], None, ["kd"], [0], TINY_SETS)
    first.write()
    expand_grid(tmp_path, [], None, ["kd"], [1], TINY_SETS).write()
    recorded = read_sweep(tmp_path)
    assert [c.name for c in recorded.cells] == ["default-kd-seed0", "default-kd-seed1"]
    assert recorded.cells[0].args == first.cells[0].args
    assert json.loads((tmp_path / "sweep.json").read_text())["version"] == 1


@pytest.mark.parametrize("field, value", [("name", "../../etc"), ("name", ".."), ("key", "/tmp/x"), ("name", 5)])
def test_an_edited_record_cannot_point_outside_the_sweep(tmp_path, field, value):
    expand_grid(tmp_path, [], None, ["kd"], [0], TINY_SETS).write()
    record = json.loads((tmp_path / "sweep.json").read_text())
    (record["cells"] if field == "name" else record["teachers"])[0][field] = value
    (tmp_path / "sweep.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="is not a readable sweep record .* is not a plain folder name"):
        read_sweep(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["cells"][0].update(labels="x"), "labels of cell .* are not a mapping"),
        (lambda r: r["cells"][0].update(labels={"seed": [0]}), "labels of cell .* are not a mapping"),
        (lambda r: r["cells"][0].update(args=True), "is not a list of arguments"),
        (lambda r: r["cells"][0].update(teacher="feedbeef"), "names a teacher the record does not list"),
        (lambda r: r.update(cells=None), "'cells' is not a list of records"),
        (lambda r: r["teachers"].append(None), "'teachers' is not a list of records"),
    ],
)
def test_an_edited_record_of_another_shape_is_one_error(tmp_path, edit, message):
    """compare, report and a rerun read the record; its shape is checked, not trusted (a traceback before)."""
    expand_grid(tmp_path, [], None, ["kd"], [0], TINY_SETS).write()
    record = json.loads((tmp_path / "sweep.json").read_text())
    edit(record)
    (tmp_path / "sweep.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=f"is not a readable sweep record .*{message}"):
        read_sweep(tmp_path)


class FakeHandle:
    def __init__(self, code: int, polls: int):
        self.code, self.polls = code, polls

    def poll(self):
        self.polls -= 1
        return self.code if self.polls <= 0 else None

    def stop(self):
        self.code = -2


class FakeBackend:
    """Exit statuses by task name; records the order and concurrency of starts."""

    def __init__(self, codes: dict[str, int], slots: int):
        self.codes, self.slots, self.started, self.max_running, self.live = codes, slots, [], 0, []

    def start(self, task: Task, slot: int):
        task.folder.mkdir(parents=True, exist_ok=True)
        task.log.parent.mkdir(parents=True, exist_ok=True)
        task.log.write_text(f"working\nlast words of {task.name}\n")
        self.started.append(task.name)
        handle = FakeHandle(self.codes.get(task.name, 0), polls=2)
        self.live = [h for h in self.live if h.polls > 0] + [handle]
        self.max_running = max(self.max_running, len(self.live))
        return handle


def _tasks(root: Path) -> list[Task]:
    t = Task("teacher-a", root / "teachers/a", ("run", "teacher"), root / "logs/teacher-a.log")
    cells = [
        Task(f"c{i}", root / f"cells/c{i}", ("run", "all"), root / f"logs/c{i}.log", "teacher-a") for i in range(4)
    ]
    bad = Task("teacher-b", root / "teachers/b", ("run", "teacher"), root / "logs/teacher-b.log")
    blocked = Task("c9", root / "cells/c9", ("run", "all"), root / "logs/c9.log", "teacher-b")
    return [t, bad, *cells, blocked]


def test_one_duration_format_for_the_epoch_line_and_the_sweep_status():
    from pipeline.experiments import scheduler
    from pipeline.progress import format_duration
    from pipeline.training import monitor

    assert scheduler.format_duration is monitor.format_duration is format_duration
    assert [format_duration(s) for s in (-3, 9.4, 247, 3900)] == ["0s", "9s", "4m07s", "1h05m"]
    assert monitor.epoch_line("train", 1, 2, {"loss": 0.5}, 9.0) == "train epoch 1/2: loss=0.5 eta=9s"


def test_failures_do_not_stop_the_others_and_are_listed_with_status_and_last_line(tmp_path):
    backend = FakeBackend({"c2": 3, "teacher-b": 1}, slots=2)
    stream = io.StringIO()
    results = run_tasks(_tasks(tmp_path), backend, StatusLine(7, stream), poll_s=0)
    by_name = {r.name: r for r in results}
    assert by_name["c2"].status == "failed" and by_name["c2"].returncode == 3
    assert by_name["c2"].last_line == "last words of c2"
    assert by_name["c9"].status == "blocked" and "c9" not in backend.started  # its teacher failed
    assert all(by_name[f"c{i}"].status == "ran" for i in (0, 1, 3))
    assert backend.started.index("teacher-a") < backend.started.index("c0")  # the teacher first
    assert backend.max_running <= 2
    assert "sweep: 4/7 done, 0 running, 3 failed" in stream.getvalue()  # the final status line
    table = results_table(results)
    assert "c2: exit 3: last words of c2" in table and "c9: not started" in table
    with pytest.raises(SweepFailedError, match="3 of 7 tasks failed"):
        check_results(results, tmp_path)


def test_sources_digest_follows_the_runners_code_digests_less_the_readers(monkeypatch):
    from pipeline.experiments import state

    files = {"pipeline/a.py": "1", "pipeline/report/pages.py": "2"}
    monkeypatch.setattr(state, "project_sources", lambda: files)
    before = state.sources_digest()
    files["pipeline/report/pages.py"] = "3"  # the report only reads runs
    assert state.sources_digest() == before
    files["pipeline/a.py"] = "4"
    assert state.sources_digest() != before


def test_a_finished_task_is_skipped_until_its_record_no_longer_holds(tmp_path):
    from pipeline.artifacts.manifest import Manifest
    from pipeline.artifacts.store import RunStore, describe_file

    folder = tmp_path / "cells/c0"
    store = RunStore(folder)
    staged = store.staging("teacher")
    (staged / "w.bin").write_bytes(b"weights")
    store.commit(staged, Manifest("teacher", "ok", {}, [], [describe_file(staged, "w.bin")], [], "code"))
    args = ("run", "all", "--out", str(folder))
    assert not is_up_to_date(folder, args)
    mark_finished(folder, args)
    assert (folder / RECORD).is_file()
    assert is_up_to_date(folder, args)
    assert not is_up_to_date(folder, (*args, "--seed", "1"))  # other arguments
    assert not is_up_to_date(folder, args, code="another code version")
    (folder / "teacher" / "w.bin").write_bytes(b"tampered")
    assert not is_up_to_date(folder, args)

    backend = FakeBackend({}, slots=1)
    task = Task("c0", folder, ("run", "all"), tmp_path / "logs/c0.log")
    (folder / "teacher" / "w.bin").write_bytes(b"weights")
    mark_finished(folder, task.argv)
    results = run_tasks([task], backend, StatusLine(1, io.StringIO()), poll_s=0)
    assert results[0].status == "up to date" and backend.started == []


def test_a_finished_task_that_read_an_image_folder_reruns_when_its_images_change(tmp_path):
    from pipeline.artifacts.manifest import Manifest
    from pipeline.artifacts.store import RunStore, describe_file
    from pipeline.data.folders import listing_digest

    images = tmp_path / "images" / "train" / "cat"
    images.mkdir(parents=True)
    (images / "0.png").write_bytes(b"png")
    data = {"dataset": "imagefolder", "root": str(tmp_path / "images"), "files": listing_digest(str(images.parents[1]))}
    folder = tmp_path / "cells/c0"
    store = RunStore(folder)
    staged = store.staging("teacher")
    (staged / "w.bin").write_bytes(b"weights")
    store.commit(staged, Manifest("teacher", "ok", {"data": data}, [], [describe_file(staged, "w.bin")], [], "code"))
    args = ("run", "all", "--out", str(folder))
    mark_finished(folder, args)
    assert is_up_to_date(folder, args)
    (images / "1.png").write_bytes(b"another")
    listing_digest.cache_clear()  # a new sweep command lists the folder afresh
    assert not is_up_to_date(folder, args)


def test_a_resumed_sweep_counts_every_finished_cell_before_the_slots_free_up(tmp_path, monkeypatch):
    from pipeline.experiments import scheduler

    finished = {"c1", "c3"}
    monkeypatch.setattr(scheduler, "is_up_to_date", lambda folder, argv, code: folder.name in finished)
    tasks = [Task(f"c{i}", tmp_path / f"c{i}", ("run", "all"), tmp_path / f"c{i}.log") for i in range(4)]
    stream = io.StringIO()
    backend = FakeBackend({}, slots=1)
    run_tasks(tasks, backend, StatusLine(4, stream), poll_s=0)
    assert stream.getvalue().splitlines()[0].startswith("sweep: 2/4 done, 1 running")  # c3 too, while c0 runs
    assert backend.started == ["c0", "c2"]


def test_sweep_tasks_put_teachers_first_and_make_cells_wait_for_theirs(tmp_path):
    sweep = expand_grid(tmp_path, [], None, ["kd", "vanilla"], [0], TINY_SETS)
    tasks = sweep_tasks(sweep)
    assert tasks[0].name.startswith("teacher-") and tasks[0].args[:2] == ("run", "teacher")
    assert all(t.after == tasks[0].name for t in tasks[1:])
    assert all(t.argv[-2:] == ["--out", str(t.folder)] for t in tasks)


def test_submitit_local_executor_runs_the_job_body(tmp_path):
    pytest.importorskip("submitit", reason="submitit is the cluster extra")
    from pipeline.experiments.cluster import ClusterOptions, SubmititBackend, make_executor

    options = ClusterOptions(time_min=5, cpus_per_task=1)
    backend = SubmititBackend(make_executor(tmp_path / "submitit", "local", options), options)
    ok = Task("ok", tmp_path / "ok", ("sweep", "--help"), tmp_path / "logs/ok.log")  # no torch import: quick
    bad = Task("bad", tmp_path / "bad", ("no-such-command",), tmp_path / "logs/bad.log")
    ok.folder.mkdir()
    results = run_tasks([ok, bad], backend, StatusLine(2, io.StringIO()), poll_s=0.2)
    assert [r.status for r in results] == ["ran", "failed"]
    assert results[1].returncode == 2 and "No such command" in results[1].last_line
    log = (tmp_path / "logs/ok.log").read_text()
    assert f"{sys.executable} -m pipeline sweep --help" in log  # the job ran this interpreter on the task
    assert "Run a grid of ordinary runs" in log  # and the command's output came back


def test_cluster_options_are_checked(tmp_path):
    from pipeline.experiments.cluster import ClusterOptions

    with pytest.raises(ConfigError, match="--torchrun needs"):
        ClusterOptions(torchrun=True).check()


def test_slurm_jobs_ask_for_the_options_given(tmp_path):
    pytest.importorskip("submitit", reason="submitit is the cluster extra")
    from submitit.slurm.slurm import _make_sbatch_string  # submitit's own sbatch writer (private, stable for years)

    from pipeline.experiments.cluster import ClusterOptions, slurm_parameters

    options = ClusterOptions(partition="gpu", time_min=30, gpus_per_task=2, cpus_per_task=8, mem_gb=32, torchrun=True)
    script = _make_sbatch_string(command="true", folder=str(tmp_path / "%j"), **slurm_parameters(options))
    for line in ("--partition=gpu", "--time=30", "--gpus-per-node=2", "--cpus-per-task=8", "--mem=32GB", "--nodes=1"):
        assert f"#SBATCH {line}" in script


def test_slurm_without_slurm_is_a_one_line_user_error(tmp_path, capsys):
    import shutil

    from pipeline.cli import run_cli

    if shutil.which("srun"):
        pytest.skip("this machine has SLURM")
    pytest.importorskip("submitit", reason="submitit is the cluster extra")
    sets = [a for s in TINY_SETS for a in ("--set", s)]
    assert run_cli(["sweep", "--out", str(tmp_path), "--cluster", "slurm", "--method", "kd", *sets]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --cluster slurm needs SLURM") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cells").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "training.amp=bogus"], "training.amp must be one of"),
        (["--set", "student.method_args.bogus=1"], "method 'kd' has no option 'bogus'"),
        (["--set", "student.arch=resnet20,nonet"], "unknown model 'nonet'"),
        (["--seed=-1"], r"seed must be in \[0, 2\*\*32\), got -1"),
        (["--teacher-seed=-3"], "got -3"),
        (["--device", "cuda"], "device 'cuda' was requested but CUDA is not available"),
        (["--method", ","], "--method is empty"),
        (["--seed", ""], "--seed is empty"),
        (["--set", "export.precisions=[bogus]"], "bogus"),  # a stage's own settings
        (["--teacher-checkpoint", "/no/such.pth"], "teacher.checkpoint /no/such.pth does not exist or is not a file"),
        (["--set", "teacher.source=import", "--set", "teacher.checkpoint=/no/t.pth"], "/no/t.pth does not exist"),
        (["--teacher-checkpoint", ""], "--teacher-checkpoint is empty"),  # not the current folder
        (["--data-root", ""], "--data-root is empty"),
    ],
)
def test_a_cells_bad_setting_stops_the_sweep_before_any_task(tmp_path, capsys, monkeypatch, argv, message):
    """Each cell gets the run's own checks up front: a typo is one line and exit 2, not a failed task per cell
    (on a cluster, a queued job per cell)."""
    from pipeline.cli import run_cli

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # also where CI has a GPU
    sets = [a for s in TINY_SETS for a in ("--set", s)]
    assert run_cli(["sweep", "--out", str(tmp_path / "sweep"), "--method", "kd", *sets, *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sweep").exists()


def test_an_empty_out_is_refused_not_read_as_the_current_folder(tmp_path, capsys, monkeypatch):
    from pipeline.cli import run_cli

    monkeypatch.chdir(tmp_path)  # empty: a sweep would have been made here
    assert run_cli(["sweep", "--out", "", "--method", "kd", *(a for s in TINY_SETS for a in ("--set", s))]) == 2
    assert "--out is empty" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_second_sweep_into_a_folder_in_use_is_refused(tmp_path):
    """Two sweeps in one folder would start the same cells and write each other's logs."""
    import os

    from pipeline.artifacts.store import hold_folder
    from pipeline.experiments.sweep import run_sweep

    sweep = expand_grid(tmp_path / "sweep", [], None, ["kd"], [0], TINY_SETS)
    (tmp_path / "sweep").mkdir()
    busy = f"sweep folder .* is in use by another sweep \\(pid {os.getpid()}\\)"
    # the first sweep, still running, holds the folder
    with hold_folder(tmp_path / "sweep", "sweep folder", "sweep"), pytest.raises(ConfigError, match=busy):
        run_sweep(sweep, backend=None)
    assert not (tmp_path / "sweep" / "sweep.json").exists()


def test_a_sweep_needs_a_folder_of_its_own(tmp_path):
    from pipeline.artifacts.store import RunStore
    from pipeline.experiments.sweep import check_sweep_folder

    check_sweep_folder(tmp_path / "new")
    (tmp_path / "started" / "submitit").mkdir(parents=True)  # a cluster sweep stopped before it wrote sweep.json
    (tmp_path / "started" / ".lock").write_text("")
    check_sweep_folder(tmp_path / "started")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("years of work")
    with pytest.raises(ConfigError, match=r"not empty and holds no sweep \(thesis.txt\)"):
        check_sweep_folder(tmp_path / "mine")
    RunStore(tmp_path / "run").ensure_writable()
    with pytest.raises(ConfigError, match="is a run folder; give the sweep a folder of its own"):
        check_sweep_folder(tmp_path / "run")
    expand_grid(tmp_path / "sweep", [], None, ["kd"], [0], TINY_SETS).write()
    (tmp_path / "sweep" / "notes.md").write_text("what this sweep is for")
    check_sweep_folder(tmp_path / "sweep")  # a sweep's own folder, whatever the user keeps beside it


def test_a_paper_preset_without_its_teacher_is_refused_before_anything_runs(tmp_path):
    preset = "cifar100-resnet32x4-shufflev1"
    with pytest.raises(ConfigError, match="imports its resnet32x4 teacher: pass --teacher-checkpoint"):
        expand_grid(tmp_path, [preset], None, ["kd"], [0], [])
    trained = expand_grid(tmp_path, [preset], None, ["kd"], [0, 1], ["teacher.source=train"])
    assert len(trained.teachers) == 1 and all("teacher.source=import" in c.args for c in trained.cells)


@pytest.mark.slow
def test_a_cluster_job_can_start_the_cell_under_torchrun(tmp_path):
    from pipeline.experiments.cluster import execute_task

    log = tmp_path / "job.log"
    assert execute_task(["sweep", "--help"], str(log), {"PIPELINE_PROGRESS": "0"}, gpus=1, torchrun=True) == 0
    text = log.read_text()
    assert "-m torch.distributed.run --standalone --nproc_per_node=1 -m pipeline sweep --help" in text
    assert "Run a grid of ordinary runs" in text


def test_the_shared_teacher_is_trained_with_the_first_seed_or_the_one_asked_for(tmp_path):
    def teacher_seed(**kwargs) -> str:
        (teacher,) = expand_grid(tmp_path, [], None, ["kd"], [3, 4], TINY_SETS, **kwargs).teachers
        return teacher.args[teacher.args.index("--seed") + 1]

    assert teacher_seed() == "3"
    assert teacher_seed(teacher_seed=7) == "7"


def test_a_given_teacher_is_imported_even_where_the_config_file_trains_one(tmp_path, capsys):
    from pipeline.cli import run_cli
    from pipeline.config import load_config
    from stages.teacher import check_teacher_source

    ckpt, config = tmp_path / "t.safetensors", tmp_path / "my.yaml"
    ckpt.write_bytes(b"x")
    config.write_text("teacher: {source: train}\n")
    argv = ["sweep", "--config", str(config), "--teacher-checkpoint", str(ckpt), "--method", "kd,vanilla"]
    assert run_cli([*argv, "--dry-run", "--out", str(tmp_path / "sweep")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("teacher.source=import" in line for line in lines)
    words = lines[0].split()
    sets = [value for flag, value in itertools.pairwise(words) if flag == "--set"]
    cfg = load_config(None, config, sets)
    assert cfg.teacher.checkpoint == str(ckpt.resolve())
    check_teacher_source(cfg)  # the conflict that failed every cell is gone


def test_the_shared_teacher_gets_the_threads_of_every_slot_and_a_cell_its_share(tmp_path):
    """The teacher trains alone (every cell waits for it): a cell's share would leave the other cores idle."""
    from pipeline.experiments.scheduler import LocalBackend

    teacher, cell = sweep_tasks(expand_grid(tmp_path, [], None, ["kd", "vanilla"], [0], TINY_SETS))[:2]
    backend = LocalBackend(slots=2, threads=3)
    assert backend.environment(0, teacher)["OMP_NUM_THREADS"] == "6"
    assert backend.environment(1, cell)["OMP_NUM_THREADS"] == "3"
    two = sweep_tasks(expand_grid(tmp_path, [], None, ["kd"], [0], [*TINY_SETS, "teacher.optim.lr=0.1,0.2"]))
    assert [backend.environment(0, t)["OMP_NUM_THREADS"] for t in two[:2]] == ["3", "3"]  # two teachers at once


def test_cells_share_the_cpus_the_sweep_may_use_not_the_machines(monkeypatch):
    """Under taskset or a container's cpuset the machine's count would give each cell many times its CPUs."""
    import os

    from pipeline.artifacts import machine
    from pipeline.config import auto_workers
    from pipeline.experiments.scheduler import LocalBackend

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert machine.usable_cpus() == 4
    assert LocalBackend(slots=2).threads == 2
    assert auto_workers() == 3


def test_run_threads_sets_torchs_threads_and_refuses_zero_or_more_than_the_usable_cpus(tmp_path, monkeypatch, capsys):
    import torch

    import pipeline.cli.runner
    from pipeline.artifacts import machine
    from pipeline.cli import run_cli

    monkeypatch.setattr(machine, "usable_cpus", lambda: 4)  # e.g. a cpuset of 4 on a larger machine
    seen = []
    monkeypatch.setattr(pipeline.cli.runner, "run_stages", lambda *a, **k: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        assert run_cli(["run", "fuse", "--out", str(tmp_path), "--threads", "2", *_set_args(TINY_SETS)]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [2]
    assert run_cli(["run", "fuse", "--out", str(tmp_path), "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
    for command in (["run", "fuse"], ["sweep", "--method", "kd"]):
        assert run_cli([*command, "--out", str(tmp_path / "more"), "--threads", "5", *_set_args(TINY_SETS)]) == 2
        err = capsys.readouterr().err
        assert "error: --threads 5 is more than the 4 CPU(s) this process may use" in err, err
        assert err.rstrip().endswith("use --threads 4 or fewer")
    assert seen == [2] and not (tmp_path / "more").exists()  # refused before anything ran or was written


def _set_args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]
