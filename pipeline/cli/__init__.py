"""``python -m pipeline``: a thin click layer that validates, then calls one library function.

User mistakes raise :class:`PipelineError`; :func:`main` prints them as one line and exits with the
error's status (2 for bad input, 1 for a failed gate), never with a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click

from exports.errors import EdgeError
from pipeline import interrupts
from pipeline.cli.experiments import compare, report, sweep
from pipeline.errors import (
    CheckFailedError,
    ConfigError,
    PipelineError,
    clipped,
    interrupted,
    missing_dependency,
    no_space,
    one_line,
    out_of_memory,
)


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="kdiffusion-pipeline", message="%(version)s")
def cli() -> None:
    """Distill a student with KDiffusion, fuse it, verify it, and export it for deployment."""


@cli.command()
@click.argument("stages", metavar="[STAGE]...", nargs=-1)
@click.option("--out", type=click.Path(file_okay=False), help="Run folder [default: runs/<preset>].")
@click.option(
    "--preset",
    default=None,
    metavar="NAME",
    help="Experiment preset (see `presets`) [default: default; none with --config].",
)
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help="YAML config file.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. student.optim.epochs=2.",
)
@click.option("--method", default=None, help="Distillation method for the student (see `methods`).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None, help="Random seed.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.")
@click.option("--data-root", default=None, metavar="DIR", help="Folder holding the dataset.")
@click.option("--teacher-checkpoint", default=None, metavar="FILE", help="Import this teacher instead of training one.")
@click.option("--checkpoint", default=None, metavar="FILE", help="Export this student checkpoint (with `run export`).")
@click.option("--force", is_flag=True, help="Rerun stages even when they are up to date.")
@click.option(
    "--keep",
    multiple=True,
    metavar="STAGE",
    help="Keep STAGE's artifacts when only its code changed (e.g. an upgrade); recorded in its manifest.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the resolved configuration (YAML, each value with where it came from) and which stages would run "
    "and why; run and write nothing.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for torch's operators, at most the CPUs this process may use [default: torch's, or "
    "OMP_NUM_THREADS].",
)
def run(
    stages,
    out,
    preset,
    config_file,
    overrides,
    method,
    seed,
    device,
    data_root,
    teacher_checkpoint,
    checkpoint,
    force,
    keep,
    dry_run,
    threads,
):
    """Run the STAGEs (all, or any of teacher, train, fuse, verify, export, engine; default all) in pipeline order.

    Up-to-date artifacts of earlier stages are reused, e.g. `run export engine --checkpoint student.safetensors`.
    """
    from pipeline.artifacts.machine import check_threads
    from pipeline.cli.runner import run_stages
    from pipeline.config import check_path, load_config
    from stages import get_stage, stage_order

    check_threads(threads, "--threads")
    sets, labels = list(overrides), ["--set"] * len(overrides)  # labels: where each value came from (--dry-run)
    for option, key, value in (
        ("--method", "student.method", method),
        ("--seed", "seed", seed),
        ("--device", "device", device),
        ("--data-root", "data.root", data_root),
        ("--teacher-checkpoint", "teacher.checkpoint", teacher_checkpoint),
        ("--checkpoint", "export.checkpoint", checkpoint),
    ):
        if value is not None:
            sets.append(f"{key}={json.dumps(value)}")
            labels.append(option)
    for name in (*(s for s in stages if s != "all"), *keep):
        get_stage(name)  # an unknown name is a one-line error listing the registered stages
    if out is not None:
        check_path(out, "--out", text=True)  # before it becomes a Path: Path("") is the current folder
        out = Path(out)
    default = "default" if config_file is None else None
    cfg = load_config(preset if preset is not None else default, config_file, sets, log=_echo_err)
    order = stage_order()
    names = order if not stages or "all" in stages else tuple(name for name in order if name in stages)
    if checkpoint and not set(names) <= {"export", "engine"}:
        raise ConfigError("--checkpoint is for `run export` (a student made elsewhere), optionally with `engine`")
    out = out or Path("runs") / (preset or cfg.name)
    if dry_run:
        from pipeline.cli.runner import dry_run as plan_run
        from pipeline.config import annotated_yaml, value_origins

        plan = plan_run(cfg, out, names, force=force, log=_echo_err, keep=tuple(keep))
        layers = ["the defaults", *([f"preset {preset or default}"] if preset or default else [])]
        layers += [f"--config {config_file}"] * (config_file is not None) + ["--set and options"] * bool(sets)
        click.echo(f"# resolved configuration: {' < '.join(layers)}")
        click.echo("# after each value, the layer that set it (default: the typed defaults of pipeline/config.py)")
        origins = value_origins(cfg, preset if preset is not None else default, config_file, sets, labels)
        click.echo("\n".join(annotated_yaml(cfg.to_dict(), origins)))
        click.echo(f"# stages in {out} (dry run: nothing was run or written):")
        width = max(len(name) for name, _ in plan)
        for name, what in plan:
            click.echo(f"#   {name.ljust(width)}  {what}")
        return
    if threads is not None:
        import torch

        torch.set_num_threads(threads)  # recorded in every manifest's environment (torch_threads)
    outcomes, failed = [], None
    try:
        run_stages(cfg, out, names, force=force, log=_echo_err, on_outcome=outcomes.append, keep=tuple(keep))
    except CheckFailedError as exc:  # a failed gate: its report is the first thing to read
        failed = exc
    finally:
        if outcomes:
            click.echo(summary_table(outcomes, Path(out)))
    if (not stages or "all" in stages) and outcomes and os.environ.get("RANK", "0") == "0":  # `run all`: the report
        from pipeline.report import write_report

        click.echo(f"report: {write_report(out)}")
    if failed:
        raise failed


def summary_table(outcomes, out: Path) -> str:
    """One line per stage: status, checks passed, time, folder, then its key figures (or why it was skipped)."""
    rows = [("stage", "status", "checks", "time", "artifacts", "key figures")]
    for o in outcomes:
        m = o.manifest
        status = m.status + (f" ({o.action})" if o.action in ("up to date", "kept") else "")
        checks = f"{sum(map(bool, m.checks))}/{len(m.checks)}" if m.checks else "-"
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in m.metrics.items() if isinstance(v, int | float))
        failed = [c.name for c in m.checks if not c]
        if failed:
            figures = f"FAILED: {', '.join(failed)}; {figures}"
        if m.status == "skipped":
            figures = m.reason
        seconds = m.meta.get("duration_s")
        rows.append(
            (o.stage, status, checks, f"{seconds:.1f}s" if seconds is not None else "-", str(out / o.stage), figures)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:5], widths)) + "  " + r[5] for r in rows]
    return "\n".join([lines[0], "-" * max(len(line) for line in lines[:1]), *lines[1:]])


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@cli.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifests as JSON.")
def inspect(run_dir, as_json):
    """Show every stage's status, whether its code changed since it was built, its checks and artifact hashes.

    Exits with status 2, naming what changed, when a manifest or artifact was edited after its stage wrote it.
    """
    from pipeline.artifacts.store import RunStore
    from pipeline.cli.runner import code_status
    from pipeline.errors import ArtifactError
    from stages import stage_order

    store = RunStore(run_dir)
    order = {name: i for i, name in enumerate(stage_order())}
    names = sorted(store.stages(), key=lambda n: (order.get(n, len(order)), n))  # the run reads top to bottom
    if not names:
        from pipeline.experiments.grid import CELLS, is_sweep

        if is_sweep(run_dir):
            raise ConfigError(
                f"{run_dir} is a sweep folder: inspect one of its runs ({run_dir / CELLS}/<cell>), or read them all "
                "with `compare` or `report`"
            )
        if (run_dir / "manifest.json").is_file() and run_dir.name in order:
            raise ConfigError(f"{run_dir} is the {run_dir.name} stage of a run: inspect the run, {run_dir.parent}")
        raise ConfigError(f"{run_dir} holds no stage manifests; is it a run folder?")
    audits = {name: store.audit(name) for name in names}
    problems = [p for _, found in audits.values() for p in found]
    manifests = {name: m for name, (m, _) in audits.items() if m is not None}
    if as_json:
        sorted_keys = {n: json.loads(json.dumps(m.to_dict(), sort_keys=True)) for n, m in manifests.items()}
        click.echo(json.dumps(sorted_keys, indent=2))  # stages in pipeline order, each manifest's keys sorted
    else:
        for name, (m, found) in audits.items():
            if m is None:
                click.echo(f"{name}: unreadable")
            else:
                reason = f" ({m.reason})" if m.reason else ""
                click.echo(f"{name}: {m.status}{reason}  fingerprint {m.fingerprint[:12]}  digest {m.digest[:12]}")
            for problem in found:
                click.echo(f"  PROBLEM: {problem}")
            if m is not None:
                click.echo(f"  code: {code_status(m)}")
            for c in m.checks if m else ():
                click.echo(f"  {c.describe()}")
            for a in m.outputs if m else ():
                click.echo(f"  out {a.path}  sha256 {a.sha256[:16]}  {a.bytes} B")
    if problems:
        more = f" (and {len(problems) - 1} more problem(s) above)" if len(problems) > 1 else ""
        raise ArtifactError(f"{problems[0]}{more}")


@cli.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print each preset's pair, dataset and expected figures as JSON.")
def presets(name, as_json):
    """List experiment presets: teacher -> student, dataset, method and the expected top-1 figures.

    With NAME, print that preset's file: what it is for, how to run it and every setting it makes.
    """
    from pipeline.config import check_preset_name, list_presets, load_config, preset_text

    if name is not None:
        check_preset_name(name, "NAME")
        click.echo(preset_text(name), nl=False)
        return
    configs = {name: load_config(name) for name in list_presets()}
    if as_json:
        rows = [
            {
                "name": name,
                "teacher": cfg.teacher.arch,
                "student": cfg.student.arch,
                "dataset": cfg.data.dataset,
                "method": cfg.student.method,
                "teacher_source": cfg.teacher.source,
                "expected": cfg.expected,
            }
            for name, cfg in configs.items()
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    table = [("preset", "teacher -> student", "dataset", "method", "expected top-1: teacher / student / method")]
    for name, cfg in configs.items():
        figures = [cfg.expected_top1("teacher"), cfg.expected_top1("student"), cfg.expected_top1()]
        expected = " / ".join("-" if f is None else f"{f:.2f}" for f in figures) if cfg.expected else ""
        if cfg.expected.get("method"):
            expected += f" ({cfg.expected['method']})"
        pair = f"{cfg.teacher.arch} -> {cfg.student.arch}"
        table.append((name, pair, cfg.data.dataset, cfg.student.method, expected))
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for r in table:
        click.echo(("  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths)) + "  " + r[4]).rstrip())
    click.echo("\nWhat one is for, how to run it and what it sets: python -m pipeline presets NAME")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option(
    "--describe",
    "describe",
    metavar="NAME",
    help="Show the taps and KDiffusion sites of one model "
    "(a zoo name, timm:<name> or torchvision:<name>) with their shapes.",
)
@click.option("--size", type=int, default=None, help="Input size for --describe (timm:/torchvision: models).")
def models(as_json, describe, size):
    """List every model with its parameter count (for 100 classes), or describe one."""
    from pipeline.models import build_model, count_parameters, list_models, model_info

    if describe:
        from pipeline.models import check_model_name
        from pipeline.models.describe import describe_model, format_description

        check_model_name(describe)
        d = describe_model(describe, 100, size)
        click.echo(json.dumps(d, indent=2) if as_json else format_description(d))
        return
    rows = []
    for name in list_models():
        info = model_info(name)
        rows.append(
            {
                "name": name,
                "family": info.family,
                "input_size": info.input_size,
                "parameters": count_parameters(build_model(name, 100)),
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            click.echo(f"{r['name']:24s} {r['family']:9s} {r['input_size']:4d}px {r['parameters']:>12,d}")


@cli.command()
def methods():
    """List distillation methods."""
    from pipeline.distill import METHODS, method_names

    for name in method_names():
        doc = (METHODS.get(name).__doc__ or "").strip().splitlines()
        click.echo(f"{name:22s} {doc[0] if doc else ''}")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def image_files(paths: tuple[Path, ...], recursive: bool) -> list[tuple[Path, Exception | None]]:
    """Each path, or a folder's image files in sorted order; a folder without any is an error in its place."""
    from exports.runtime import ImageError

    found: list[tuple[Path, Exception | None]] = []
    for path in paths:
        if not path.is_dir():
            found.append((path, None))
            continue
        walk = path.rglob("*") if recursive else path.iterdir()
        files = [(p, None) for p in sorted(walk) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        where = "or below it" if recursive else "(--recursive to descend)"
        found += files or [(path, ImageError(f"{path} holds no image files {where}"))]
    return found


PREDICT_BATCH = 8  # images per inference call: a folder need not fit in memory, nor in an engine's largest batch


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", required=True, type=click.Path(dir_okay=False, path_type=Path), help=".onnx or .engine file.")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1), help="Classes to show per image.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="For .onnx.")
@click.option("--recursive", "-r", is_flag=True, help="Also classify the images in the folders' subfolders.")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions (and per-image errors) as JSON.")
def predict(images, model, top_k, provider, recursive, as_json):
    """Classify IMAGE... (files, or folders of images in sorted order) with an exported model (exports.runtime).

    Every readable image is answered; each one that is not gets one line on stderr, and the exit status is 2.
    """
    import numpy as np

    from exports.runtime import Classifier, ImageError, load_image, preprocess, top_classes

    items, rows, failed = image_files(images, recursive), [], 0
    with Classifier.load(model, provider=provider) as classifier:
        for start in range(0, len(items), PREDICT_BATCH):
            chunk: list[tuple[str, object]] = []  # (name, the model's input or the error that stopped it)
            for path, problem in items[start : start + PREDICT_BATCH]:
                try:
                    if problem is not None:
                        raise problem
                    chunk.append((str(path), preprocess(load_image(path), classifier.meta)))
                except ImageError as exc:  # one image's fault: the others are answered
                    chunk.append((str(path), exc))
            good = [array for _, array in chunk if not isinstance(array, Exception)]
            answers = iter(top_classes(classifier.logits(np.stack(good)), top_k, classifier.meta) if good else [])
            for name, array in chunk:
                if isinstance(array, Exception):
                    failed += 1
                    message = one_line(array) if name in str(array) else f"{name}: {one_line(array)}"
                    _echo_err(f"error: {message}")
                    rows.append({"image": name, "error": message})
                    continue
                preds = next(answers)
                rows.append({"image": name, "top": [vars(p) for p in preds]})
                if not as_json:
                    click.echo(f"{name}: " + ", ".join(f"{p.label} {p.probability:.3f}" for p in preds))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    if failed:
        raise ImageError(f"{failed} of {len(items)} images could not be classified (listed above)")


for _command in (sweep, compare, report):  # the experiment commands, defined in their own module
    cli.add_command(_command)


def run_cli(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status (user errors print one line, never a traceback)."""
    interrupts.forget()
    try:
        cli.main(args=argv, prog_name="python -m pipeline", standalone_mode=False)
    except (PipelineError, EdgeError) as exc:
        rank = f"[rank {os.environ.get('RANK')}] " if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else ""
        _echo_err(f"error: {rank}{one_line(exc)}")
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):  # Abort: click's form of a KeyboardInterrupt
        return _interrupted_exit()
    except click.ClickException as exc:  # bad usage: one line too, with the value cut to a readable length
        hint = f" (see `python -m pipeline {exc.ctx.info_name} --help`)" if getattr(exc, "ctx", None) else ""
        _echo_err(f"error: {clipped(one_line(exc.format_message()))}{hint}")
        return exc.exit_code
    except ImportError as exc:  # torch or another core package is missing or broken: say what to install
        message = missing_dependency(exc)
        if message is None:
            raise
        _echo_err(f"error: {message}")
        return 2
    except Exception as exc:
        if interrupted(exc):
            return _interrupted_exit()
        if no_space(exc):  # outside a stage (a sweep's records, the report): the stage runner says it itself
            _echo_err(f"error: a file could not be written: {clipped(one_line(exc))}; free space and rerun")
            return 2
        if not out_of_memory(exc):
            raise
        _echo_err(
            f"error: out of memory: {clipped(one_line(exc) or type(exc).__name__)}; lower data.batch_size or "
            "data.image_size, run fewer jobs beside it, or use a machine with more memory"
        )
        return 2
    return 0


def _interrupted_exit() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleanup is done; a second Ctrl-C must not cut the message
    _echo_err("interrupted; finished stages are kept, the running one left no artifact")
    return 130


def main() -> None:
    """The console entry point: exit 130 after cleaning up when interrupted, at any moment, never by the signal."""
    interrupts.catch()
    try:
        code = run_cli()
    except KeyboardInterrupt:  # between run_cli's handlers, e.g. a second Ctrl-C while the first is reported
        code = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run is over: exit with its status, not by a late signal
    sys.exit(code)
