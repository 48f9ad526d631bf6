"""Why a distillation loss overwhelms cross-entropy: per-term values and gradient norms on one batch.

For a trained teacher and a fresh student (the state every run starts from), on one batch of the
recipe's training images, prints for each loss term its value and the L2 norm of its gradient on the
student's parameters (what SGD applies, times the LR), beside cross-entropy's:

- AT, per paired stage, with the pipeline's deep-end pairing and with the official codes' pairing
  (RepDistiller / mdistiller zip the stage lists from the shallow end), at the method's weight;
- DKD's TCKD and NCKD at the method's weights (past the warm-up), and KD at its weights, for scale.

Usage:
    python benchmarks/diagnose_losses.py --teacher runs/.../teacher/teacher.safetensors
        [--preset fmnist-wrn_16_2-mobile_half] [--batch 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.artifacts.checkpoint import load_checkpoint
from pipeline.config import load_config
from pipeline.data import load_data
from pipeline.distill.at import AT, at_loss
from pipeline.distill.dkd import DKD, dkd_parts
from pipeline.distill.features import stage_taps, tapped_forward
from pipeline.distill.kd import KD, kd_loss
from pipeline.models import build_model


def defaults(cls) -> dict:
    import inspect

    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if p.default is not p.empty}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--preset", default="fmnist-wrn_16_2-mobile_half")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, None, args.overrides)
    data = load_data(cfg.data, cfg.seed)
    state, meta = load_checkpoint(args.teacher)
    teacher = build_model(meta.arch, meta.num_classes)
    teacher.load_state_dict(state)
    teacher.eval()
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student.arch, data.info.num_classes).train()
    train = data.dataset("train", augment=False)
    batch = [train[i] for i in range(args.batch)]
    images, targets = torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])
    params = [p for p in student.parameters() if p.requires_grad]

    s_taps, t_taps = stage_taps(student, "at"), stage_taps(teacher, "at")
    logits, s_feats = tapped_forward(student, s_taps, images)
    with torch.no_grad():
        t_logits, t_feats = tapped_forward(teacher, t_taps, images)

    def grad_norm(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))

    def show(name: str, loss: torch.Tensor) -> None:
        print(f"| {name} | {float(loss):.4f} | {grad_norm(loss):.4f} |")

    print(
        f"pair {meta.arch} -> {cfg.student.arch}, batch {args.batch} of {data.info.name} training images, "
        f"teacher batch top-1 {float((t_logits.argmax(1) == targets).float().mean()) * 100:.1f}%"
    )
    print("student stages:", [tuple(f.shape[1:]) for f in s_feats])
    print("teacher stages:", [tuple(f.shape[1:]) for f in t_feats])
    print("\n| term | value | grad norm |\n|---|---:|---:|")
    show("CE (weight 1)", F.cross_entropy(logits, targets))
    at_weight, p = defaults(AT)["at_weight"], defaults(AT)["p"]
    n = min(len(s_feats), len(t_feats))
    pairings = {
        "deep-end (this pipeline)": zip(range(len(s_feats) - n, len(s_feats)), range(len(t_feats) - n, len(t_feats))),
        "shallow-end (RepDistiller, mdistiller)": zip(range(n), range(n)),
    }
    for name, pairs in pairings.items():
        total = 0.0
        for i, j in pairs:
            term = at_weight * at_loss(s_feats[i], t_feats[j], p)
            total = total + term
            s_hw, t_hw = tuple(s_feats[i].shape[-2:]), tuple(t_feats[j].shape[-2:])
            show(f"AT x{at_weight:g}, {name}: student {s_hw} / teacher {t_hw}", term)
        show(f"AT x{at_weight:g}, {name}: sum", total)
    kd = defaults(KD)
    kd_term = kd["kd_weight"] * kd_loss(logits, t_logits, kd["temperature"])
    show(f"KD (T={kd['temperature']:g}) x{kd['kd_weight']:g}", kd_term)
    dkd = defaults(DKD)
    tckd, nckd = dkd_parts(logits, t_logits, targets, dkd["temperature"])
    show(f"DKD TCKD x{dkd['alpha']:g}", dkd["alpha"] * tckd.mean())
    show(f"DKD NCKD x{dkd['beta']:g}", dkd["beta"] * nckd.mean())


if __name__ == "__main__":
    main()
