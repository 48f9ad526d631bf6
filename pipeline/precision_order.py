"""The export precisions by name, in the order every loop, table and plot uses: the reference first.

What each precision is (its file, conversion and gates) is the registry in ``exports/precisions.py``; this
is only the names and their order, so the report can lay out its columns without loading the export
backends. Standard library only: a library leaf that ``exports/`` may import.
"""

from __future__ import annotations

REFERENCE_PRECISION = "fp32"  # exported from the model itself; the others are made from it and gated against it
PRECISION_ORDER = (REFERENCE_PRECISION, "fp16", "int8")
