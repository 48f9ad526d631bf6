"""Inference speed of the exported student, and the export stage's wall time.

Measures, on this machine and in one run (so ratios compare like with like):

1. batch-1 latency (p50 / p90 / p99) and batch-32 throughput of PyTorch eager (the trained, unfused
   student and the fused one) and ONNX Runtime on the CPU with the fp32, fp16 and INT8 ONNX (INT8 for
   TensorRT, the symmetric Q/DQ artifact, and INT8 for the ONNX Runtime CPU, U8S8), all with the same
   number of threads. Backends are interleaved round by round so that a load change on a shared machine
   hits all of them alike; each round starts with a warm-up.
2. With a CUDA GPU: ONNX Runtime's CUDA provider, and TensorRT when it is installed.
3. The export stage's wall time on the default preset (export-only path, fresh run folder), cold (empty
   calibration cache) and warm (cache hit), plus the fp32 ONNX export alone.

Usage:
    python benchmarks/bench_export.py --run runs/default [--threads 2] [--rounds 5] [--json out.json]

``--run`` is a finished ``python -m pipeline run all`` folder (its train and fuse stages are read).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from exports.runners import OnnxrtRunner
from pipeline.artifacts.machine import describe_cpu
from pipeline.cli.runner import run_stages
from pipeline.config import load_config
from pipeline.models.loading import load_model
from stages.export import ONNX_FILES


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def torch_runner(model: torch.nn.Module):
    model.eval()

    @torch.inference_mode()
    def run(x: np.ndarray) -> None:
        model(torch.from_numpy(x))

    return run


def ort_runner(path: Path, threads: int, provider: str = "CPUExecutionProvider"):
    runner = OnnxrtRunner(path, provider, threads)
    runner.activate()  # held for the whole benchmark; the session is timed directly, without the runner's checks
    session, name = runner.session, runner.input_names[0]

    def run(x: np.ndarray) -> None:
        session.run(None, {name: x})

    return run


def measure(runners: dict, size: int, rounds: int, iters1: int, iters32: int) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    x32 = rng.standard_normal((32, 3, size, size)).astype(np.float32)
    lat = {name: [] for name in runners}
    thr = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(10):  # warm-up
                run(x1)
            run(x32)
            for _ in range(iters1):
                tic = time.perf_counter()
                run(x1)
                lat[name].append(time.perf_counter() - tic)
            tic = time.perf_counter()
            for _ in range(iters32):
                run(x32)
            thr[name].append(32 * iters32 / (time.perf_counter() - tic))
    return {name: {**percentiles(lat[name]), "batch32_img_s": float(np.median(thr[name]))} for name in runners}


def time_export_stage(checkpoint: Path) -> dict[str, float]:
    """The export stage of the default preset on ``checkpoint``, twice: empty then warm calibration cache."""
    cfg = load_config("default", None, [f"export.checkpoint={json.dumps(str(checkpoint))}"])
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        for label in ("cold", "warm"):
            tic = time.perf_counter()
            run_stages(cfg, Path(tmp) / "run", ["export"], force=True, log=lambda _: None)
            out[f"export_stage_{label}_s"] = time.perf_counter() - tic
    out["precisions"] = "+".join(cfg.export.precisions)
    return out


def time_onnx_export(checkpoint: Path) -> float:
    from exports.onnx_export import export_onnx

    model, meta = load_model(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        export_onnx(model, Path(tmp) / "m.onnx", meta.input_size, 18, True)
        return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="finished run folder (train, fuse stages)")
    parser.add_argument("--threads", type=int, default=2, help="threads for PyTorch and ONNX Runtime alike")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters1", type=int, default=100, help="batch-1 calls per backend per round")
    parser.add_argument("--iters32", type=int, default=5, help="batch-32 calls per backend per round")
    parser.add_argument("--skip-export-timing", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    unfused, meta = load_model(args.run / "train" / "student.safetensors")
    fused_path = args.run / "fuse" / "student_fused.safetensors"
    fused, _ = load_model(fused_path)

    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        cfg = load_config(
            "default",
            None,
            [f"export.checkpoint={json.dumps(str(fused_path))}", "export.precisions=[fp32,fp16,int8]"],
        )
        run_stages(cfg, Path(tmp) / "trt", ["export"], log=lambda _: None)
        cpu_cfg = load_config(
            "default",
            None,
            [
                f"export.checkpoint={json.dumps(str(fused_path))}",
                "export.precisions=[fp32,int8]",
                "export.int8_target=cpu",
            ],
        )
        run_stages(cpu_cfg, Path(tmp) / "cpu", ["export"], log=lambda _: None)
        folder = Path(tmp) / "trt" / "export"
        runners = {
            "pytorch eager, unfused": torch_runner(unfused),
            "pytorch eager, fused": torch_runner(fused),
            "ORT CPU fp32": ort_runner(folder / ONNX_FILES["fp32"], args.threads),
            "ORT CPU fp16": ort_runner(folder / ONNX_FILES["fp16"], args.threads),
            "ORT CPU int8 (TensorRT Q/DQ)": ort_runner(folder / ONNX_FILES["int8"], args.threads),
            "ORT CPU int8 (CPU U8S8)": ort_runner(Path(tmp) / "cpu" / "export" / ONNX_FILES["int8"], args.threads),
        }
        if torch.cuda.is_available():
            import onnxruntime as ort

            if "CUDAExecutionProvider" in ort.get_available_providers():
                runners["ORT CUDA fp32"] = ort_runner(
                    folder / ONNX_FILES["fp32"], args.threads, "CUDAExecutionProvider"
                )
                runners["ORT CUDA fp16"] = ort_runner(
                    folder / ONNX_FILES["fp16"], args.threads, "CUDAExecutionProvider"
                )
        results = measure(runners, meta.input_size, args.rounds, args.iters1, args.iters32)

    base = results["pytorch eager, fused"]
    for row in results.values():
        row["speedup_b1_vs_eager_fused"] = base["p50_ms"] / row["p50_ms"]
        row["speedup_b32_vs_eager_fused"] = row["batch32_img_s"] / base["batch32_img_s"]
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_cpu(),
        "threads": args.threads,
        "student": meta.arch,
        "input_size": meta.input_size,
        "torch": torch.__version__,
        "results": results,
    }
    if not args.skip_export_timing:
        report["onnx_export_s"] = time_onnx_export(fused_path)
        report.update(time_export_stage(fused_path))

    print(f"{'backend':32s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'b32 img/s':>10s} {'b1 x':>6s} {'b32 x':>6s}")
    for name, r in results.items():
        print(
            f"{name:32s} {r['p50_ms']:8.3f} {r['p90_ms']:8.3f} {r['p99_ms']:8.3f} {r['batch32_img_s']:10.0f} "
            f"{r['speedup_b1_vs_eager_fused']:6.2f} {r['speedup_b32_vs_eager_fused']:6.2f}"
        )
    for key in ("onnx_export_s", "export_stage_cold_s", "export_stage_warm_s", "precisions"):
        if key in report:
            print(f"{key}: {report[key]}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
