"""The verify stage's gates against float error: a fused model is held to the fixed tolerances, or to a few times
the trained model's own fp32 error (measured against float64) where that is larger, so an ill-conditioned network
fused correctly passes and a wrong fusion of it still fails."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.artifacts.checks import Check
from pipeline.compare import diff_stats, magnitude
from pipeline.reparam.fold import fold_batchnorm
from stages.support.kit import batched_logits
from stages.verify import ROUNDING_CAP, ROUNDING_FACTOR, fp32_rounding, rounding_floors

CPU = torch.device("cpu")


def _gate(reference, candidate, floors=None):
    stats = diff_stats(reference, candidate)
    floor = (floors or {}).get("max_abs")
    return Check.scaled(
        "m", "max", stats["max_abs"], "fuse.logits_max_abs", "fuse.logits_rtol", magnitude(reference), floor
    )


def _ill_conditioned() -> tuple[nn.Module, torch.Tensor]:
    """BatchNorms that subtract a large running mean and divide by a tiny variance: activations near 1e3 cancel to a
    few units, so fp32 keeps few of their digits, folded or not (as random-weight EfficientNetV2 logits do)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, eps=1e-7), nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8, eps=1e-7), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip
    images = torch.rand(16, 3, 16, 16) + 50
    with torch.no_grad():
        model[0].weight.abs_()
        for bn in (model[1], model[4]):
            bn.running_var.fill_(1e-4)
        hidden = model[0](images)
        model[1].running_mean.copy_(hidden.mean((0, 2, 3)))
        model[4].running_mean.copy_(model[3](model[2](model[1](hidden))).mean((0, 2, 3)))
    return model.eval(), images


def test_a_well_conditioned_model_keeps_the_fixed_gates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 5))
    images = torch.randn(8, 3, 16, 16)
    reference = batched_logits(model, images, CPU)
    rounding = fp32_rounding(model, images, CPU, reference)
    assert 0 < rounding["max_abs"] < 1e-5 and rounding["rel_fro"] < 1e-6
    floors = rounding_floors(rounding, magnitude(reference))
    assert _gate(reference, reference + 2e-4, floors).passed is False  # the fixed 1e-4 gate still decides
    assert _gate(reference, reference + 2e-4, floors).detail.startswith("(atol")


def test_an_ill_conditioned_model_fused_correctly_passes_and_a_wrong_fusion_fails():
    model, images = _ill_conditioned()
    fused = fold_batchnorm(model)
    reference, candidate = batched_logits(model, images, CPU), batched_logits(fused, images, CPU)
    rounding = fp32_rounding(model, images, CPU, reference)
    floors = rounding_floors(rounding, magnitude(reference))
    assert _gate(reference, candidate).passed is False  # the fixed gate alone: a false alarm
    check = _gate(reference, candidate, floors)
    assert check.passed and "trained model's own fp32 error" in check.detail
    assert check.threshold == ROUNDING_FACTOR * rounding["max_abs"]
    with torch.no_grad():
        fused[-1].bias[0] += 50 * rounding["max_abs"]  # a wrong fusion, well above the float error
    assert _gate(reference, batched_logits(fused, images, CPU), floors).passed is False


def test_a_model_without_float64_kernels_has_no_floor():
    class Float32Only(nn.Module):
        def forward(self, x):
            if x.dtype != torch.float32:
                raise RuntimeError("expected scalar type Float")
            return x.flatten(1)

    images = torch.randn(2, 3, 4, 4)
    assert fp32_rounding(Float32Only(), images, CPU, images.flatten(1)) is None
    assert rounding_floors(None, 1.0) == {}


def test_the_floor_is_capped_where_fp32_cannot_represent_the_model():
    floors = rounding_floors({"max_abs": 30.0, "rel_fro": 0.5}, scale=100.0)
    assert floors["max_abs"].value == ROUNDING_CAP * 100.0 and floors["rel_fro"].value == ROUNDING_CAP
    assert "capped" in floors["rel_fro"].why
    reference = torch.full((2, 3), 100.0)
    assert _gate(reference, reference + 5.0, floors).passed is False
