"""The ``--methods`` / ``--variant`` options that choose the rows of a per-method benchmark table."""

from __future__ import annotations

import argparse
import json

from pipeline.distill import method_names


def add_row_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", nargs="+", default=None, help="Registered method names [default: all].")
    parser.add_argument(
        "--variant",
        nargs=3,
        action="append",
        default=[],
        metavar=("LABEL", "METHOD", "JSON"),
        help="An extra row: METHOD built with the options in JSON, shown as LABEL (repeatable).",
    )


def rows(args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """(label, method, options) for every row; vanilla first (the baseline)."""
    names = args.methods or method_names()
    out = [("vanilla", "vanilla", {})] + [(n, n, {}) for n in names if n != "vanilla"]
    return out + [(label, method, json.loads(options)) for label, method, options in args.variant]
