"""Distillation methods behind one contract (mdistiller-style), chosen by registry name.

A method is a :class:`Distiller`: it owns the student, a frozen teacher kept in eval mode, and any
training-only modules (bridges, regressors, memory banks). ``forward(images, targets)`` returns the
student's logits and a dict of named, already weighted losses whose sum is the training objective.
Features come from forward hooks, so the student's own ``forward`` stays plain.

The contract lives in :mod:`~pipeline.distill.base`, cross-entropy training in :mod:`~pipeline.distill.vanilla`
and the by-name API in :mod:`~pipeline.distill.catalog`, which imports every method. Importing this package
(or any module in it) loads no method, so the ``teacher`` stage does not depend on their code. The by-name
names are still importable from here, loaded on first use with :func:`importlib.import_module`, which the
import graph does not see: a stage that builds a method by name imports ``pipeline.distill.catalog`` itself
(a test checks that every stage does).
"""

from __future__ import annotations

import importlib

from pipeline.distill.base import Bound, Distiller, register_method

__all__ = [
    "METHODS",
    "Bound",
    "Distiller",
    "build_distiller",
    "check_method_args",
    "method_names",
    "method_options",
    "option_types",
    "register_method",
]

CATALOG = ("METHODS", "build_distiller", "check_method_args", "method_names", "method_options", "option_types")


def __getattr__(name: str) -> object:
    """The names of :mod:`pipeline.distill.catalog`, every method loaded (``METHODS`` too: never half filled)."""
    if name not in CATALOG:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    catalog = importlib.import_module("pipeline.distill.catalog")
    return getattr(catalog, name)
