"""Reports of runs and sweeps, read from their manifests and histories: the HTML page and the comparison table."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts.atomic import atomic_write_text
from pipeline.errors import ConfigError

REPORT_FILE = "report.html"


def write_report(path: str | Path | list[str | Path], output: str | Path | None = None) -> Path:
    """Write the self-contained HTML report of a run or sweep folder, or of several on one page (into
    ``output``, by default ./report.html: no one folder owns it); returns the file written."""
    from pipeline.artifacts.store import RunStore
    from pipeline.experiments.grid import is_sweep
    from pipeline.report.pages import folders_page, run_page, sweep_page

    paths = [Path(p) for p in path] if isinstance(path, list | tuple) else [Path(path)]
    root = paths[0]
    if len(paths) > 1:
        text = folders_page(paths)
        root = Path.cwd()
    elif is_sweep(root):
        text = sweep_page(root)
    elif RunStore(root).stages():
        text = run_page(root)
    else:
        raise ConfigError(f"{root} is neither a run folder (stage manifests) nor a sweep folder (sweep.json)")
    return atomic_write_text(Path(output) if output else root / REPORT_FILE, text)
