"""Progress bars for long work, on stderr, silent when stderr is not a terminal; durations for their ETAs.

``PIPELINE_PROGRESS=1`` forces bars on (e.g. under a pager), ``PIPELINE_PROGRESS=0`` turns them off.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable, desc: str = "", total: int | None = None, leave: bool = True) -> tqdm:
    setting = os.environ.get("PIPELINE_PROGRESS")
    disable = None if setting is None else setting == "0"
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=disable, dynamic_ncols=True)


def format_duration(seconds: float) -> str:
    """A time left or taken, short: ``1h05m``, ``4m07s``, ``9s`` (a negative estimate reads ``0s``)."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
