"""A sweep end to end: record the grid, run shared teachers then cells, and say what failed."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts.store import LOCK, MARKER, hold_folder
from pipeline.errors import ConfigError, PipelineError
from pipeline.experiments.grid import CELLS, SWEEP_FILE, TEACHERS, Sweep
from pipeline.experiments.scheduler import Backend, StatusLine, Task, TaskResult, run_tasks

LOGS = "logs"
SUBMITIT = "submitit"  # the cluster jobs' scripts and pickles


class SweepFailedError(PipelineError):
    """Some cells of a sweep failed or could not start; the others finished."""

    exit_code = 1


def sweep_tasks(sweep: Sweep) -> list[Task]:
    """Shared teachers first (given the cores the waiting cells leave idle), then every cell, each waiting for
    the teacher it imports."""
    root = sweep.root.resolve()
    n = len(sweep.teachers)  # cells wait for their teacher: only the teachers run at first, sharing the machine
    tasks = [
        Task(f"teacher-{t.key}", t.folder(root), t.args, root / LOGS / f"teacher-{t.key}.log", sharing=n)
        for t in sweep.teachers
    ]
    for cell in sweep.cells:
        after = f"teacher-{cell.teacher}" if cell.teacher else None
        tasks.append(Task(cell.name, cell.folder(root), cell.args, root / LOGS / f"{cell.name}.log", after))
    return tasks


def check_sweep_folder(root: Path) -> None:
    """A sweep works in a new or empty folder, or one a sweep made: not in a run folder (a hybrid that `compare`
    would read as the sweep alone), nor among someone's files."""
    if not root.exists():
        return
    if not root.is_dir():
        raise ConfigError(f"sweep folder {root} is not a folder; choose another with --out")
    names = {p.name for p in root.iterdir()}
    if MARKER in names:
        raise ConfigError(f"{root} is a run folder; give the sweep a folder of its own with --out")
    foreign = sorted(names - {SWEEP_FILE, CELLS, TEACHERS, LOGS, SUBMITIT, LOCK})
    if foreign and SWEEP_FILE not in names:
        raise ConfigError(
            f"{root} is not empty and holds no sweep ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
            "choose an empty or new folder with --out"
        )


def run_sweep(sweep: Sweep, backend: Backend, status: StatusLine | None = None) -> list[TaskResult]:
    """Run the grid, one sweep at a time in its folder: a second would start the same cells and share their logs."""
    check_sweep_folder(sweep.root)
    sweep.root.mkdir(parents=True, exist_ok=True)
    with hold_folder(sweep.root, "sweep folder", "sweep"):
        sweep.write()
        tasks = sweep_tasks(sweep)
        return run_tasks(tasks, backend, status or StatusLine(len(tasks)))


def results_table(results: list[TaskResult]) -> str:
    """One line per task, then the failures with their exit status and the last line of their log."""
    width = max(len(r.name) for r in results) if results else 4
    lines = [f"{'task'.ljust(width)}  status      time"]
    for r in results:
        time_s = f"{r.seconds:.0f}s" if r.status == "ran" or r.status == "failed" else "-"
        lines.append(f"{r.name.ljust(width)}  {r.status.ljust(10)}  {time_s}")
    failed = [r for r in results if r.status in ("failed", "blocked")]
    if failed:
        lines.append("")
        lines.append("failed:")
        for r in failed:
            code = "not started" if r.returncode is None else f"exit {r.returncode}"
            lines.append(f"  {r.name}: {code}: {r.last_line or '(no output)'}")
    return "\n".join(lines)


def check_results(results: list[TaskResult], root: Path) -> None:
    failed = [r for r in results if r.status in ("failed", "blocked")]
    if failed:
        raise SweepFailedError(
            f"{len(failed)} of {len(results)} tasks failed (logs in {root / LOGS}); "
            "fix the cause and run the same command again: finished cells are skipped"
        )
