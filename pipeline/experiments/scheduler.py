"""Running a sweep's tasks: dependencies, a concurrency limit, a live status line, and failures kept apart.

The loop is the same on one machine and on a cluster; a backend only starts a task and says when it
has ended. :class:`LocalBackend` runs ``python -m pipeline ...`` subprocesses, each with its share of
the CPU threads or one GPU; :mod:`pipeline.experiments.cluster` submits jobs through submitit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, TextIO

from pipeline.artifacts import machine
from pipeline.experiments.state import is_up_to_date, mark_finished, sources_digest
from pipeline.progress import format_duration


@dataclass
class Task:
    """One run to execute: ``python -m pipeline <args> --out <folder>``, logged to ``log``."""

    name: str
    folder: Path
    args: tuple[str, ...]
    log: Path
    after: str | None = None  # name of a task that must finish first (the shared teacher)
    sharing: int = 0  # tasks that can run beside this one, itself included (0: every slot's worth)

    @property
    def argv(self) -> list[str]:
        return [*self.args, "--out", str(self.folder)]


@dataclass
class TaskResult:
    name: str
    status: str  # "ran", "up to date", "failed", "blocked"
    returncode: int | None = None
    seconds: float = 0.0
    last_line: str = ""


class Handle(Protocol):
    def poll(self) -> int | None: ...
    def stop(self) -> None: ...


class Backend(Protocol):
    slots: int  # tasks running at once

    def start(self, task: Task, slot: int) -> Handle: ...


def pipeline_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a task: this process's, with this code first on the path and no progress bars."""
    root = str(Path(__file__).resolve().parents[2])
    paths = [root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PIPELINE_PROGRESS": "0", **(extra or {})}


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """A cell must not outlive a sweep killed with SIGKILL: it would hold its run folder's lock."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Process:
    def __init__(self, popen: subprocess.Popen, log: TextIO):
        self.popen, self.log = popen, log

    def poll(self) -> int | None:
        code = self.popen.poll()
        if code is not None and not self.log.closed:
            self.log.close()
        return code

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)  # the run discards its staging folder and keeps resume state
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log.close()


@dataclass
class LocalBackend:
    """N subprocesses at a time; with GPUs each gets one (CUDA_VISIBLE_DEVICES), else a share of the threads."""

    slots: int
    gpus: list[str] = field(default_factory=list)
    threads: int = 0  # per task; 0: the usable CPUs divided by ``slots``

    def __post_init__(self):
        if not self.threads:
            self.threads = max(1, machine.usable_cpus() // self.slots)

    def task_threads(self, task: Task | None = None) -> int:
        """A task that runs with fewer others than there are slots (a shared teacher, before any cell starts)
        gets the idle slots' threads too, instead of waiting on a cell's share while the cores stand idle."""
        beside = min(self.slots, task.sharing) if task and task.sharing else self.slots
        return max(1, self.threads * self.slots // beside)

    def environment(self, slot: int, task: Task | None = None) -> dict[str, str]:
        threads = str(self.task_threads(task))
        extra = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if self.gpus:
            extra["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        return pipeline_env(extra)

    def start(self, task: Task, slot: int) -> Handle:
        task.log.parent.mkdir(parents=True, exist_ok=True)
        log = open(task.log, "a")  # noqa: SIM115 - closed by the handle when the process ends
        command = [sys.executable, "-m", "pipeline", *task.argv]
        log.write(f"=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} {' '.join(command)}\n")
        log.flush()
        popen = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.environment(slot, task),
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        return _Process(popen, log)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (empty without CUDA)."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(count)]
    return ids[:count]


class StatusLine:
    """``sweep: 3/6 done, 2 running, 1 failed, ETA 2m10s``: redrawn in place on a terminal, else a line per change."""

    def __init__(self, total: int, stream: TextIO | None = None):
        self.total, self.stream = total, stream or sys.stderr
        self.is_tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last = ""

    def show(self, done: int, running: int, failed: int, eta_s: float | None) -> None:
        eta = "?" if eta_s is None else format_duration(eta_s)
        line = f"sweep: {done}/{self.total} done, {running} running, {failed} failed, ETA {eta}"
        if self.is_tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        elif line.split(", ETA")[0] != self.last.split(", ETA")[0]:
            self.stream.write(line + "\n")
            self.stream.flush()
        self.last = line

    def close(self) -> None:
        if self.is_tty and self.last:
            self.stream.write("\n")
            self.stream.flush()


def last_line(path: Path) -> str:
    """The last non-empty line of a log (what a failed run said last)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def run_tasks(
    tasks: list[Task],
    backend: Backend,
    status: StatusLine | None = None,
    poll_s: float = 0.5,
    on_result: Callable[[TaskResult], None] | None = None,
) -> list[TaskResult]:
    """Run every task that is not up to date, ``backend.slots`` at a time, dependencies first.

    A failed task does not stop the others; tasks that depend on it are ``blocked``. On Ctrl-C the
    running tasks are stopped (they keep their resume state) and the interrupt is re-raised.
    """
    code = sources_digest()
    status = status or StatusLine(len(tasks))
    results: dict[str, TaskResult] = {}
    pending = list(tasks)
    running: dict[int, tuple[Task, Handle, float]] = {}
    durations: list[float] = []
    stale: set[str] = set()

    def finish(result: TaskResult) -> None:
        results[result.name] = result
        if on_result:
            on_result(result)

    def refresh() -> None:
        done = sum(r.status in ("ran", "up to date") for r in results.values())
        failed = len(results) - done
        left = len(tasks) - len(results)
        eta = None
        if durations:
            mean = sum(durations) / len(durations)
            elapsed = sum(min(time.monotonic() - t0, mean) for _, _, t0 in running.values())
            eta = (left * mean - elapsed) / max(1, min(backend.slots, left))
        elif not left:
            eta = 0.0
        status.show(done, len(running), failed, eta)

    try:
        while pending or running:
            for slot, (task, handle, started) in list(running.items()):
                code_ = handle.poll()
                if code_ is None:
                    continue
                del running[slot]
                seconds = time.monotonic() - started
                if code_ == 0:
                    mark_finished(task.folder, task.argv)
                    durations.append(seconds)
                    finish(TaskResult(task.name, "ran", 0, seconds))
                else:
                    finish(TaskResult(task.name, "failed", code_, seconds, last_line(task.log)))
            for task in list(pending):
                if task.after and task.after not in results:
                    continue
                if task.after and results[task.after].status not in ("ran", "up to date"):
                    pending.remove(task)
                    finish(TaskResult(task.name, "blocked", None, 0.0, f"{task.after} did not finish"))
                    continue
                if task.name not in stale:  # re-hashing outputs is not free: decide once per task
                    if is_up_to_date(task.folder, task.argv, code):
                        pending.remove(task)
                        finish(TaskResult(task.name, "up to date", 0))
                        continue
                    stale.add(task.name)
                free = [s for s in range(backend.slots) if s not in running]
                if not free:  # go on: the finished cells further down count as done from the start
                    continue
                pending.remove(task)
                running[free[0]] = (task, backend.start(task, free[0]), time.monotonic())
            refresh()
            if running:
                time.sleep(poll_s)
    except BaseException:
        for _, handle, _ in running.values():
            handle.stop()
        status.close()
        raise
    status.close()
    return [results[t.name] for t in tasks]


def slots_for(jobs: int | None, gpus: list[str]) -> int:
    """``--jobs`` or, by default, one task per GPU (one at a time without GPUs)."""
    if jobs is not None:
        return jobs
    return max(1, len(gpus)) if gpus else 1


__all__ = [
    "Backend",
    "LocalBackend",
    "StatusLine",
    "Task",
    "TaskResult",
    "last_line",
    "run_tasks",
    "slots_for",
    "visible_gpus",
]
