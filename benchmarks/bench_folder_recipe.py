"""Training throughput of one student on a 32 px PNG ImageFolder against the same images in memory.

The images are Fashion-MNIST's (a seeded share, written once as 32 px PNGs under ``--work``). Three data
paths feed the same student (``mobile_half``, batch 64, SGD) through the pipeline's own training loader:

- ``memory``: the ``fashion_mnist`` dataset (uint8 tensors, the CIFAR recipe's tensor path);
- ``folder, cache``: ``imagefolder`` with ``data.recipe=cifar`` and ``data.cache=memory`` (decoded once);
- ``folder, no cache``: the same with ``data.cache=off`` (PNG decoded on every read, in the main process
  or in ``--workers`` loader processes).

The paths are timed in interleaved rounds (each path's loader iterated for ``--steps`` training steps
per round), so a shared machine's load hits them alike; the figure is the median images/s over rounds,
after one untimed round. The one-time decode of the cached folder is reported apart.

Usage: python benchmarks/bench_folder_recipe.py [--images 2000] [--steps 10] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.config import DataConfig
from pipeline.data import load_data
from pipeline.models import build_model
from pipeline.training import make_loader


def write_png_folder(root: Path, images: int) -> None:
    """A seeded share of Fashion-MNIST's training split as ``train/<class>/*.png`` and ``val/<class>/*.png``."""
    if (root / "done").is_file():
        return
    bundle = load_data(DataConfig(dataset="fashion_mnist", workers=0, val_fraction=0.0, train_subset=images))
    names = bundle.info.class_names
    source, test = bundle.source("train"), bundle.raw.test
    for split, data, count in (("train", source, len(source)), ("val", test, min(len(test), images // 5))):
        for i in range(count):
            image, label = data[i]
            folder = root / split / names[label].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy()).save(folder / f"{i:05d}.png")  # 32 px grayscale PNG
    (root / "done").write_text("ok")


def paths(root: Path, workers: int, images: int) -> dict[str, DataConfig]:
    folder = {"dataset": "imagefolder", "root": str(root), "recipe": "cifar", "val_fraction": 0.0}
    return {
        "memory": DataConfig(dataset="fashion_mnist", workers=0, val_fraction=0.0, train_subset=images),
        "folder, cache": DataConfig(**folder, cache="always", workers=0),
        f"folder, no cache, {workers} workers": DataConfig(**folder, cache="never", workers=workers),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-folder"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    write_png_folder(args.work / "pngs", args.images)
    loaders, setup = {}, {}
    for name, cfg in paths(args.work / "pngs", args.workers, args.images).items():
        tic = time.perf_counter()
        bundle = load_data(cfg)
        setup[name] = time.perf_counter() - tic
        loaders[name] = make_loader(bundle.dataset("train", augment=True), cfg, train=True, seed=0)
    torch.manual_seed(0)
    model = build_model("mobile_half", 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def run(name: str) -> float:
        seen, tic = 0, time.perf_counter()
        for step, (images, labels) in enumerate(loaders[name]):
            if step == args.steps:
                break
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(labels)
        return seen / (time.perf_counter() - tic)

    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for r in range(args.rounds + 1):
        for name in loaders:
            rate = run(name)
            if r:
                rates[name].append(rate)
    base = statistics.median(rates["memory"])
    print(f"images {args.images}, batch 64, {args.steps} steps x {args.rounds} rounds, {args.threads} thread(s)")
    print("| data path | setup (s) | train images/s | x memory |")
    print("|---|---:|---:|---:|")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"| {name} | {setup[name]:.1f} | {rate:.1f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
