"""The report's figures, drawn with matplotlib (Agg, no display) and returned as PNG bytes.

Each function takes plain data read from a run's files and returns ``None`` when there is nothing to
draw, so the page shows a sentence instead of an empty axis.
"""

from __future__ import annotations

import io
import itertools

from pipeline.errors import ConfigError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError(f"the report needs matplotlib, not importable here ({exc}); pip install matplotlib") from None
    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def training_curves(history: list[dict], title: str) -> bytes | None:
    """Loss terms per epoch (left) and top-1 per epoch on each split (right)."""
    if not history:
        return None
    plt = _pyplot()
    epochs = [e.get("epoch", i + 1) for i, e in enumerate(history)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))

    def curve(ax, key: str, label: str, **style) -> None:
        """Only the epochs that scored ``key`` (``training.val_every`` skips some), joined by one line."""
        points = [(x, e[key]) for x, e in zip(epochs, history) if isinstance(e.get(key), int | float)]
        if points:
            ax.plot(*zip(*points), label=label, **style)

    for key in sorted({k for e in history for k in e if k.startswith("loss/")}):
        curve(left, key, key[len("loss/") :], marker="o", markersize=3)
    curve(left, "val_loss", "val cross-entropy", linestyle="--")
    left.set(xlabel="epoch", ylabel="loss", title=f"{title}: loss terms")
    for key, label in (("train_top1", "train"), ("val_top1", "val (held out)"), ("test_top1", "test")):
        curve(right, key, label, marker="o", markersize=3)
    right.set(xlabel="epoch", ylabel="top-1 %", title=f"{title}: accuracy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _png(fig)


def diff_histogram(histogram: dict, title: str) -> bytes | None:
    """Counts of |difference| per log-spaced bin, exact zeros noted in the title."""
    edges, counts = histogram.get("edges") or [], histogram.get("counts") or []
    if not edges or len(edges) != len(counts) + 1:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3))
    widths = [b - a for a, b in itertools.pairwise(edges)]
    ax.bar(edges[:-1], counts, width=widths, align="edge", edgecolor="black", linewidth=0.4)
    ax.set_xscale("log")
    ax.set(
        xlabel="|fused - trained| per logit", ylabel="logits", title=f"{title} ({histogram.get('zeros', 0)} exactly 0)"
    )
    ax.grid(alpha=0.3)
    return _png(fig)


def latency_bars(latency: dict[str, dict], title: str) -> bytes | None:
    """Median latency per precision (in the order given), with the 90th percentile as a whisker."""
    names = [p for p, v in latency.items() if isinstance(v.get("median_ms"), int | float)]
    if not names:
        return None
    plt = _pyplot()
    medians = [latency[p]["median_ms"] for p in names]
    upper = [max(0.0, latency[p].get("p90_ms", m) - m) for p, m in zip(names, medians)]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 1.5, 2.8))
    colours = ["#4c72b0", "#dd8452", "#55a868", "#8172b3"]
    ax.bar(names, medians, yerr=[[0] * len(names), upper], capsize=4, color=colours[: len(names)])
    ax.tick_params(axis="x", labelsize=7)
    ax.set(ylabel="ms per image (median, p90 whisker)", title=title)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def calibration_ranges(ranges: dict[str, tuple[float, float]], title: str, limit: int = 60) -> bytes | None:
    """Each calibrated tensor's [low, high] as a horizontal bar (the widest ``limit`` tensors)."""
    if not ranges:
        return None
    plt = _pyplot()
    items = sorted(ranges.items(), key=lambda kv: kv[1][1] - kv[1][0], reverse=True)[:limit]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.16 * len(items) + 1)))
    for i, (_, (low, high)) in enumerate(items):
        ax.plot([low, high], [i, i], linewidth=3, color="#4c72b0")
    ax.set_yticks(range(len(items)), [name for name, _ in items], fontsize=6)
    ax.invert_yaxis()
    ax.axvline(0, color="gray", linewidth=0.6)
    ax.set(xlabel="calibrated range", title=title)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def accuracy_vs_latency(points: list[tuple[str, float, float]], title: str) -> bytes | None:
    """One point per run: (method, latency ms, top-1 %), a colour per method."""
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in dict.fromkeys(p[0] for p in points):
        xs = [p[1] for p in points if p[0] == method]
        ys = [p[2] for p in points if p[0] == method]
        ax.scatter(xs, ys, label=method, s=36, alpha=0.8)
    ax.set(xlabel="ONNX fp32 latency, ms per image (ORT CPU, batch 1)", ylabel="test top-1 % (last epoch)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def accuracy_curves(series: dict[str, list[tuple[int, float]]], title: str) -> bytes | None:
    """Held-out top-1 per epoch, one line per run (a sweep's cells side by side)."""
    if not any(series.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, points in series.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=2, label=name)
    ax.set(xlabel="epoch", ylabel="top-1 %", title=title)
    ax.grid(alpha=0.3)
    if len(series) <= 12:
        ax.legend(fontsize=7)
    return _png(fig)
