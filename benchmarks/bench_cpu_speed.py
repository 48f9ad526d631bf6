"""CPU training speed, side by side in one run: images/s of our KD and KDiffusion training steps in each CPU speed
setting, at each thread count, against the peer-style loop (benchmarks/peer_loop.py).

Settings (``training.*`` options of :func:`pipeline.training.fit`, the loop every training stage runs):

- ``before``: contiguous fp32, the CPU default before ``training.channels_last=auto``;
- ``channels_last``: ``channels_last=auto``, the CPU default before ``training.teacher_graph=auto``;
- ``channels_last+graph``: the CPU default now: the teacher as a graph optimized for inference
  (``training.teacher_graph``: its logits, and the tapped features KDiffusion reads), and what ``amp=auto`` keeps
  on a processor without native bf16;
- ``channels_last+bf16``: bf16 autocast, what ``amp=auto`` adds on a processor with native bf16 (AMX or
  AVX512-BF16); skipped, with the reason, on any other (oneDNN would emulate bf16, slower than fp32);
- ``compile``, ``channels_last+compile``: ``training.compile`` (torch.compile of student and teacher, Inductor's
  C++ kernels; a cell that fails to compile is listed with its error);
- ``peer``: the plain loop the reference codebases use, fp32 and contiguous, on the same distiller modules.

Every figure is the images/s of the last of ``--warmup + 1`` epochs of ``--steps`` steps, as fit reports it (data
loading and augmentation included, in the main process unless ``--workers``), with random weights on random
images: throughput only, no accuracy. Each ratio compares figures of the same run. Repeats alternate the order of
the cells, so that load from other work on the machine hits every setting alike; the table gives the median.

    python benchmarks/bench_cpu_speed.py --out docs/bench-cpu-speed-table.md     # the full table (minutes)
    python benchmarks/bench_cpu_speed.py --steps 2 --warmup 1 --threads 1 --settings before,channels_last
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SETTINGS = {  # training options on top of TrainingConfig's defaults
    "before": {"channels_last": False, "amp": "none", "teacher_graph": False},
    "channels_last": {"channels_last": True, "amp": "none", "teacher_graph": False},
    "channels_last+graph": {"channels_last": True, "amp": "none", "teacher_graph": True},
    "channels_last+bf16": {"channels_last": True, "amp": "bf16", "teacher_graph": False},
    "compile": {"channels_last": False, "amp": "none", "compile": True, "teacher_graph": False},
    "channels_last+compile": {"channels_last": True, "amp": "none", "compile": True, "teacher_graph": False},
}
PEER = "peer"
BEFORE = "before"  # the baseline of the "vs before" column


@dataclass(frozen=True)
class Cell:
    method: str
    threads: int
    setting: str  # PEER or a key of SETTINGS


def default_setting(fast_bf16: str | None, amp_auto: bool = False) -> str:
    """The setting a run gets on this processor with the defaults (``amp_auto``: with ``training.amp=auto``)."""
    return "channels_last+bf16" if amp_auto and fast_bf16 else "channels_last+graph"


def skip_reason(setting: str, native_bf16: str | None) -> str:
    """Why a setting is not measured on this processor ("" when it is)."""
    if "bf16" in setting and native_bf16 is None:
        return "no native bf16 on this processor (neither amx_tile nor avx512_bf16): oneDNN would emulate it"
    return ""


def build_distiller(method: str, args: argparse.Namespace):
    import torch

    from pipeline.distill import build_distiller as build
    from pipeline.models import build_model

    torch.manual_seed(0)
    options = {"warmup_epochs": 0} if method.startswith("kdiffusion") else {}  # time the full loss from step one
    return build(method, build_model(args.student, args.classes), build_model(args.teacher, args.classes), options)


def random_data(args: argparse.Namespace):
    """``--steps`` batches of random uint8 images at ``--size`` px, served by the CIFAR recipe (pad-4 crop, flip)."""
    import torch

    from pipeline.data import DataBundle, DataInfo, RawData
    from pipeline.data.synthetic import TensorImages

    gen = torch.Generator().manual_seed(0)
    n = args.batch * args.steps
    images = torch.randint(0, 256, (n, 3, args.size, args.size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, args.classes, (n,), generator=gen)
    names = tuple(f"class_{i}" for i in range(args.classes))
    info = DataInfo("random", args.classes, names, args.size, (0.5,) * 3, (0.25,) * 3, "cifar")
    return DataBundle(RawData(TensorImages(images, labels), TensorImages(images[:1], labels[:1]), info), 0.0, 0)


def measure(cell: Cell, args: argparse.Namespace, data) -> float:
    import torch
    from bench_throughput import fit_images_per_s
    from peer_loop import peer_images_per_s

    from pipeline.config import DataConfig, TrainingConfig
    from pipeline.training import make_loader

    torch.set_num_threads(cell.threads)
    device, epochs = torch.device("cpu"), args.warmup + 1
    if SETTINGS.get(cell.setting, {}).get("compile"):
        torch.compiler.reset()  # each compile cell compiles in its own warm-up, never past Dynamo's recompile limit
    distiller = build_distiller(cell.method, args)
    if cell.setting == PEER:
        train, info = data.raw.train, data.info  # the whole split: random_data holds out nothing
        return peer_images_per_s(
            distiller, train.images, train.labels, info.mean, info.std, args.batch, args.workers, epochs, device
        )
    cfg = DataConfig(batch_size=args.batch, workers=args.workers)
    loader = make_loader(data.dataset("train", augment=True), cfg, train=True, device=device)
    training = TrainingConfig(tensorboard=False, checkpoint_every=0, **SETTINGS[cell.setting])
    return fit_images_per_s(distiller, loader, device, epochs, training, f"{cell.method} {cell.setting}")


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(results: dict[Cell, float], failed: dict[Cell, str], skipped: dict[str, str], args, header: str) -> str:
    from pipeline.artifacts.machine import fast_bf16

    flag = fast_bf16()  # what training.amp=auto takes bf16 for
    now, auto = default_setting(flag), default_setting(flag, amp_auto=True)
    notes = {BEFORE: "default before", now: "default now"}
    notes[auto] = notes.get(auto, "") + ("; " if auto in notes else "") + "with training.amp=auto"
    lines = [header, "", "| method | threads | setting | images/s | vs before | vs peer |", "|---|---|---|---|---|---|"]
    for method in args.methods:
        for threads in args.threads:
            before, peer = results.get(Cell(method, threads, BEFORE)), results.get(Cell(method, threads, PEER))
            for setting in [PEER, *SETTINGS]:
                cell = Cell(method, threads, setting)
                if setting not in args.settings:
                    continue
                name = setting + (f" ({notes[setting]})" if setting in notes else "")
                if setting in skipped:
                    lines.append(f"| {method} | {threads} | {name} | skipped: {skipped[setting]} | - | - |")
                elif cell in failed:
                    lines.append(f"| {method} | {threads} | {name} | failed: {failed[cell]} | - | - |")
                elif cell in results:
                    rate = results[cell]
                    ratios = f"{_ratio(rate, before)} | {_ratio(rate, peer)}"
                    lines.append(f"| {method} | {threads} | {name} | {rate:.0f} | {ratios} |")
    kd = [t for t in args.threads if Cell("kd", t, now) in results and Cell("kd", t, PEER) in results]
    if kd:
        lines += ["", "Goals (issue 21): the KD step at least 1.40x the peer loop on CPU at batch 64 with 2 threads:"]
        for t in kd:
            lines.append(
                f"- KD, {t} thread(s), batch {args.batch}: default now ({now}) / peer = "
                f"{_ratio(results[Cell('kd', t, now)], results[Cell('kd', t, PEER)])}"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="kd,kdiffusion", type=lambda s: s.split(","))
    parser.add_argument("--teacher", default="wrn_16_2", help="the default preset's pair")
    parser.add_argument("--student", default="mobile_half")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch (the timed epoch and each warm-up one)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="warm-up epochs before the timed one (compile cells compile in them)"
    )
    parser.add_argument("--threads", default="1,2", type=lambda s: [int(t) for t in s.split(",")])
    parser.add_argument(
        "--settings", default=",".join([PEER, *SETTINGS]), type=lambda s: s.split(","), help="cells to time"
    )
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of both loops (0: in the loop)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell (the table gives the median)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown table here (and .json)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.settings) - {PEER, *SETTINGS})
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join([PEER, *SETTINGS])}")
    import torch

    from pipeline.artifacts.machine import describe_cpu, native_bf16

    command = "python benchmarks/bench_cpu_speed.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    flag = native_bf16()
    skipped = {s: skip_reason(s, flag) for s in args.settings if skip_reason(s, flag)}
    cells = [
        Cell(method, threads, setting)
        for threads in args.threads
        for method in args.methods
        for setting in args.settings
        if setting not in skipped
    ]
    data = random_data(args)
    results: dict[Cell, float] = {}
    runs: dict[Cell, list[float]] = {}
    failed: dict[Cell, str] = {}
    started = time.perf_counter()
    print(f"{len(cells)} cells x {args.repeats} repeat(s) on {describe_cpu()}", file=sys.stderr)

    def write() -> str:
        header = (
            f"## CPU training speed: {describe_cpu()}, torch {torch.__version__}\n\n"
            f"{time.strftime('%Y-%m-%d')}; `{command}`\n\n"
            f"Teacher {args.teacher} -> student {args.student}, {args.classes} classes, batch {args.batch} at "
            f"{args.size} px; the last of {args.warmup + 1} epoch(s) of {args.steps} steps, DataLoader workers "
            f"{args.workers}; median of {args.repeats} run(s) per cell, interleaved; "
            f"{sum(map(len, runs.values()))} of {len(cells) * args.repeats} runs in "
            f"{time.perf_counter() - started:.0f} s. Native bf16: {flag or 'none'}."
        )
        text = report(results, failed, skipped, args, header)
        if args.out:  # after every cell, so a run cut short still leaves its table
            args.out.write_text(text)
            raw = [{**cell.__dict__, "images_per_s": rates} for cell, rates in runs.items()]
            args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
        return text

    for repeat in range(args.repeats):
        for cell in cells if repeat % 2 == 0 else reversed(cells):
            if cell in failed:
                continue
            tic = time.perf_counter()
            try:
                rate = measure(cell, args, data)
            except Exception as exc:  # one failing setting (a compile error) must not cost the whole table
                failed[cell] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}".replace("|", "/")
                print(f"FAILED {cell}: {failed[cell]}", file=sys.stderr)
                continue
            runs.setdefault(cell, []).append(rate)
            results[cell] = statistics.median(runs[cell])
            print(f"{cell}: {rate:.1f} images/s ({time.perf_counter() - tic:.1f} s)", file=sys.stderr)
            write()
    print(write())


if __name__ == "__main__":
    main()
