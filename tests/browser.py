"""Headless Chromium for the report tests: the DOM after load, the console messages, and a screenshot.

Chromium's own switches do it, with no driver package: ``--dump-dom`` prints the page as rendered,
``--enable-logging=stderr`` prints each console message (errors, CSP violations, failed loads) as a
``CONSOLE`` line, and ``--screenshot`` writes a PNG. Nothing is downloaded: the flags turn off every
background request.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]
_CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]?\s*(.*)")


def chromium() -> str | None:
    """The Chromium binary, or None (the caller skips with the reason)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


@dataclass
class Page:
    dom: str
    console: list[str]
    screenshot: Path


def open_page(html: Path, workdir: Path, width: int = 1280, height: int = 2000) -> Page:
    """Load ``html`` twice in a fresh profile: once for the DOM and console, once for a screenshot."""
    binary = chromium()
    assert binary, "Chromium is not installed"
    url = html.resolve().as_uri()
    common = [binary, *FLAGS, f"--window-size={width},{height}"]
    dom = subprocess.run(
        [*common, f"--user-data-dir={workdir / 'profile-dom'}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    shot = workdir / "screenshot.png"
    capture = subprocess.run(
        [*common, f"--user-data-dir={workdir / 'profile-shot'}", f"--screenshot={shot}", url],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    console = [m.group(1) for line in (dom.stderr + capture.stderr).splitlines() if (m := _CONSOLE.search(line))]
    return Page(dom.stdout, console, shot)


def is_blank(png: Path) -> bool:
    """True when the screenshot is (almost) one colour: fewer than 1% of its pixels differ from the corner."""
    from PIL import Image

    image = Image.open(png).convert("L")
    background = image.getpixel((0, 0))
    differing = sum(count for value, count in enumerate(image.histogram()) if abs(value - background) > 16)
    return differing < 0.01 * image.width * image.height
