"""Experiments: sweeps (grids of ordinary runs), the paper-shaped comparison, and the HTML report.

A sweep never does what a run does: each cell is ``python -m pipeline run all`` into its own run
folder, started as a subprocess (or a cluster job), so building, skipping, resuming and checking
stay the runner's. ``compare`` and ``report`` only read manifests and ``history.json``.
"""
