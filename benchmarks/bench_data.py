"""Data-path throughput: how many images per second each dataset path delivers to a training loop.

Measures, on this machine and in one run (so the ratios compare like with like):

1. CIFAR-100 one-time load: md5 of the three files plus the restricted unpickler, on a full-size
   (50 000 + 10 000 image) set in the official format, written to a temporary folder.
2. CIFAR recipe per-sample augmentation through a DataLoader (batch 64) with 0, 1, 2 workers.
3. ImageNet recipe (PIL decode + RandomResizedCrop 224 + flip) on 500x375 JPEGs with 0, 1, 2 workers.
4. JPEG decode alone: PIL versus torchvision.io.decode_jpeg.

Usage: python benchmarks/bench_data.py [--batches 40] [--jpegs 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.config import DataConfig
from pipeline.data import Transformed, load_data
from pipeline.data.cifar import MD5, cifar100, md5_bytes


def write_cifar(root: Path, n_train: int, n_test: int) -> None:
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = [i % 100 for i in range(n)]
        data = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": labels}
        (folder / name).write_bytes(pickle.dumps(data, protocol=4))  # raw bytes, like Python 2's strings
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=4))


def write_jpegs(root: Path, count: int, classes: int = 8) -> None:
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:375, 0:500]
    for i in range(count):
        split = "val" if (i // classes) % 8 == 0 else "train"
        folder = root / split / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.stack([(xs * (i % 7 + 1)) % 256, (ys * (i % 5 + 1)) % 256, (xs + ys) % 256], axis=2)
        image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i}.JPEG", quality=90)


def loader_rate(dataset, workers: int, batches: int, batch_size: int) -> float:
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(0),
    )
    iterator = iter(loader)
    next(iterator)  # start-up (worker fork) is not throughput
    seen, tic = 0, time.perf_counter()
    for _ in range(batches):
        try:
            images, _ = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            images, _ = next(iterator)
        seen += len(images)
    return seen / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--jpegs", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_cifar(root / "cifar", 50_000, 10_000)
        cfg = DataConfig(dataset="cifar100", root=str(root / "cifar"), verify_checksums=False, workers=0)
        folder = root / "cifar" / "cifar-100-python"
        table = {**MD5, **{n: md5_bytes((folder / n).read_bytes()) for n in ("train", "test", "meta")}}
        for verify in (False, True):
            times = []
            for _ in range(args.repeats):
                tic = time.perf_counter()
                cifar100(dataclasses.replace(cfg, verify_checksums=verify), md5=table)
                times.append(time.perf_counter() - tic)
            label = "read + md5 + unpickle" if verify else "read + unpickle (no md5)"
            print(f"cifar100 50k+10k images, {label}: min {min(times):.2f} s over {args.repeats}")

        bundle = load_data(cfg)
        train = bundle.dataset("train", augment=True)
        v2_train = Transformed(bundle.source("train"), train.transform.fallback)
        for repeat in range(args.repeats):
            for name, dataset in (("torchvision v2", v2_train), ("CifarTransform", train)):
                rates = {w: loader_rate(dataset, w, args.batches, 64) for w in (0, 1, 2)}
                text = ", ".join(f"{w} workers {r:,.0f} img/s" for w, r in rates.items())
                print(f"cifar recipe ({name}), batch 64, run {repeat + 1}: {text}")

        write_jpegs(root / "jpeg", args.jpegs)
        folder = load_data(DataConfig(dataset="imagefolder", root=str(root / "jpeg"), workers=0))
        jpeg_train = folder.dataset("train", augment=True)
        for repeat in range(args.repeats):
            rates = {w: loader_rate(jpeg_train, w, max(args.batches // 4, 4), 32) for w in (0, 1, 2)}
            print(
                f"imagenet recipe, 500x375 JPEG, batch 32, run {repeat + 1}: "
                + ", ".join(f"{w} workers {r:,.0f} img/s" for w, r in rates.items())
            )

        from torchvision.io import decode_jpeg, read_file

        paths = [p for p, _ in folder.raw.train.samples][:64]
        for repeat in range(args.repeats):
            tic = time.perf_counter()
            for p in paths:
                with Image.open(p) as im:
                    im.convert("RGB")
            pil = (time.perf_counter() - tic) / len(paths)
            tic = time.perf_counter()
            for p in paths:
                decode_jpeg(read_file(p))
            tv = (time.perf_counter() - tic) / len(paths)
            ratio = pil / tv
            print(f"JPEG decode 500x375, run {repeat + 1}: PIL {pil * 1e3:.2f} ms, torchvision.io {tv * 1e3:.2f} ms")
            print(f"  ratio PIL / torchvision.io: {ratio:.2f}")


if __name__ == "__main__":
    main()
