"""Sweeps on a cluster: one SLURM job per task through submitit (the scheduler does the queueing).

submitit is maintained by Meta's FAIR, writes the sbatch script, pickles the job function and tracks
the job; its ``LocalExecutor`` runs the same jobs as local processes, which is how the tests drive
this path without a cluster. The sweep process stays up to submit cells after their teacher and to
show the status line; killed, it loses nothing: the jobs keep running, and the same command again
skips what finished.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.experiments.scheduler import Task, pipeline_env


def execute_task(argv: list[str], log: str, extra_env: dict[str, str], gpus: int, torchrun: bool) -> int:
    """The job body: ``python -m pipeline ARGV`` (through torchrun over ``gpus`` GPUs if asked); its exit status.

    The job keeps the environment the scheduler gave it (its GPUs, SLURM variables) plus ``extra_env``.
    """
    env = {**os.environ, **extra_env}
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
        command += ["-m", "pipeline", *argv]
    else:
        command = [sys.executable, "-m", "pipeline", *argv]
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        out.write(f"=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} {' '.join(command)}\n")
        out.flush()
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode


@dataclass
class ClusterOptions:
    partition: str | None = None
    time_min: int = 240
    gpus_per_task: int = 0
    cpus_per_task: int = 4
    mem_gb: int | None = None
    torchrun: bool = False

    def check(self) -> None:
        if self.torchrun and self.gpus_per_task < 1:
            raise ConfigError("--torchrun needs --gpus-per-cell of at least 1")
        if self.time_min < 1 or self.cpus_per_task < 1 or self.gpus_per_task < 0:
            raise ConfigError("--time, --cpus-per-cell must be positive and --gpus-per-cell not negative")


def make_executor(folder: Path, cluster: str, options: ClusterOptions) -> Any:
    """A submitit executor: ``slurm`` (sbatch) or ``local`` (submitit's LocalExecutor, for trying the path)."""
    try:
        import submitit
    except ImportError as exc:
        raise ConfigError(
            f"--cluster needs submitit, which is not importable ({exc}); "
            "install it with: pip install 'kdiffusion-pipeline[cluster]'"
        ) from None
    options.check()
    if cluster == "local":
        executor = submitit.LocalExecutor(folder=folder / "%j")
        executor.update_parameters(timeout_min=options.time_min)
        return executor
    try:
        executor = submitit.SlurmExecutor(folder=folder / "%j")
    except RuntimeError as exc:  # submitit looks for srun: not a SLURM login node
        raise ConfigError(
            f"--cluster slurm needs SLURM's commands on this machine ({exc}); "
            "run the sweep from a login node, or try the path here with --cluster submitit-local"
        ) from None
    executor.update_parameters(**slurm_parameters(options))
    return executor


def slurm_parameters(options: ClusterOptions) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters for one cell per job on one node."""
    params: dict[str, Any] = {
        "time": options.time_min,
        "cpus_per_task": options.cpus_per_task,
        "ntasks_per_node": 1,
        "nodes": 1,
        "job_name": "kdpipe",
    }
    if options.partition:
        params["partition"] = options.partition
    if options.gpus_per_task:
        params["gpus_per_node"] = options.gpus_per_task
    if options.mem_gb:
        params["mem"] = f"{options.mem_gb}GB"
    return params


class _Job:
    def __init__(self, job: Any):
        self.job = job

    def poll(self) -> int | None:
        if not self.job.done():
            return None
        try:
            return int(self.job.result())
        except Exception:
            return 255

    def stop(self) -> None:
        """Cancel the job (on Ctrl-C): a job left running would hold its run folder when the sweep is rerun."""
        if not self.job.done():
            self.job.cancel(check=False)


@dataclass
class SubmititBackend:
    """Every ready task is submitted at once; the cluster decides how many run."""

    executor: Any
    options: ClusterOptions
    slots: int = 1_000_000

    def start(self, task: Task, slot: int) -> _Job:
        threads = str(self.options.cpus_per_task)
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PIPELINE_PROGRESS": "0"}
        env["PYTHONPATH"] = pipeline_env()["PYTHONPATH"]  # this code first, on the shared filesystem
        if hasattr(self.executor, "update_parameters"):
            self.executor.update_parameters(**self._name(task))
        job = self.executor.submit(
            execute_task, task.argv, str(task.log), env, self.options.gpus_per_task, self.options.torchrun
        )
        return _Job(job)

    def _name(self, task: Task) -> dict:
        return {} if type(self.executor).__name__ == "LocalExecutor" else {"job_name": f"kdpipe-{task.name}"[:64]}
