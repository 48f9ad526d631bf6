"""Training throughput of our loop against a plain peer loop, and each step-overhead option's own effect.

One run times, side by side on the same device and data, images/s of:

- ``peer``: the loop the reference codebases use (``benchmarks/peer_loop.py``);
- ``before``: :func:`pipeline.training.fit` as it was before the step-overhead options (DataLoader with
  workers, metrics read every step, torch's default SGD kernels, teacher under ``no_grad``);
- ``+inference_mode``, ``+batched_chain`` (KDiffusion's chain as a few batched kernels; no-op for KD),
  ``+device_data``, ``+defer_metrics``, ``+fused_sgd``: ``before`` plus one option;
- ``all``: every option above; ``all+cuda_graphs`` (CUDA only) and ``all+channels_last`` on top of it.

``peer`` and ``all`` (and ``all+channels_last`` in bf16) run at every batch size; ``before`` and the
single options run at the ``--ablation-batch`` only, in the first precision, on the first pair, to keep a GPU
pass short.
Every figure is the second epoch's images/s (the first pays for warm-up), data loading included, with
random weights on synthetic 32x32 data (100 classes): throughput only, no accuracy.

    python benchmarks/bench_throughput.py --device cuda --out throughput.md        # the GPU grid
    python benchmarks/bench_throughput.py --quick                                  # a tiny CPU pass
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import astuple, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# teacher_inference and batched_chain (KDiffusion only) are distiller settings; the rest are TrainingConfig's.
ALL = {
    "teacher_inference": True,
    "batched_chain": True,
    "device_data": True,
    "defer_metrics": True,
    "optimizer_impl": "fused",
}
BEFORE = {
    "teacher_inference": False,
    "batched_chain": False,
    "device_data": False,
    "defer_metrics": False,
    "optimizer_impl": "auto",
}
VARIANTS = {
    "before": BEFORE,
    "+inference_mode": {**BEFORE, "teacher_inference": True},
    "+batched_chain": {**BEFORE, "batched_chain": True},
    "+device_data": {**BEFORE, "device_data": True},
    "+defer_metrics": {**BEFORE, "defer_metrics": True},
    "+fused_sgd": {**BEFORE, "optimizer_impl": "fused"},
    "all": ALL,
    "all+cuda_graphs": {**ALL, "cuda_graphs": True},
    "all+channels_last": {**ALL, "channels_last": True},
}
ABLATION = ["before", "+inference_mode", "+batched_chain", "+device_data", "+defer_metrics", "+fused_sgd"]
PRECISIONS = {"fp32": None, "bf16": "bf16"}


@dataclass(frozen=True)
class Cell:
    teacher: str
    student: str
    method: str
    batch: int
    precision: str
    loop: str  # "peer" or a key of VARIANTS


@dataclass
class Setup:
    device: str
    steps: dict[int, int]  # batch -> steps per epoch
    workers: int
    epochs: int = 2
    results: dict[Cell, float] = field(default_factory=dict)  # the median of the runs so far
    runs: dict[Cell, list[float]] = field(default_factory=dict)


def _distiller(cell: Cell, inference_mode: bool, batched_chain: bool = False):
    import torch

    from pipeline.distill import build_distiller
    from pipeline.models import build_model

    torch.manual_seed(0)
    args = {"batched_chain": True} if batched_chain and cell.method.startswith("kdiffusion") else {}
    distiller = build_distiller(cell.method, build_model(cell.student, 100), build_model(cell.teacher, 100), args)
    distiller.teacher_inference_mode = inference_mode
    return distiller


def _data(setup: Setup, batch: int):
    from pipeline.config import DataConfig, SyntheticConfig
    from pipeline.data import load_data

    cfg = DataConfig(
        batch_size=batch,
        workers=setup.workers,
        num_classes=100,
        val_fraction=0.0,
        synthetic=SyntheticConfig(train_size=batch * setup.steps[batch], test_size=batch),
    )
    return cfg, load_data(cfg, seed=0)


def measure_peer(setup: Setup, cell: Cell) -> float:
    import torch
    from peer_loop import peer_images_per_s

    _, data = _data(setup, cell.batch)
    source = data.source("train")
    base = source.dataset
    images, labels = base.images[source.indices], base.labels[source.indices]
    distiller = _distiller(cell, inference_mode=False)
    amp = torch.bfloat16 if cell.precision == "bf16" else None
    info, device = data.info, torch.device(setup.device)
    return peer_images_per_s(
        distiller, images, labels, info.mean, info.std, cell.batch, setup.workers, setup.epochs, device, amp
    )


def fit_images_per_s(distiller, loader, device, epochs: int, training, desc: str = "bench") -> float:
    """Train ``distiller`` with :func:`pipeline.training.fit` for ``epochs`` epochs (no evaluation, a throwaway
    scratch folder); the last epoch's images/s as fit reports it (the earlier ones pay for warm-up)."""
    from pipeline.config import OptimConfig
    from pipeline.training import fit

    with tempfile.TemporaryDirectory() as scratch:
        history = fit(
            distiller,
            loader,
            None,
            OptimConfig(epochs=epochs, milestones=[]),
            device,
            scratch=Path(scratch),
            log=lambda _: None,
            desc=desc,
            training=training,
        )
    return history.last["images_per_s"]


def measure_ours(setup: Setup, cell: Cell) -> float:
    import torch

    from pipeline.config import TrainingConfig
    from pipeline.training import make_loader

    options = dict(VARIANTS[cell.loop])
    inference, batched, on_device = (options.pop(k) for k in ("teacher_inference", "batched_chain", "device_data"))
    device = torch.device(setup.device)
    cfg, data = _data(setup, cell.batch)
    distiller = _distiller(cell, inference, batched)
    loader = make_loader(data.dataset("train", augment=True), cfg, train=True, device=device, on_device=on_device)
    amp = PRECISIONS[cell.precision] or "none"
    training = TrainingConfig(tensorboard=False, checkpoint_every=0, amp=amp, **options)
    return fit_images_per_s(distiller, loader, device, setup.epochs, training, f"{cell.method} {cell.loop}")


def plan(args: argparse.Namespace) -> list[Cell]:
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    methods, batches, precisions = args.methods.split(","), args.batches, args.precisions.split(",")
    wanted = args.variants.split(",")
    cells = []
    for number, (teacher, student) in enumerate(pairs):
        for method in methods:
            for batch in batches:
                for precision in precisions:
                    loops = ["peer", "all"]
                    if precision == "bf16":
                        loops.append("all+channels_last")
                    if args.device.startswith("cuda"):
                        loops.append("all+cuda_graphs")
                    if number == 0 and batch == args.ablation_batch and precision == precisions[0]:
                        loops += ABLATION
                    if not method.startswith("kdiffusion") and "+batched_chain" in loops:
                        loops.remove("+batched_chain")  # a KDiffusion option: KD would time `before` again
                    for loop in loops:
                        if loop in wanted:
                            cells.append(Cell(teacher, student, method, batch, precision, loop))
    return cells


def _order(item: Cell | tuple) -> tuple:
    """Table order: pair, method, batch (numerically), then fp32 before bf16."""
    teacher, student, method, batch, precision = item[:5] if isinstance(item, tuple) else astuple(item)[:5]
    return teacher, student, method, batch, list(PRECISIONS).index(precision)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _rate(value: float | None) -> str:
    return f"{value:.0f}" if value else "-"


def report(setup: Setup, args: argparse.Namespace, header: str) -> str:
    r = setup.results
    lines = [header, "", "### Peer loop vs ours (all options), images/s", ""]
    lines += ["| pair | method | batch | precision | peer | ours | ours / peer |", "|---|---|---|---|---|---|---|"]
    keys = sorted({(c.teacher, c.student, c.method, c.batch, c.precision) for c in r}, key=_order)
    for t, s, m, b, p in keys:
        peer, ours = r.get(Cell(t, s, m, b, p, "peer")), r.get(Cell(t, s, m, b, p, "all"))
        lines.append(f"| {t} -> {s} | {m} | {b} | {p} | {_rate(peer)} | {_rate(ours)} | {_ratio(ours, peer)} |")
    ablation = [c for c in r if c.loop == "before"]
    if ablation:
        columns = [v for v in (*ABLATION, "all", "all+cuda_graphs") if any(c.loop == v for c in r)]
        lines += ["", f"### Each option's own effect (batch {args.ablation_batch}; images/s, and vs `before`)", ""]
        lines += ["| pair | method | precision | " + " | ".join(columns) + " |", "|---" * (3 + len(columns)) + "|"]
        for c in sorted(ablation, key=_order):
            base = r[c]
            cells = []
            for loop in columns:
                value = r.get(Cell(c.teacher, c.student, c.method, c.batch, c.precision, loop))
                cells.append(_rate(value) + ("" if loop == "before" else f" ({_ratio(value, base)})"))
            lines.append(f"| {c.teacher} -> {c.student} | {c.method} | {c.precision} | " + " | ".join(cells) + " |")
    methods = args.methods.split(",")
    if "kd" in methods and len(methods) > 1:
        lines += ["", "### Time per image of each method over KD's (1.00 = no overhead)", ""]
        lines += ["| pair | batch | precision | loop | " + " | ".join(methods) + " |"]
        lines += ["|---" * (4 + len(methods)) + "|"]
        for t, s, _, b, p in sorted({k for k in keys if k[2] == "kd"}, key=_order):
            for loop in ("peer", "all", "all+cuda_graphs"):
                kd = r.get(Cell(t, s, "kd", b, p, loop))
                if kd:
                    times = [_ratio(kd, r.get(Cell(t, s, m, b, p, loop))) for m in methods]
                    lines.append(f"| {t} -> {s} | {b} | {p} | {loop} | " + " | ".join(times) + " |")
    cl = [c for c in r if c.loop == "all+channels_last"]
    if cl:
        lines += ["", "### bf16 + channels_last vs fp32 (ours, all options)", ""]
        lines += ["| pair | method | batch | fp32 | bf16 | bf16 + channels_last | vs fp32 |", "|---" * 7 + "|"]
        for c in sorted(cl, key=_order):
            fp32 = r.get(Cell(c.teacher, c.student, c.method, c.batch, "fp32", "all"))
            bf16 = r.get(Cell(c.teacher, c.student, c.method, c.batch, "bf16", "all"))
            lines.append(
                f"| {c.teacher} -> {c.student} | {c.method} | {c.batch} | {_rate(fp32)} | {_rate(bf16)} | "
                f"{_rate(r[c])} | {_ratio(r[c], fp32)} |"
            )
    return "\n".join(lines) + "\n"


def _machine(device: str) -> str:

    import torch

    version = f"torch {torch.__version__}"
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, {version} (CUDA {torch.version.cuda})"
    from pipeline.artifacts.machine import describe_cpu

    return f"CPU: {describe_cpu(torch.get_num_threads())}, {version}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny CPU pass (1 thread, small pair, batch 32)")
    parser.add_argument("--pairs", default="resnet32x4:ShuffleV1,resnet32x4:resnet8x4", help="teacher:student,...")
    parser.add_argument("--methods", default="kd,kdiffusion")
    parser.add_argument("--batches", default="64,256", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--variants", default=",".join(["peer", *VARIANTS]), help="loops to time (peer and VARIANTS)")
    parser.add_argument("--ablation-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch at batch 64 (fewer at larger)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the peer and `before` loops")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell (the table gives the median)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown tables here")
    args = parser.parse_args()
    import torch

    if args.quick:
        args.device = args.device or "cpu"
        args.pairs, args.batches, args.precisions, args.ablation_batch = "resnet20:resnet20", [32], "fp32", 32
        args.steps, args.workers = args.steps or 4, 0
        torch.set_num_threads(1)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base_steps = args.steps or 40
    steps = {b: max(4, base_steps * 64 // b) for b in args.batches}
    setup = Setup(args.device, steps, args.workers)
    cells = plan(args)
    print(f"{len(cells)} runs on {_machine(args.device)}", file=sys.stderr)
    started = time.perf_counter()

    def write() -> str:
        header = (
            f"## {_machine(args.device)}\n\n{time.strftime('%Y-%m-%d')}; steps per epoch {steps}, DataLoader "
            f"workers {args.workers} (peer and `before`), second epoch of {setup.epochs}, median of "
            f"{args.repeats} run(s) per cell, interleaved; {sum(map(len, setup.runs.values()))} of "
            f"{len(cells) * args.repeats} runs in {time.perf_counter() - started:.0f} s"
        )
        text = report(setup, args, header)
        if args.out:  # after every cell, so a run cut short by a time limit still leaves its table
            args.out.write_text(text)
            raw = [{**cell.__dict__, "images_per_s": rates} for cell, rates in setup.runs.items()]
            args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
        return text

    # Repeats alternate the order, so that load from other work on the machine hits every loop alike.
    for repeat in range(args.repeats):
        for cell in cells if repeat % 2 == 0 else reversed(cells):
            tic = time.perf_counter()
            try:
                rate = (measure_peer if cell.loop == "peer" else measure_ours)(setup, cell)
            except Exception as exc:  # one failing option (e.g. a compile error) must not cost the whole table
                print(f"FAILED {cell}: {type(exc).__name__}: {str(exc)[:500]}", file=sys.stderr)
                continue
            setup.runs.setdefault(cell, []).append(rate)
            setup.results[cell] = statistics.median(setup.runs[cell])
            print(f"{cell}: {rate:.1f} images/s ({time.perf_counter() - tic:.1f} s)", file=sys.stderr)
            write()
    print(write())


if __name__ == "__main__":
    main()
