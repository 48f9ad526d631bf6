"""Eval-mode accuracy of trained students with BatchNorm's running statistics against batch statistics.

A student whose running statistics lag its weights (a very short run) scores far lower in eval mode than
the same weights normalising with each batch's own statistics; a student that is simply bad scores low
both ways. Prints, per run folder, test top-1 on the first ``--images`` test images both ways.

Usage: python benchmarks/bn_statistics_check.py RUN_FOLDER... [--images 2000] [--preset P] [--set K=V ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.config import load_config
from pipeline.data import load_data
from pipeline.distill.ofd import batch_statistics
from pipeline.models.loading import load_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--preset", default="fmnist-wrn_16_2-mobile_half")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load_data(load_config(args.preset, None, args.overrides).data)
    test = data.dataset("test")
    images = torch.stack([test[i][0] for i in range(args.images)])
    labels = torch.tensor([test[i][1] for i in range(args.images)])
    print("| run | running statistics | batch statistics (batches of 250) |\n|---|---:|---:|")
    for run in args.runs:
        model, _ = load_model(run / "train" / "student.safetensors")
        model.eval()
        with torch.no_grad():
            running = torch.cat([model(b) for b in images.split(250)]).argmax(1)
            with batch_statistics(model):
                batch = torch.cat([model(b) for b in images.split(250)]).argmax(1)
        top1 = [float((p == labels).float().mean()) * 100 for p in (running, batch)]
        print(f"| {run.name} | {top1[0]:.2f} | {top1[1]:.2f} |")


if __name__ == "__main__":
    main()
