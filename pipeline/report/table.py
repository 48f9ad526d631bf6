"""The paper-shaped comparison: methods x teacher->student pairs, mean ± std of test top-1 over seeds.

The main figure is the last-epoch test top-1 (what the train stage measured on the final weights);
the best epoch is shown only on request and labelled, since picking it looks at the test set. Beside
each mean: the difference to the vanilla student and to KD of the same pair, and the figure the
matching preset publishes. Per deployed model: parameters, FLOPs, ONNX latency per precision and the
INT8 drop, each averaged over the seeds of the cell.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.precision_order import PRECISION_ORDER
from pipeline.report.collect import RunData, read_runs

# Method name -> the row of a preset's `expected.top1` table that publishes it (others: the same name).
_PUBLISHED_ROW = {
    "vanilla": "student",
    "reviewkd": "review",
    "kdiffusion_multi": "multiple_layer_kdiffusion",
    "kdiffusion_single": "single_layer_kdiffusion",
    "kdiffusion_single_avg": "single_layer_average",
}
# export.int8_target -> how the INT8 latency column names it: a TensorRT-placed Q/DQ model runs unfused (slow) in
# ONNX Runtime on a CPU, so its latency there is not INT8 speed
INT8_TARGET_LABELS = {"tensorrt": "tensorrt Q/DQ"}


@dataclass
class Stat:
    """Mean and sample standard deviation (ddof 1) of one figure over seeds."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else (0.0 if self.values else None)

    def format(self, digits: int = 2) -> str:
        if not self.values:
            return "-"
        spread = f" ± {self.std:.{digits}f}" if self.n > 1 else ""
        return f"{self.mean:.{digits}f}{spread}"


@dataclass
class Entry:
    """One (row, pair) cell of the table."""

    row: str
    pair: tuple[str, str, str]
    top1: Stat
    best: Stat
    published: float | None = None
    delta_vanilla: float | None = None
    delta_kd: float | None = None
    runs: list[str] = field(default_factory=list)
    params: int | None = None
    flops: int | None = None
    latency_ms: dict[str, Stat] = field(default_factory=dict)
    int8_drop: Stat = field(default_factory=lambda: Stat([]))
    int8_target: str | None = None  # export.int8_target of the runs' INT8 models
    int8_cpu_ms: Stat = field(default_factory=lambda: Stat([]))  # a cpu-target INT8 model timed beside them


@dataclass
class Comparison:
    rows: list[str]
    pairs: list[tuple[str, str, str]]
    entries: dict[tuple[str, tuple[str, str, str]], Entry]
    sources: list[str]
    notes: list[str] = field(default_factory=list)

    def get(self, row: str, pair: tuple[str, str, str]) -> Entry | None:
        return self.entries.get((row, pair))

    @property
    def int8_latency_header(self) -> str:
        """The INT8 latency column's name, with the INT8 target(s) its models were made for."""
        targets = sorted({e.int8_target for e in self.entries.values() if e.int8_target})
        named = ", ".join(INT8_TARGET_LABELS.get(t, t) for t in targets)
        return f"ORT int8 ({named}) ms" if named else "ORT int8 ms"

    def to_dict(self) -> dict:
        out = []
        for e in self.entries.values():
            out.append(
                {
                    "method": e.row,
                    "dataset": e.pair[0],
                    "teacher": e.pair[1],
                    "student": e.pair[2],
                    "n": e.top1.n,
                    "top1_last_mean": e.top1.mean,
                    "top1_last_std": e.top1.std,
                    "top1_last_values": e.top1.values,
                    "top1_best_mean": e.best.mean,
                    "top1_best_std": e.best.std,
                    "delta_vs_vanilla": e.delta_vanilla,
                    "delta_vs_kd": e.delta_kd,
                    "published": e.published,
                    "parameters": e.params,
                    "flops": e.flops,
                    "latency_ms": {p: s.mean for p, s in e.latency_ms.items()},
                    "int8_drop_pt": e.int8_drop.mean,
                    "int8_target": e.int8_target,
                    "latency_int8_cpu_ms": e.int8_cpu_ms.mean,
                    "runs": e.runs,
                }
            )
        return {"sources": self.sources, "metric": METRIC, "entries": out, "notes": self.notes}


METRIC = "test top-1 % of the final epoch, mean ± sample std over seeds"


def row_name(run: RunData) -> str:
    axes = ", ".join(f"{k}={v}" for k, v in sorted(run.axes.items()))
    return f"{run.method} [{axes}]" if axes else str(run.method)


@functools.lru_cache(maxsize=1)
def _preset_tables() -> dict[tuple[str, str, str], tuple[dict, str | None]]:
    """(dataset, teacher, student) -> (expected top-1 table, the row the kdiffusion method reproduces)."""
    from pipeline.config import list_presets, load_config

    tables = {}
    for name in list_presets():
        cfg = load_config(name)
        table = cfg.expected.get("top1")
        if isinstance(table, dict):
            tables.setdefault(
                (cfg.data.dataset, cfg.teacher.arch, cfg.student.arch), (table, cfg.expected.get("method"))
            )
    return tables


def published(pair: tuple[str, str, str], method: str) -> float | None:
    table, kdiffusion_row = _preset_tables().get(pair, ({}, None))
    key = kdiffusion_row if method == "kdiffusion" else _PUBLISHED_ROW.get(method, method)
    value = table.get(key) if key else None
    return float(value) if isinstance(value, int | float) else None


def _best_top1(run: RunData) -> float | None:
    values = [e["test_top1"] for e in run.history("train") if isinstance(e.get("test_top1"), int | float)]
    return max(values) if values else None


# Settings of the train stage that may differ within a row: the seed varies by design; a dataset's folder is
# where one machine keeps it, and whether its checksums were verified does not change it.
_POOLED = ("seed", "data.root", "data.verify_checksums")
_STUDENT_KEYS = ("arch", "method", "method_args", "optim")  # the train stage's params that are `student.*` settings


def _settings(run: RunData) -> dict[str, str]:
    """The train stage's settings as config keys (``student.optim.epochs``) and shown values."""
    from pipeline.config import leaf_items

    params = run.manifests["train"].params
    flat = leaf_items({f"student.{k}" if k in _STUDENT_KEYS else k: v for k, v in params.items()})
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in flat.items() if k not in _POOLED}


def _split_mixed_settings(groups: dict[tuple[str, tuple], list[RunData]]) -> dict[tuple[str, tuple], list[RunData]]:
    """Split a row whose runs were trained with other settings (two sweeps of other recipes, two machines that
    chose other precisions), labelled as a sweep's axes are: a mean over seeds never pools two recipes."""
    out: dict[tuple[str, tuple], list[RunData]] = {}
    for (row, pair), members in groups.items():
        settings = [_settings(r) for r in members]
        keys = sorted({k for s in settings for k in s})
        differing = [k for k in keys if len({s.get(k) for s in settings}) > 1]
        for run, values in zip(members, settings):
            label = ", ".join(f"{k}={values.get(k, '(absent)')}" for k in differing)
            name = row if not label else f"{row[:-1]}, {label}]" if row.endswith("]") else f"{row} [{label}]"
            out.setdefault((name, pair), []).append(run)
    return out


def _reference(row: str, ref: str) -> tuple[str, str]:
    """The rows a row is compared with: ``ref`` with the same settings label, then plain ``ref``."""
    return (ref + row[row.index(" [") :], ref) if " [" in row else (ref, ref)


def build_comparison(paths: list[str | Path]) -> Comparison:
    notes: list[str] = []
    runs, _ = read_runs(paths, notes)
    groups: dict[tuple[str, tuple], list[RunData]] = {}
    teachers: dict[tuple, dict[str, float]] = {}  # pair -> teacher sha -> top-1 (one figure per distinct teacher)
    for run in runs:
        pair = run.pair
        if pair is None or run.metric("train", "test_top1") is None:
            continue
        groups.setdefault((row_name(run), pair), []).append(run)
        top1 = run.metric("teacher", "test_top1")
        if top1 is not None:
            teachers.setdefault(pair, {})[run.teacher_sha256 or run.name] = float(top1)
    groups = _split_mixed_settings(groups)
    pairs = list(dict.fromkeys(pair for _, pair in groups))
    methods = list(dict.fromkeys(row for row, _ in groups))
    first = {"vanilla": 0, "kd": 1}  # then every other row in the order met; a label keeps a row with its method
    rows = ["teacher", *sorted(methods, key=lambda r: first.get(r.split(" [")[0], 2))]
    entries: dict = {}
    for pair, by_sha in teachers.items():
        entries[("teacher", pair)] = Entry(
            "teacher", pair, Stat(list(by_sha.values())), Stat([]), published(pair, "teacher")
        )
    for (row, pair), members in groups.items():
        entry = Entry(
            row,
            pair,
            Stat([float(r.metric("train", "test_top1")) for r in members]),
            Stat([b for b in map(_best_top1, members) if b is not None]),
            published(pair, members[0].method or ""),
            runs=[str(r.root) for r in members],
        )
        entry.params = members[0].metric("fuse", "parameters")
        entry.flops = members[0].metric("fuse", "flops")
        for precision in PRECISION_ORDER:
            values = [r.stage_report("export").get("latency", {}).get(precision, {}).get("median_ms") for r in members]
            values = [float(v) for v in values if isinstance(v, int | float)]
            if values:
                entry.latency_ms[precision] = Stat(values)
        cpu = [r.stage_report("export").get("int8_cpu_latency", {}).get("median_ms") for r in members]
        entry.int8_cpu_ms = Stat([float(v) for v in cpu if isinstance(v, int | float)])
        targets = {m.params.get("int8_target") for r in members if (m := r.manifests.get("export"))}
        entry.int8_target = ", ".join(sorted(t for t in targets if t)) or None
        entry.int8_drop = Stat(
            [float(v) for r in members if (v := r.metric("export", "int8_top1_drop_pt")) is not None]
        )
        entries[(row, pair)] = entry
    for (row, pair), entry in entries.items():
        if row == "teacher":
            continue
        for ref, attr in (("vanilla", "delta_vanilla"), ("kd", "delta_kd")):
            same, plain = _reference(row, ref)
            name = same if (same, pair) in entries else plain
            other = entries.get((name, pair))
            if other and row.split(" [")[0] != ref and other.top1.mean is not None:
                setattr(entry, attr, entry.top1.mean - other.top1.mean)
    if any(e.top1.n and not e.best.n for (r, _), e in entries.items() if r != "teacher"):
        notes.append("best epoch: not shown where history.json has no per-epoch test top-1")
    return Comparison(rows, pairs, entries, [str(p) for p in paths], notes)


def _pair_label(pair: tuple[str, str, str], pairs: list) -> str:
    label = f"{pair[1]} -> {pair[2]}"
    return f"{label} ({pair[0]})" if len({p[0] for p in pairs}) > 1 or pair[0] != "synthetic" else label


def _delta(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def accuracy_rows(c: Comparison, best: bool) -> list[list[str]]:
    header = ["method"]
    for pair in c.pairs:
        label = _pair_label(pair, c.pairs)
        header += [f"{label}: top-1 (last)", "n", "Δ vanilla", "Δ KD", "published"]
        if best:
            header.append("top-1 (best epoch)")
    rows = [header]
    for row in c.rows:
        line = [row]
        for pair in c.pairs:
            e = c.get(row, pair)
            if e is None:
                line += ["-"] * (6 if best else 5)
                continue
            published_value = "-" if e.published is None else f"{e.published:.2f}"
            line += [e.top1.format(), str(e.top1.n), _delta(e.delta_vanilla), _delta(e.delta_kd), published_value]
            if best:
                line.append(e.best.format() + " (best)" if e.best.n else "-")
        rows.append(line)
    return rows


INT8_CPU_HEADER = "ORT int8 (cpu target) ms"
INT8_CPU_NOTE = (
    f"{INT8_CPU_HEADER}: where a TensorRT-target export ran without a GPU, a cpu-target INT8 model (uint8 "
    "activations, fused by ONNX Runtime) timed on the same CPU for its speed; not exported"
)


def has_cpu_int8(c: Comparison) -> bool:
    return any(e.int8_cpu_ms.n for e in c.entries.values())


def deployment_rows(c: Comparison) -> list[list[str]]:
    latency_header = [c.int8_latency_header if p == "int8" else f"ORT {p} ms" for p in PRECISION_ORDER]
    cpu_int8 = has_cpu_int8(c)
    latency_header += [INT8_CPU_HEADER] * cpu_int8
    header = ["pair", "method", "parameters", "FLOPs", *latency_header, "INT8 drop (pt)"]
    rows = [header]
    for pair in c.pairs:
        for row in c.rows:
            e = c.get(row, pair)
            if e is None or row == "teacher":
                continue
            latency = [e.latency_ms[p].format(3) if p in e.latency_ms else "-" for p in PRECISION_ORDER]
            latency += [e.int8_cpu_ms.format(3)] * cpu_int8
            params = f"{e.params:,}" if isinstance(e.params, int) else "-"
            flops = f"{e.flops / 1e6:.1f}M" if isinstance(e.flops, int | float) else "-"
            rows.append([_pair_label(pair, c.pairs), row, params, flops, *latency, e.int8_drop.format()])
    return rows


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _csv(c: Comparison) -> str:
    buffer = io.StringIO()
    entries = c.to_dict()["entries"]
    fields = [k for k in entries[0] if k not in ("latency_ms", "runs", "top1_last_values")] if entries else []
    writer = csv.writer(buffer)
    writer.writerow([*fields, *(f"latency_{p}_ms" for p in PRECISION_ORDER)])
    for e in entries:
        writer.writerow([*(e[k] for k in fields), *(e["latency_ms"].get(p) for p in PRECISION_ORDER)])
    return buffer.getvalue()


def render(c: Comparison, fmt: str, best: bool = False) -> str:
    """The comparison as ``table`` (terminal), ``markdown``, ``csv`` or ``json``."""
    if fmt == "json":
        return json.dumps(c.to_dict(), indent=2)
    if fmt == "csv":
        return _csv(c)
    if not c.entries:
        return "no finished runs with a trained student under " + ", ".join(c.sources)
    table = _markdown if fmt == "markdown" else _aligned
    footer = [f"top-1: {METRIC}; Δ: difference of means in points; published: the matching preset's figure"]
    if best:
        footer.append("best epoch: highest per-epoch test top-1 (selected on the test set; for reference only)")
    footer += c.notes + [INT8_CPU_NOTE] * has_cpu_int8(c)
    parts = [table(accuracy_rows(c, best)), table(deployment_rows(c)), "\n".join(footer)]
    return "\n\n".join(parts) + "\n"


__all__ = ["Comparison", "Entry", "Stat", "asdict", "build_comparison", "published", "render"]
