"""The real-data evidence table: every distillation method x 3 seeds on Fashion-MNIST.

A thin front for ``proxy_methods.py`` (one teacher trained once, every method and seed a resumable cell,
mean ± std of test and held-out val top-1, each cell's training throughput and wall time; ``--step-cost``
adds bench_methods.py's interleaved step timing), choosing the recipe by device:

- ``--device cpu`` (default): preset ``fmnist-wrn_16_2-mobile_half``, a seeded 2,000-image share of the
  training split, 4 student epochs (51 minutes with the teacher on 2 cores: docs/bench-fmnist.md);
- ``--device cuda``: preset ``fmnist-wrn_16_2-mobile_half-full``, all 60,000 training images, 60 epochs.

Usage:
    python benchmarks/fmnist_methods.py [--device cpu|cuda] [--threads 1] [--work runs/fmnist-methods]
        [--write docs/bench-fmnist.md] [any other proxy_methods.py option]

Several processes given the same ``--work`` share the cells (each claims the next free one), so on a
2-core machine two ``--threads 1`` processes finish the table in about half the time.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxy_methods

PRESETS = {"cpu": "fmnist-wrn_16_2-mobile_half", "cuda": "fmnist-wrn_16_2-mobile_half-full"}
TITLE = "Distillation methods on Fashion-MNIST (real images)"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    device = "cpu"
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            device = argv[i + 1]
        elif arg.startswith("--device="):
            device = arg.split("=", 1)[1]
    if "--device" not in " ".join(argv):
        argv += ["--device", device]
    if "--preset" not in argv:
        argv += ["--preset", PRESETS["cuda" if device.startswith("cuda") else "cpu"]]
    if "--work" not in argv:
        argv += ["--work", f"runs/fmnist-methods-{device.split(':')[0]}"]
    if "--title" not in argv:
        argv += ["--title", TITLE]
    proxy_methods.main(argv)


if __name__ == "__main__":
    main()
