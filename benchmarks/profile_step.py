"""Where a training step's time goes: wall time against GPU busy time, and kernel launches per step.

A step whose wall time far exceeds the summed kernel time is bound by launches and Python, not by
arithmetic; then fewer, larger kernels (fused SGD, CUDA graphs, batched branches) are what helps.
Profiles :func:`pipeline.training.fit` with every step-overhead option on (``all`` in
bench_throughput.py) for each method, and prints per-step figures and the top kernels.

    python benchmarks/profile_step.py --device cuda --batch 64 --methods kd,kdiffusion
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def profile(args: argparse.Namespace, method: str) -> str:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from pipeline.config import DataConfig, OptimConfig, SyntheticConfig, TrainingConfig
    from pipeline.data import load_data
    from pipeline.distill import build_distiller
    from pipeline.models import build_model
    from pipeline.training import fit, make_loader

    device = torch.device(args.device)
    cfg = DataConfig(
        batch_size=args.batch,
        num_classes=100,
        val_fraction=0.0,
        synthetic=SyntheticConfig(train_size=args.batch * args.steps, test_size=args.batch),
    )
    data = load_data(cfg, seed=0)
    torch.manual_seed(0)
    distiller = build_distiller(method, build_model(args.student, 100), build_model(args.teacher, 100))
    loader = make_loader(data.dataset("train", augment=True), cfg, train=True, device=device, on_device=True)
    amp = "bf16" if args.precision == "bf16" else "none"
    options = {"defer_metrics": True, "optimizer_impl": "fused", "amp": amp}  # bench_throughput.py's "all"
    training = TrainingConfig(tensorboard=False, checkpoint_every=0, **options)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tempfile.TemporaryDirectory() as scratch:
        run = {"distiller": distiller, "train_loader": loader, "val_loader": None, "device": device}
        quiet = {"scratch": Path(scratch), "log": lambda _: None, "training": training}
        fit(**run, **quiet, cfg=OptimConfig(epochs=1, milestones=[]))  # warm-up, outside the profile
        with torch_profile(activities=activities) as prof:
            tic = time.perf_counter()
            fit(**run, **quiet, cfg=OptimConfig(epochs=2, milestones=[]))  # resumes: epoch 2 only
            wall = time.perf_counter() - tic
    events = prof.key_averages()
    steps = args.steps  # the second fit resumes after epoch 1 and trains epoch 2 only
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    lines = [
        f"### {method}: {args.teacher} -> {args.student}, batch {args.batch}, {args.precision}, {args.device}",
        "",
        f"- wall per step: {wall / steps * 1e3:.2f} ms; summed kernel time per step: {gpu_us / steps / 1e3:.2f} ms "
        f"(GPU busy {100 * gpu_us / 1e6 / max(wall, 1e-9):.0f} % of the wall time); kernel launches per step: "
        f"{launches / steps:.0f}",
        "",
        "```",
        events.table(sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total", row_limit=15),
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="ShuffleV1")
    parser.add_argument("--methods", default="kd,kdiffusion")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=20, help="steps profiled (one epoch)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    text = "\n".join(profile(args, method) for method in args.methods.split(","))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
