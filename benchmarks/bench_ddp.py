"""Training throughput (images/s, training steps with data loading, as the epoch log reports it).

Two benchmarks, each comparing settings within one run:

``cpu``: 1 process vs 2 gloo processes under torchrun on the same global batch (DDP scaling on CPU).
    python benchmarks/bench_ddp.py cpu --model resnet20 --batch 64 --repeats 3

``gpu``: fp32 vs bf16 vs channels_last+bf16 for a teacher -> student pair, and each method's cost
(e.g. KDiffusion vs plain KD) at that scale, on one GPU.
    python benchmarks/bench_ddp.py gpu --teacher resnet32x4 --student ShuffleV1 --methods kdiffusion,kd

Every figure is the second epoch's images/s (the first pays for warm-up: worker start, cuDNN autotuning).
Settings are interleaved across repeats, so that load from other work on the machine hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {
    "fp32": {},
    "bf16": {"amp": "bf16"},
    "channels_last+bf16": {"amp": "bf16", "channels_last": True},
    "fp16": {"amp": "fp16"},
    "channels_last+fp16": {"amp": "fp16", "channels_last": True},
    "compile+channels_last+bf16": {"amp": "bf16", "channels_last": True, "compile": True},
}


def measure(args: argparse.Namespace, method: str, mode: str) -> float:
    """Train ``args.epochs`` epochs on synthetic CIFAR-size data; the last epoch's global images/s."""
    import torch

    from pipeline.config import DataConfig, OptimConfig, SyntheticConfig, TrainingConfig
    from pipeline.data import load_data
    from pipeline.distill import build_distiller
    from pipeline.models import build_model
    from pipeline.training import fit, make_loader, resolve_device

    device = resolve_device(args.device)
    data_cfg = DataConfig(
        batch_size=args.batch,
        workers=args.workers,
        num_classes=100,
        val_fraction=0.0,
        synthetic=SyntheticConfig(train_size=args.batch * args.steps, test_size=args.batch),
    )
    data = load_data(data_cfg, seed=0)
    torch.manual_seed(0)
    student = build_model(args.student, 100)
    teacher = build_model(args.teacher, 100) if method != "vanilla" else None
    distiller = build_distiller(method, student, teacher)
    with tempfile.TemporaryDirectory() as scratch:
        history = fit(
            distiller,
            make_loader(data.dataset("train", augment=True), data_cfg, train=True, device=device),
            None,
            OptimConfig(epochs=args.epochs, milestones=[]),
            device,
            scratch=Path(scratch),
            log=lambda _: None,
            desc=f"{method} {mode}",
            training=TrainingConfig(tensorboard=False, checkpoint_every=0, **MODES[mode]),
        )
    return history.last["images_per_s"]


def worker(args: argparse.Namespace) -> None:
    """One training run (under torchrun: one rank); rank 0 prints the result as JSON."""
    import torch

    from pipeline.training.distributed import launch

    torch.set_num_threads(args.threads)
    with launch(args.device) as world:
        rate = measure(args, args.method, args.mode)
        if world.is_main:
            print(json.dumps({"images_per_s": rate}))


def _spawn(args: argparse.Namespace, processes: int, threads: int) -> float:
    command = [
        *(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []),
        str(Path(__file__).resolve()),
        "worker",
        *("--model", args.model, "--batch", str(args.batch), "--steps", str(args.steps)),
        *("--epochs", str(args.epochs), "--threads", str(threads), "--workers", str(args.workers)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PIPELINE_PROGRESS": "0"}
    out = subprocess.run([sys.executable, *command], env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]


def bench_cpu(args: argparse.Namespace) -> None:
    cores = os.cpu_count() or 1
    settings = [
        ("1 process x 1 thread", 1, 1),
        (f"1 process x {cores} threads", 1, cores),
        ("2 processes x 1 thread", 2, 1),
    ]
    rates: dict[str, list[float]] = {name: [] for name, *_ in settings}
    for repeat in range(args.repeats):
        for name, processes, threads in settings if repeat % 2 == 0 else reversed(settings):
            rates[name].append(_spawn(args, processes, threads))
            print(f"repeat {repeat + 1}: {name}: {rates[name][-1]:.1f} images/s", file=sys.stderr)
    base = statistics.median(rates[settings[0][0]])
    print(f"\n{args.model}, global batch {args.batch}, {args.steps} steps per epoch, median of {args.repeats}")
    print("| setting | images/s (median) | runs | vs 1 process x 1 thread |\n|---|---|---|---|")
    for name, *_ in settings:
        median = statistics.median(rates[name])
        print(f"| {name} | {median:.1f} | {', '.join(f'{r:.1f}' for r in rates[name])} | {median / base:.2f}x |")


def bench_gpu(args: argparse.Namespace) -> None:
    import torch

    from pipeline.distill import method_names
    from pipeline.training.distributed import resolve_device

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    methods, modes = args.methods.split(","), args.modes.split(",")
    for method in methods:
        if method not in method_names():
            raise SystemExit(f"unknown method {method!r}; this checkout has: {', '.join(method_names())}")
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from: {', '.join(MODES)}")
    rates: dict[tuple[str, str], list[float]] = {(m, o): [] for m in methods for o in modes}
    for repeat in range(args.repeats):
        for method in methods:
            for mode in modes if repeat % 2 == 0 else list(reversed(modes)):
                rates[method, mode].append(measure(args, method, mode))
                print(f"repeat {repeat + 1}: {method} {mode}: {rates[method, mode][-1]:.1f} images/s", file=sys.stderr)
    median = {key: statistics.median(values) for key, values in rates.items()}
    print(f"\n{args.teacher} -> {args.student} on {name}, batch {args.batch}, median of {args.repeats}")
    print(f"| method | {' | '.join(modes)} | " + " | ".join(f"{m} vs {modes[0]}" for m in modes[1:]) + " |")
    print("|---" * (2 * len(modes)) + "|")
    for method in methods:
        cells = [f"{median[method, mode]:.0f}" for mode in modes]
        ratios = [f"{median[method, mode] / median[method, modes[0]]:.2f}x" for mode in modes[1:]]
        print(f"| {method} | {' | '.join(cells + ratios)} |")
    if len(methods) > 1:
        print(f"\nimages/s relative to {methods[-1]} (1.00 = no overhead):")
        for mode in modes:
            parts = [f"{m} {median[m, mode] / median[methods[-1], mode]:.2f}" for m in methods]
            print(f"- {mode}: " + ", ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["cpu", "gpu", "worker"])
    parser.add_argument("--model", default="resnet20", help="cpu: the model trained (cross-entropy)")
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="ShuffleV1")
    parser.add_argument("--methods", default="kdiffusion,kd", help="gpu: comma-separated methods")
    parser.add_argument("--modes", default="fp32,bf16,channels_last+bf16", help=f"gpu: from {', '.join(MODES)}")
    parser.add_argument("--device", default=None, help="default: cpu for `cpu`, cuda for `gpu`")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 64 on CPU, 128 on GPU)")
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default 12 on CPU, 200 on GPU)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 0 on CPU, 8 on GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="vanilla", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.what == "gpu"
    args.device = args.device or ("cuda" if gpu else "cpu")
    args.batch = args.batch or (128 if gpu else 64)
    args.steps = args.steps or (200 if gpu else 12)
    args.workers = args.workers if args.workers is not None else (8 if gpu else 0)
    if args.what == "worker":
        args.student = args.model
        worker(args)
    elif gpu:
        bench_gpu(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
