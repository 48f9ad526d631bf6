"""Reports of runs and sweeps, read from their manifests and histories: the HTML page and the comparison table."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ConfigError

REPORT_FILE = "report.html"


def write_report(path: str | Path, output: str | Path | None = None) -> Path:
    """Write the self-contained HTML report of a run or sweep folder; returns the file written."""
    from pipeline.experiments.grid import is_sweep
    from pipeline.report.pages import run_page, sweep_page
    from pipeline.store import RunStore

    root = Path(path)
    if is_sweep(root):
        text = sweep_page(root)
    elif RunStore(root).stages():
        text = run_page(root)
    else:
        raise ConfigError(f"{root} is neither a run folder (stage manifests) nor a sweep folder (sweep.json)")
    target = Path(output) if output else root / REPORT_FILE
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    return target
