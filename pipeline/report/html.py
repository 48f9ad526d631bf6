"""Assembling the report page: one HTML file with inline CSS and inline PNG figures, no script, no network.

A Content-Security-Policy forbids every fetch except inline data, so a page that tried to load
something from elsewhere would log a console error (the browser test looks for exactly that).
Tables and figures carry ``data-table`` / ``data-plot`` names, so tests can check that each is there.
"""

from __future__ import annotations

import base64
import html
import math
from datetime import datetime, timezone

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1180px;color:#1d2330;
padding:0 1rem;line-height:1.4}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d8dce4}
h3{font-size:1rem;margin-top:1.2rem}.meta{color:#5b6476;font-size:.9rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.85rem}
th,td{border:1px solid #d8dce4;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f2f4f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#137333;font-weight:600}.failed{color:#b3261e;font-weight:600}.skipped{color:#8a6d00;font-weight:600}
figure{margin:.8rem 0}figure img{max-width:100%;border:1px solid #e4e7ee}figcaption{color:#5b6476;font-size:.85rem}
p.none{color:#5b6476;font-style:italic}details{margin:.5rem 0}code{background:#f2f4f8;padding:0 .2rem}
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: object) -> str:
    """Numbers with sensible precision; everything else as text."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def status_badge(status: str) -> str:
    kind = status if status in ("ok", "failed", "skipped") else ""
    return f'<span class="{kind}">{esc(status)}</span>'


def table(name: str, header: list[str], rows: list[list[object]], raw: set[int] = frozenset()) -> str:
    """A table named ``name``; cells in columns ``raw`` are trusted HTML (badges), all others escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            if i in raw:
                cells.append(f"<td>{cell}</td>")
            elif isinstance(cell, int | float) and not isinstance(cell, bool):
                cells.append(f'<td class="num">{esc(fmt(cell))}</td>')
            else:
                cells.append(f"<td>{esc(fmt(cell))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table data-table="{esc(name)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def figure(name: str, png: bytes | None, caption: str, missing: str) -> str:
    if png is None:
        return f'<p class="none">{esc(missing)}</p>'
    data = base64.b64encode(png).decode()
    return (
        f'<figure class="plot" data-plot="{esc(name)}"><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def none(text: str) -> str:
    return f'<p class="none">{esc(text)}</p>'


def page(title: str, subtitle: str, sections: list[tuple[str, str]]) -> str:
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    body = "".join(f"<section><h2>{esc(h)}</h2>{content}</section>" for h, content in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f'<h1>{esc(title)}</h1><p class="meta">{esc(subtitle)} · generated {generated} by '
        "<code>python -m pipeline report</code></p>"
        f"{body}</body></html>\n"
    )
