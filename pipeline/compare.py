"""Output comparison statistics (Polygraphy semantics), on NumPy arrays so every backend can use them.

An element fails only when it exceeds both the absolute and the relative tolerance, and top-1 agreement
does not count flips between classes tied at the comparison's own error level (:func:`diff_stats`);
reports carry the max / mean / median / quantile differences so a failure shows the tolerance it would
have needed.
"""

from __future__ import annotations

import numpy as np


def as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _abs_error(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``|out - ref|`` per element, 0 where they are equal (so equal infinities agree) and ``inf`` where the
    difference is not finite (NaN or inf in either where they differ), so a non-finite element never passes."""
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(out - ref)
    err = np.where(ref == out, 0.0, err)
    return np.where(np.isfinite(err), err, np.inf)


def _top1_figures(ref2: np.ndarray, out2: np.ndarray) -> dict[str, float]:
    """The top-1 figures of :func:`diff_stats` on N x K rows (its docstring has the rule)."""
    if not ref2.size:
        return {"top1_agreement": 1.0, "top1_agreement_strict": 1.0, "top1_ties_excused": 0, "tie_tolerance": 0.0}
    per_sample = _abs_error(ref2, out2).max(1)  # inf where a sample has a NaN/inf difference
    finite = np.isfinite(per_sample)
    with np.errstate(invalid="ignore"):
        tau = 2.0 * float(np.quantile(per_sample, 0.9))
    if not np.isfinite(tau):
        tau = float("inf")  # infs reach the 90th percentile: the error level is unmeasurable, nothing is a tie
    top_ref, top_out = ref2.argmax(1), out2.argmax(1)
    same = (top_ref == top_out) & finite
    with np.errstate(invalid="ignore"):
        gap = np.take_along_axis(ref2, top_ref[:, None], 1) - np.take_along_axis(ref2, top_out[:, None], 1)
        gap = gap[:, 0]
        tie = ~same & finite & bool(np.isfinite(tau)) & (gap <= tau)
    return {
        "top1_agreement": float((same | tie).mean()),
        "top1_agreement_strict": float(same.mean()),
        "top1_ties_excused": int(tie.sum()),
        "tie_tolerance": tau,
    }


def diff_stats(reference, candidate) -> dict[str, float]:
    """Element-wise and row-wise statistics of ``candidate`` against ``reference`` (both N x C).

    ``top1_agreement`` is tie-aware, so a gate on it judges the model, not near-ties. Per sample s,
    ``e_s = max_j |cand_sj - ref_sj|``; the set's error level is ``tau = 2 * p90(e_s)`` (2x: an error e can
    lower the top class by e and raise another by e). A sample whose argmax differs is a disagreement
    unless the reference's gap between its own top-1 class and the candidate's top-1 class is ``<= tau``:
    a tie at this comparison's error level. The level is set-wide because the per-sample ``e_s`` would
    excuse every flip (a flip's gap is always ``<= 2 * e_s``); with it, damage concentrated in a few samples
    still counts, and damage everywhere, which raises tau, is what the parity / cosine gates catch.
    Non-finite errors excuse nothing: a sample with NaN/inf where the two differ is a disagreement (in the
    strict figure too), and a non-finite tau excuses no flip. With one sample, tau is that sample's own
    error level, so a flip there is always excused and the cosine / parity gates decide.

    Also ``top1_agreement_strict`` (argmax equality), ``top1_ties_excused`` (flips excused as ties) and
    ``tie_tolerance`` (tau). ``min_cosine`` is NaN when a sample has a NaN/inf, which fails a gate on it.
    """
    ref, out = as_numpy(reference), as_numpy(candidate)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs candidate {out.shape}")
    rows = (ref.shape[0], int(np.prod(ref.shape[1:]))) if ref.ndim else (1, 1)  # N x K, also for N = 0
    ref2, out2 = ref.reshape(rows), out.reshape(rows)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # NaN/inf inputs give NaN/inf figures
        abs_diff = np.abs(out - ref)
        rel_diff = abs_diff / np.maximum(np.abs(ref), 1e-12)
        cos = (ref2 * out2).sum(1) / np.maximum(np.linalg.norm(ref2, axis=1) * np.linalg.norm(out2, axis=1), 1e-30)
        cos = np.where((ref2 == out2).all(1), 1.0, cos)  # identical rows, zero ones included (a zero-init head)
        cos = np.where(np.isfinite(ref2).all(1) & np.isfinite(out2).all(1), cos, np.nan)
        return {
            "max_abs": float(abs_diff.max(initial=0.0)),
            "mean_abs": float(abs_diff.mean()) if abs_diff.size else 0.0,
            "median_abs": float(np.median(abs_diff)) if abs_diff.size else 0.0,
            "p99_abs": float(np.quantile(abs_diff, 0.99)) if abs_diff.size else 0.0,
            "max_rel": float(rel_diff.max(initial=0.0)),
            "rel_fro": float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)),
            "min_cosine": float(cos.min(initial=1.0)),
            **_top1_figures(ref2, out2),
        }


def magnitude(reference) -> float:
    """max |reference| over its finite elements (0 if none): the scale of a gate that grows with the output."""
    ref = np.abs(as_numpy(reference))
    finite = ref[np.isfinite(ref)]
    return float(finite.max(initial=0.0))


TIE_FIGURES = ("top1_agreement_strict", "top1_ties_excused", "tie_tolerance")  # diff_stats' tie-aware rule


def tie_detail(stats: dict) -> str:
    """How a tie-aware top-1 agreement was reached, for a check's detail: the strict figure and the ties."""
    if "top1_agreement_strict" not in stats:
        return ""
    return (
        f"(tie-aware; strict argmax agreement {stats['top1_agreement_strict']:.6g}, "
        f"{stats['top1_ties_excused']} flip(s) excused as ties within {stats['tie_tolerance']:.3g})"
    )


def tie_figures(stats: dict, prefix: str) -> dict:
    """The tie-aware agreement and the figures behind it, named for a manifest's metrics."""
    return {f"{prefix}_{key}": stats[key] for key in ("top1_agreement", *TIE_FIGURES) if key in stats}


def allclose_fraction(reference, candidate, atol: float, rtol: float) -> float:
    """Fraction of elements that fail Polygraphy's element rule; 0.0 means all pass.

    An element fails only when it is beyond both tolerances, ``|diff| > atol and |diff| > rtol * |ref|``,
    so large logits are judged relatively and small ones absolutely. A NaN/inf where the two differ fails.
    """
    ref, out = as_numpy(reference), as_numpy(candidate)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs candidate {out.shape}")
    err = _abs_error(ref, out)
    bad = (err > atol) & (err > rtol * np.abs(ref))
    bad |= np.isinf(err)  # inf error: also when the reference itself is inf (inf > rtol * inf is False)
    return float(bad.mean()) if bad.size else 0.0


def top1_accuracy(logits, labels) -> float:
    logits, labels = as_numpy(logits), np.asarray(labels)
    return 100.0 * float((logits.argmax(1) == labels).mean()) if len(labels) else 0.0


CHANCE_MARGIN_PT = 5.0  # a top-1 less than this many points above chance is "near chance"


def near_chance(top1: float, num_classes: int, margin_pt: float = CHANCE_MARGIN_PT) -> str:
    """Why ``top1`` (%) says the model learned nothing (within ``margin_pt`` points of chance, 100 / classes),
    or '' when it is clear of chance. A top-1 difference between two such models is noise, not a verdict."""
    chance = 100.0 / num_classes
    if top1 >= chance + margin_pt:
        return ""
    return f"fp32 top-1 {top1:.2f}% is within {margin_pt:g} points of chance ({chance:.2f}% for {num_classes} classes)"


def abs_diff_histogram(reference, candidate, bins: int = 24) -> dict:
    """Counts of |candidate - reference| in log-spaced bins (exact zeros apart): small enough for a report."""
    diff = np.abs(as_numpy(candidate) - as_numpy(reference)).ravel()
    nonzero = diff[diff > 0]
    low = int(np.floor(np.log10(nonzero.min()))) if nonzero.size else -8
    high = max(int(np.ceil(np.log10(nonzero.max()))) if nonzero.size else -7, low + 1)
    edges = np.logspace(low, high, bins + 1)
    counts, _ = np.histogram(nonzero, edges)
    return {"zeros": int(diff.size - nonzero.size), "edges": edges.tolist(), "counts": counts.tolist()}
