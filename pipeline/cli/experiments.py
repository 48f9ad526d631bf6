"""The ``sweep``, ``compare`` and ``report`` commands: thin click wrappers over :mod:`pipeline.experiments`
and :mod:`pipeline.report`, registered on the main group by :mod:`pipeline.cli`."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from pipeline.errors import ConfigError


def _ints(values: tuple[str, ...]) -> list[int]:
    from pipeline.experiments.grid import split_list

    try:
        return [int(v) for v in split_list(values)]
    except ValueError:
        raise ConfigError(f"--seed takes integers (repeat it or give a comma list), got {', '.join(values)}") from None


@click.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False),  # a str until checked: Path("") is the current folder
    default="runs/sweep",
    show_default=True,
    help="Sweep folder: cells/, teachers/, logs/ and sweep.json.",
)
@click.option("--preset", "presets", multiple=True, metavar="NAME[,NAME]", help="Preset(s); one axis of the grid.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help="YAML config file.")
@click.option(
    "--method", "methods", multiple=True, metavar="NAME[,NAME]", help="Methods; an axis (e.g. kd,dkd,vanilla)."
)
@click.option("--seed", "seeds", multiple=True, metavar="N[,N]", help="Seeds; an axis (e.g. 0,1,2).")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=V[,V]",
    help="Override for every cell; several comma-separated values make an axis.",
)
@click.option("--data-root", default=None, metavar="DIR", help="Folder holding the dataset.")
@click.option("--device", default=None, help="auto, cpu, cuda (a local sweep gives each cell its own GPU).")
@click.option("--teacher-checkpoint", default=None, metavar="FILE", help="Import this teacher in every cell.")
@click.option("--teacher-seed", type=int, default=None, help="Seed of the shared teacher [default: the first seed].")
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=1),
    default=None,
    help="Cells at a time on this machine [default: one per GPU, else 1].",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads per cell, at most the CPUs this process may use [default: those CPUs divided by --jobs].",
)
@click.option(
    "--cluster",
    type=click.Choice(["slurm", "submitit-local"]),
    default=None,
    help="Submit one job per cell through submitit (submitit-local: its LocalExecutor, for a dry run).",
)
@click.option("--partition", default=None, help="SLURM partition.")
@click.option(
    "--time",
    "time_min",
    type=click.IntRange(min=1),
    default=240,
    show_default=True,
    help="SLURM time limit per cell, minutes.",
)
@click.option("--gpus-per-cell", type=click.IntRange(min=0), default=0, show_default=True, help="GPUs per SLURM job.")
@click.option("--cpus-per-cell", type=click.IntRange(min=1), default=4, show_default=True, help="CPUs per SLURM job.")
@click.option("--mem-gb", type=click.IntRange(min=1), default=None, help="Memory per SLURM job, GB.")
@click.option("--torchrun", is_flag=True, help="Run each SLURM cell with torchrun over its --gpus-per-cell GPUs.")
@click.option("--dry-run", is_flag=True, help="Print the cells and their commands; run nothing.")
def sweep(
    out,
    presets,
    config_file,
    methods,
    seeds,
    overrides,
    data_root,
    device,
    teacher_checkpoint,
    teacher_seed,
    jobs,
    threads,
    cluster,
    partition,
    time_min,
    gpus_per_cell,
    cpus_per_cell,
    mem_gb,
    torchrun,
    dry_run,
):
    """Run a grid of ordinary runs: presets (or --config) x methods x seeds x --set axes.

    Each cell is `run all` into OUT/cells/<name>; a teacher that cells need is trained once and imported
    by every cell. Run the same command again to skip finished cells and resume the others.
    """
    from pipeline.artifacts.machine import check_threads
    from pipeline.cli.runner import check_settings, validate
    from pipeline.config import check_path, check_preset_name
    from pipeline.experiments.grid import expand_grid, split_list
    from pipeline.experiments.scheduler import LocalBackend, slots_for, visible_gpus
    from pipeline.experiments.sweep import (
        SUBMITIT,
        check_results,
        check_sweep_folder,
        results_table,
        run_sweep,
        sweep_tasks,
    )
    from stages import stage_order

    check_path(out, "--out", text=True)
    out = Path(out)
    for option, value in (("--data-root", data_root), ("--teacher-checkpoint", teacher_checkpoint)):
        if value is not None:
            check_path(value, option)  # before resolving: Path("") is the current folder
    for name in presets:
        check_preset_name(name.replace(",", " "))  # "" or ",": split_list would drop it and sweep the default
    for option, values in (("--method", methods), ("--seed", seeds)):
        if any(not value.replace(",", " ").strip() for value in values):  # likewise: `--method "$METHODS"` unset
            raise ConfigError(f"{option} is empty; give a value or leave it out")
    sets = list(overrides)
    for key, value in (("data.root", data_root), ("device", device), ("teacher.checkpoint", teacher_checkpoint)):
        if value is not None:
            sets.append(f"{key}={json.dumps(str(Path(value).resolve()) if key != 'device' else value)}")
    if teacher_checkpoint is not None:  # imported as the sweep's own teacher is, whatever a --config file says
        sets.append("teacher.source=import")
    # every cell runs `run all`; a cluster's nodes, not this machine, have the cells' devices
    check = functools.partial(check_settings if cluster else validate, names=stage_order())
    grid = expand_grid(
        out, split_list(presets), config_file, split_list(methods), _ints(seeds), sets, teacher_seed, check
    )
    if dry_run:
        for task in sweep_tasks(grid):
            click.echo(f"{task.name}: python -m pipeline {' '.join(task.argv)}")
        return
    if cluster:
        from pipeline.experiments.cluster import ClusterOptions, SubmititBackend, make_executor

        options = ClusterOptions(partition, time_min, gpus_per_cell, cpus_per_cell, mem_gb, torchrun)
        check_sweep_folder(out)  # before the executor makes its folder there
        executor = make_executor(out.resolve() / SUBMITIT, cluster.split("-")[-1], options)
        backend = SubmititBackend(executor, options)
    else:
        check_threads(threads, "--threads")
        gpus = [] if device == "cpu" else visible_gpus()
        backend = LocalBackend(slots_for(jobs, gpus), gpus, threads or 0)
    click.echo(f"sweep: {len(grid.cells)} cells, {len(grid.teachers)} shared teacher(s) in {out}", err=True)
    results = run_sweep(grid, backend)
    click.echo(results_table(results))
    check_results(results, out)
    click.echo(f"compare: python -m pipeline compare {out}")


# compare and report read the same kind of arguments: run folders and sweep folders, one or several
run_folders = click.argument(
    "paths", metavar="RUNS_OR_SWEEPS...", nargs=-1, required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)  # fmt: skip


@click.command()
@run_folders
@click.option(
    "--best", is_flag=True, help="Also show the best-epoch test top-1 (labelled; the last epoch is the main figure)."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "markdown", "csv", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to this file instead of stdout.")
def compare(paths, best, fmt, output):
    """The paper-shaped table: methods x teacher->student pairs, mean ± std of test top-1 over seeds,
    Δ vs vanilla and KD, published figures, and per deployed model its size, FLOPs, latency and INT8 drop."""
    from pipeline.artifacts.atomic import atomic_write_text
    from pipeline.report.table import build_comparison, render

    text = render(build_comparison(list(paths)), fmt, best=best)
    if output:
        with _writing(output):
            atomic_write_text(output, text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text)


@contextmanager
def _writing(output: Path | None) -> Iterator[None]:
    """A file the command cannot write (a read-only place, a missing mount) is a user's choice to change."""
    from pipeline.config import check_path
    from pipeline.errors import no_space

    if output is not None:
        check_path(str(output), "--output")
        if output.is_dir():  # also "": click makes it Path(".")
            raise ConfigError(f"--output {output} is a folder; give a file name")
    try:
        yield
    except OSError as exc:
        if no_space(exc):
            raise
        why = exc.strerror or str(exc)
        if isinstance(exc, FileExistsError | NotADirectoryError):  # from making its folders
            why = "a file stands where one of its folders should be"
        raise ConfigError(f"cannot write {output or exc.filename} ({why}); choose another --output") from None


@click.command()
@run_folders
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="HTML file to write [default: RUN_OR_SWEEP/report.html; ./report.html for several folders].",
)
def report(paths, output):
    """One self-contained HTML page (no network): stages, checks, training curves, parity, latency, INT8 ranges;
    for a sweep, or several folders as with `compare`, the comparison table and accuracy vs latency."""
    from pipeline.report import write_report

    with _writing(output):
        written = write_report(list(paths), output)
    click.echo(str(written))
