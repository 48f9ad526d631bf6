"""Output comparison statistics (Polygraphy semantics), on NumPy arrays so every backend can use them.

An element fails only when it exceeds both the absolute and the relative tolerance; reports carry
the max / mean / median / quantile differences so a failure shows the tolerance it would have needed.
"""

from __future__ import annotations

import numpy as np


def as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def diff_stats(reference, candidate) -> dict[str, float]:
    """Element-wise and row-wise statistics of ``candidate`` against ``reference`` (both N x C)."""
    ref, out = as_numpy(reference), as_numpy(candidate)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs candidate {out.shape}")
    abs_diff = np.abs(out - ref)
    rel_diff = abs_diff / np.maximum(np.abs(ref), 1e-12)
    ref2, out2 = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    cos = (ref2 * out2).sum(1) / np.maximum(np.linalg.norm(ref2, axis=1) * np.linalg.norm(out2, axis=1), 1e-30)
    return {
        "max_abs": float(abs_diff.max(initial=0.0)),
        "mean_abs": float(abs_diff.mean()) if abs_diff.size else 0.0,
        "median_abs": float(np.median(abs_diff)) if abs_diff.size else 0.0,
        "p99_abs": float(np.quantile(abs_diff, 0.99)) if abs_diff.size else 0.0,
        "max_rel": float(rel_diff.max(initial=0.0)),
        "rel_fro": float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)),
        "min_cosine": float(cos.min(initial=1.0)),
        "top1_agreement": float((ref2.argmax(1) == out2.argmax(1)).mean()) if len(ref2) else 1.0,
    }


def allclose_fraction(reference, candidate, atol: float, rtol: float) -> float:
    """Fraction of elements that fail both tolerances (Polygraphy's element rule); 0.0 means all pass."""
    ref, out = as_numpy(reference), as_numpy(candidate)
    bad = np.abs(out - ref) > (atol + rtol * np.abs(ref))
    return float(bad.mean()) if bad.size else 0.0


def top1_accuracy(logits, labels) -> float:
    logits, labels = as_numpy(logits), np.asarray(labels)
    return 100.0 * float((logits.argmax(1) == labels).mean()) if len(labels) else 0.0


def abs_diff_histogram(reference, candidate, bins: int = 24) -> dict:
    """Counts of |candidate - reference| in log-spaced bins (exact zeros apart): small enough for a report."""
    diff = np.abs(as_numpy(candidate) - as_numpy(reference)).ravel()
    nonzero = diff[diff > 0]
    low = int(np.floor(np.log10(nonzero.min()))) if nonzero.size else -8
    high = max(int(np.ceil(np.log10(nonzero.max()))) if nonzero.size else -7, low + 1)
    edges = np.logspace(low, high, bins + 1)
    counts, _ = np.histogram(nonzero, edges)
    return {"zeros": int(diff.size - nonzero.size), "edges": edges.tolist(), "counts": counts.tolist()}
