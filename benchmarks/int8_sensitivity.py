"""Where an exported INT8 model departs from its fp32 model: SQNR of every tensor, in graph order.

For each activation the INT8 model computes, two figures against the fp32 model run on the same test images:

- ``int8 vs fp32``: the INT8 model's tensor against the fp32 model's (all the quantization error so far);
- ``own Q/DQ``: the fp32 tensor against its own quantize-dequantize (what this tensor's scale alone costs).

Where ``int8 vs fp32`` first drops is where to look. If every tensor's own Q/DQ is fine (30-40 dB) and the
drop is gradual, the error accumulates with depth and the network amplifies it: calibration cannot fix that,
quantization-aware training or another precision can. A sharp drop just after one tensor is its range: one
large channel sets a per-tensor scale that zeroes the others (that tensor's own SQNR, dominated by the large
channel, can stay high), which a calibration method or keeping that node in fp32 can fix.

Usage: python benchmarks/int8_sensitivity.py RUN_FOLDER [--images 256] [--preset P] [--set K=V ...] [--all]
(the test split of the data the run's export recorded, unless --preset / --set name another)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.config import DataConfig, from_dict, load_config
from pipeline.data import load_data


def sensitivity(fp32: Path, int8: Path, batches: list[np.ndarray]) -> list[tuple[str, str, float, float]]:
    """(tensor, op, SQNR int8 vs fp32, SQNR of its own Q/DQ) in dB, in the fp32 graph's order."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    graph = onnx.load(fp32).graph
    name = graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds: Iterator[dict] = iter([{name: b} for b in batches])

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as tmp:
        outputs = []
        for model in (fp32, int8):
            augmented = Path(tmp) / f"{model.stem}.augmented.onnx"
            modify_model_output_intermediate_tensors(str(model), str(augmented))
            outputs.append(collect_activations(str(augmented), Reader()))
    errors = compute_activation_error(create_activation_matching(outputs[1], outputs[0]))
    nan = float("nan")
    rows = [
        (tensor, node.op_type, errors[tensor].get("xmodel_err", nan), errors[tensor].get("qdq_err", nan))
        for node in graph.node
        for tensor in node.output
        if tensor in errors
    ]
    for out in graph.output:  # the logits carry no Q/DQ of their own: compare them directly
        reference, quantized = (np.concatenate(o[out.name]) for o in outputs)
        rows.append((out.name, "output", sqnr(reference, quantized), nan))
    return rows


def sqnr(reference: np.ndarray, other: np.ndarray) -> float:
    noise = float(((reference - other) ** 2).sum())
    return float("inf") if noise == 0 else 10 * float(np.log10((reference**2).sum() / noise))


def run_data(run: Path, preset: str | None, overrides: list[str]) -> DataConfig:
    """The data the run's export was made on (its manifest's ``data`` parameters), unless ``--preset`` or ``--set``
    say otherwise; the default preset's for a run without an export manifest."""
    cfg = load_config(preset or "default", None, overrides)
    manifest = run / "export" / "manifest.json"
    if preset or overrides or not manifest.is_file():
        return cfg.data
    recorded = json.loads(manifest.read_text()).get("params", {}).get("data", {})
    return from_dict(DataConfig, {**dataclasses.asdict(cfg.data), **recorded}, "data")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--images", type=int, default=256, help="test images (default 256)")
    parser.add_argument("--preset", default=None, help="the data's preset (default: the run's export manifest)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--all", action="store_true", help="every tensor, not only the stage boundaries")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fp32, int8 = args.run / "export" / "model.onnx", args.run / "export" / "model.int8.onnx"
    if not (fp32.is_file() and int8.is_file()):
        raise SystemExit(f"{args.run}: no export/model.onnx and export/model.int8.onnx (run the export with int8)")
    test = load_data(run_data(args.run, args.preset, args.overrides)).dataset("test")
    count = min(args.images, len(test))
    images = torch.stack([test[i][0] for i in range(count)]).numpy()
    rows = sensitivity(fp32, int8, [images[i : i + 32] for i in range(0, count, 32)])
    boundary = {0, 1, 2, 3, len(rows) - 2, len(rows) - 1}  # the stem, each residual sum, features, logits
    shown = rows if args.all else [r for i, r in enumerate(rows) if i in boundary or r[1] == "Add"]
    print(f"{args.run}: {count} test images, SQNR in dB (higher is closer)\n")
    print("| tensor | op | int8 vs fp32 | own Q/DQ |\n|---|---|---:|---:|")
    for tensor, op, cross, own in shown:
        print(f"| {tensor} | {op} | {cross:.1f} | {own:.1f} |")
    owns = [own for *_, own in rows if np.isfinite(own)]
    print(
        f"\nown Q/DQ: {min(owns):.1f} to {max(owns):.1f} dB; int8 vs fp32: {rows[0][2]:.1f} dB after the first "
        f"layer, {rows[-2][2]:.1f} dB before the classifier, {rows[-1][2]:.1f} dB at the logits"
    )


if __name__ == "__main__":
    main()
