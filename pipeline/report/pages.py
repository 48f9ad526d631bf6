"""What the report shows, section by section, for a run and for a sweep."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.experiments.grid import read_sweep
from pipeline.experiments.state import RECORD
from pipeline.precision_order import PRECISION_ORDER, REFERENCE_PRECISION
from pipeline.report import plots
from pipeline.report.collect import RunData, read_runs
from pipeline.report.html import esc, figure, none, page, status_badge, table
from pipeline.report.table import (
    INT8_CPU_NOTE,
    accuracy_rows,
    build_comparison,
    deployment_rows,
    has_cpu_int8,
    row_name,
)
from pipeline.stage_files import CALIBRATION_RANGES, HISTORY


def stage_table(run: RunData) -> str:
    rows = []
    for name, m in run.manifests.items():
        passed = f"{sum(map(bool, m.checks))}/{len(m.checks)}" if m.checks else "-"
        seconds = m.meta.get("duration_s")
        rows.append(
            [
                name,
                status_badge(m.status),
                m.reason or "",
                passed,
                seconds,
                m.meta.get("run_reason", ""),
                m.fingerprint[:12],
            ]
        )
    header = ["stage", "status", "reason", "checks passed", "time (s)", "last run because", "fingerprint"]
    return table("stages", header, rows, raw={1})


def check_table(run: RunData) -> str:
    rows = []
    for name, m in run.manifests.items():
        for c in m.checks:
            rows.append(
                [
                    name,
                    c.name,
                    c.metric,
                    c.value,
                    f"{c.op} {c.threshold:g}",
                    status_badge("ok" if c else "failed"),
                    c.detail,
                ]
            )
    if not rows:
        return none("No stage of this run records checks.")
    return table("checks", ["stage", "check", "metric", "value", "threshold", "verdict", "detail"], rows, raw={5})


def metrics_table(run: RunData) -> str:
    rows = [[name, key, value] for name, m in run.manifests.items() for key, value in m.metrics.items()]
    return table("metrics", ["stage", "figure", "value"], rows) if rows else none("No figures recorded.")


def training_section(run: RunData) -> str:
    parts = []
    for stage in ("teacher", "train"):
        history = run.history(stage)
        if history:
            method = f" ({run.method})" if stage == "train" else ""
            parts.append(
                figure(
                    f"curves-{stage}",
                    plots.training_curves(history, f"{stage}{method}"),
                    f"{stage}{method}: loss terms and top-1 per epoch, from {stage}/{HISTORY}",
                    "",
                )
            )
    return "".join(parts) or none("No training history: the teacher was imported and no student was trained here.")


def verify_section(run: RunData) -> str:
    report = run.stage_report("verify")
    if not report:
        return none("The verify stage has not run.")
    stats = report.get("stats", {})
    rows = [[k, v] for k, v in stats.items()] + [
        ["top1 trained", report.get("top1_trained")],
        ["top1 fused", report.get("top1_fused")],
        ["samples", report.get("samples")],
    ]
    hist = report.get("abs_diff_histogram") or {}
    return table("verify", ["fused vs trained (fp32)", "value"], rows) + figure(
        "verify-histogram",
        plots.diff_histogram(hist, "verify: fused vs trained logits"),
        f"distribution of |fused - trained| over {report.get('samples')} verification images",
        "This verify report predates the stored difference histogram; rerun verify to see it.",
    )


def parity_rows(report: dict) -> list[list[object]]:
    rows = []
    fp32 = report.get("parity", {}).get(REFERENCE_PRECISION)
    if fp32:
        rows.append(
            [
                REFERENCE_PRECISION,
                "PyTorch fused",
                report["parity"].get("samples"),
                fp32.get("min_cosine"),
                fp32.get("max_abs"),
                fp32.get("top1_agreement"),
            ]
        )
    gates = report.get("gates", {})
    for precision, stats in (("fp16", gates.get("fp16")), ("int8", gates.get("int8", {}).get("vs_fp32"))):
        if stats:
            rows.append(
                [
                    precision,
                    "ONNX fp32",
                    gates.get("eval_samples"),
                    stats.get("min_cosine"),
                    stats.get("max_abs"),
                    stats.get("top1_agreement"),
                ]
            )
    return rows


def calibration_ranges(run: RunData) -> dict[str, tuple[float, float]]:
    data = run.stage_report("export", CALIBRATION_RANGES).get("ranges", {}).get("data", {})

    def number(v):
        return float(v["data"]) if isinstance(v, dict) else float(v)

    ranges = {}
    for name, entry in data.items():
        try:
            ranges[name] = (number(entry["lowest"]), number(entry["highest"]))
        except (KeyError, TypeError, ValueError):
            continue
    return ranges


def latency_by_label(report: dict) -> dict[str, dict]:
    """The export report's latencies by row label, in precision order (its file sorts them by name): the INT8
    row names its target, and a cpu-target INT8 model timed beside a TensorRT one is a row of its own."""
    target = report.get("int8", {}).get("target")
    latency = report.get("latency") or {}
    ordered = [p for p in PRECISION_ORDER if p in latency] + [p for p in latency if p not in PRECISION_ORDER]
    rows = {f"int8 ({target} target)" if p == "int8" and target else p: latency[p] for p in ordered}
    if "median_ms" in report.get("int8_cpu_latency", {}):  # absent, or an error where it could not be made
        rows["int8 (cpu target, timed only)"] = report["int8_cpu_latency"]
    return rows


def export_section(run: RunData) -> str:
    report = run.stage_report("export")
    if not report:
        return none("The export stage has not run.")
    parts = ["<h3>Parity per precision</h3>"]
    rows = parity_rows(report)
    header = ["precision", "against", "samples", "min cosine", "max |diff|", "top-1 agreement"]
    parts.append(table("parity", header, rows) if rows else none("No parity figures in the export report."))
    parts.append("<h3>Latency (ONNX Runtime, CPU, batch 1)</h3>")
    latency = latency_by_label(report)
    if latency:
        lrows = [[p, v.get("median_ms"), v.get("p90_ms"), v.get("runs"), v.get("provider")] for p, v in latency.items()]
        parts.append(table("latency", ["precision", "median ms", "p90 ms", "runs", "provider"], lrows))
        if "int8 (cpu target, timed only)" in latency:
            parts.append(f"<p class='meta'>{esc(INT8_CPU_NOTE)}.</p>")
        parts.append(
            figure(
                "latency",
                plots.latency_bars(latency, "ONNX latency per precision"),
                "median latency per image on the machine that exported (a comparison, not a benchmark)",
                "",
            )
        )
    else:
        parts.append(none("This export report has no latency figures; rerun export to measure them."))
    parts.append("<h3>INT8 calibration ranges</h3>")
    ranges = calibration_ranges(run)
    if ranges:
        int8 = report.get("int8", {})
        parts.append(
            f"<p>{len(ranges)} tensors calibrated ({esc(int8.get('target', '?'))} target, "
            f"{esc(report.get('calibration', {}).get('samples', '?'))} training images).</p>"
        )
        parts.append(
            figure(
                "calibration",
                plots.calibration_ranges(ranges, "INT8 calibration ranges (widest first)"),
                "per tensor [lowest, highest] as calibrated",
                "",
            )
        )
        rows = [[name, low, high] for name, (low, high) in sorted(ranges.items())]
        parts.append(
            "<details><summary>every tensor</summary>"
            + table("calibration", ["tensor", "lowest", "highest"], rows)
            + "</details>"
        )
    else:
        parts.append(none("No INT8 model in this run."))
    return "".join(parts)


def environment_table(run: RunData) -> str:
    env = next((m.environment for m in reversed(list(run.manifests.values())) if m.environment), {})
    rows = [[k, v] for k, v in env.items()]
    return table("environment", ["", "value"], rows) if rows else none("No environment recorded.")


def run_page(root: Path) -> str:
    run = RunData.read(root)
    code = next((m.code_version for m in run.manifests.values()), "?")
    sections = [
        ("Stages", stage_table(run)),
        ("Checks", check_table(run)),
        ("Key figures", metrics_table(run)),
        ("Training curves", training_section(run)),
        ("Verify: fused vs trained", verify_section(run)),
        ("Export", export_section(run)),
        ("Environment", environment_table(run)),
    ]
    return page(f"Run {root.resolve().name}", f"{root.resolve()} · code {code}", sections)


def cell_status(run_root: Path, run: RunData | None) -> str:
    if run is None:
        return "not run"
    if any(m.status == "failed" for m in run.manifests.values()):
        return "failed"
    return "finished" if (run_root / RECORD).is_file() else "incomplete"


def sweep_page(root: Path) -> str:
    sweep = read_sweep(root)
    runs, _ = read_runs([root])
    by_folder = {r.root.resolve(): r for r in runs}
    rows = []
    for cell in sweep.cells:
        folder = cell.folder(root)
        run = by_folder.get(folder.resolve())
        checks = [c for m in run.manifests.values() for c in m.checks] if run else []
        failed = ", ".join(c.name for c in checks if not c)
        status = cell_status(folder, run)
        rows.append(
            [
                cell.name,
                status_badge("ok" if status == "finished" else status),
                cell.labels.get("method"),
                cell.labels.get("seed"),
                run.metric("train", "test_top1") if run else None,
                f"{sum(map(bool, checks))}/{len(checks)}" if checks else "-",
                failed,
            ]
        )
    cells = table(
        "cells", ["cell", "status", "method", "seed", "test top-1 (last)", "checks", "failed checks"], rows, raw={1}
    )
    series = {
        r.name: [(e.get("epoch", i + 1), e["val_top1"]) for i, e in enumerate(r.history("train")) if "val_top1" in e]
        for r in runs
    }
    sections = [
        ("Cells", cells),
        ("Comparison", comparison_section([root], "No cell has finished training yet.")),
        ("Accuracy vs latency", latency_figure(runs, "one point per cell", "No cell has exported a model yet.")),
        (
            "Training",
            figure(
                "curves-cells",
                plots.accuracy_curves(series, "held-out top-1 per epoch, every cell"),
                "held-out (val) top-1 per epoch of each cell's student",
                "No cell has trained yet.",
            ),
        ),
        (
            "Grid",
            f"<details><summary>sweep.json: every cell's command</summary><pre>"
            f"{esc(json.dumps(sweep.to_dict(), indent=1))}</pre></details>",
        ),
    ]
    return page(f"Sweep {root.resolve().name}", f"{root.resolve()} · {len(sweep.cells)} cells", sections)


def comparison_section(paths: list[Path], missing: str) -> str:
    comparison = build_comparison(paths)
    if not comparison.entries:
        return none(missing)
    acc, dep = accuracy_rows(comparison, best=True), deployment_rows(comparison)
    return (
        table("comparison", acc[0], acc[1:])
        + table("deployment", dep[0], dep[1:])
        + "<p class='meta'>top-1: last-epoch test top-1 %, mean ± sample std over seeds; best epoch "
        "selected on the test set, for reference only.</p>"
        + (f"<p class='meta'>{esc(INT8_CPU_NOTE)}.</p>" if has_cpu_int8(comparison) else "")
    )


def latency_figure(runs: list[RunData], each: str, missing: str) -> str:
    points = []
    for run in runs:
        latency = run.stage_report("export").get("latency", {}).get(REFERENCE_PRECISION, {}).get("median_ms")
        top1 = run.metric("train", "test_top1")
        if latency is not None and top1 is not None:
            points.append((row_name(run), float(latency), float(top1)))
    caption = f"{each}: last-epoch test top-1 against ONNX fp32 latency"
    return figure("scatter", plots.accuracy_vs_latency(points, "accuracy vs latency"), caption, missing)


def folders_page(paths: list[Path]) -> str:
    """Several run or sweep folders on one page, as ``compare A B`` puts them in one table."""
    runs, sweeps = read_runs(paths)
    rows = [
        [
            str(r.root),
            r.method,
            r.metric("train", "test_top1"),
            ", ".join(f"{s}: {m.status}" for s, m in r.manifests.items()),
        ]
        for r in runs
    ]
    sections = [
        ("Runs", table("runs", ["run", "method", "test top-1 (last)", "stages"], rows)),
        ("Comparison", comparison_section(paths, "No run has finished training yet.")),
        ("Accuracy vs latency", latency_figure(runs, "one point per run", "No run has exported a model yet.")),
    ]
    subtitle = f"{len(paths)} folders ({len(sweeps)} sweeps) · {len(runs)} runs"
    return page("Runs " + ", ".join(p.resolve().name for p in paths), subtitle, sections)
