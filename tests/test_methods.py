"""Every distillation method: finite, trainable, correct at its fixed points, and export-clean.

The shared pair is a resnet20 teacher (3 stages, residual-sum taps) and a mobile_half student (4 stages,
other channel counts and sizes), so the connectors, stage pairing and spatial matching are all exercised.
Inputs are 16 px to keep the suite fast; the zoo's models are fully convolutional.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.distill import METHODS, build_distiller, method_names
from pipeline.distill.at import at_loss
from pipeline.distill.dkd import dkd_parts
from pipeline.distill.features import aligned_pairs, bn_before_taps, match_spatial
from pipeline.distill.kd import kd_loss
from pipeline.distill.ofd import bn_margin
from pipeline.distill.reviewkd import hcl_loss
from pipeline.errors import ConfigError
from pipeline.models import build_model
from pipeline.reparam import fuse_model

CLASSES = 5
BATCH = 8
SAMPLES = 64
METHOD_NAMES = [name for name in method_names() if name != "vanilla"]
SMALL = {"crd": {"nce_k": 64}}  # a small bank keeps the test fast; the defaults are checked elsewhere


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_model("resnet20", CLASSES).eval()


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 16, 16, generator=gen)
    targets = torch.arange(BATCH) % CLASSES
    indices = torch.randperm(SAMPLES, generator=gen)[:BATCH]
    return images, targets, indices


def make(name: str, teacher: nn.Module, student: nn.Module | None = None, **args):
    torch.manual_seed(0)
    student = student if student is not None else build_model("mobile_half", CLASSES)
    distiller = build_distiller(name, student, teacher, {**SMALL.get(name, {}), **args}, num_samples=SAMPLES)
    distiller.set_progress(1000.0)  # past every warm-up
    return distiller


def step(distiller, batch):
    images, targets, indices = batch
    extra = (indices,) if distiller.needs_indices else ()
    return distiller(images, targets, *extra)


def distill_term(losses: dict) -> torch.Tensor:
    return sum(v for k, v in losses.items() if k != "ce")


def test_registry_has_every_baseline():
    assert set(method_names()) >= {"vanilla", "kd", "fitnet", "at", "vid", "ofd", "reviewkd", "crd", "dkd"}


@pytest.mark.accuracy
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_loss_is_finite_and_decreases_on_a_fixed_batch(name, teacher, batch):
    distiller = make(name, teacher).train()
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-3)
    values = []
    for _ in range(6):
        _, losses = step(distiller, batch)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        values.append(distill_term(losses).item())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert values[-1] < values[0], values


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_gradients_reach_every_method_parameter_and_never_the_teacher(name, teacher, batch):
    distiller = make(name, teacher).train()
    _, losses = step(distiller, batch)
    sum(losses.values()).backward()
    own = {n: p for n, p in distiller.named_parameters() if not n.startswith("student.")}
    for n, p in own.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient reaches {n}"
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert all(id(p) in trainable for p in own.values())
    assert all(p.grad is not None for p in distiller.student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not any(n.startswith("teacher") for n in distiller.state_dict())
    assert not teacher.training


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_channels_last_changes_no_method_beyond_float_rounding(name, teacher, batch):
    """channels_last is the CPU default (``training.channels_last=auto``) and stays out of the fingerprints, so
    every method must give the same losses and gradients in that layout as in the contiguous one, to float rounding.

    Rounding here is not tiny: against a float64 reference, the gradients of this pair are off by 1e-5 to 5e-3
    (relative norm) through oneDNN's contiguous kernels and by 2e-3 to 1.2e-2 through the channels_last ones, as
    PyTorch's own kernels are (mkldnn off: 1.8e-2 contiguous, for mobile_half at batch 64). A layout mistake (a
    view or permute that reads NHWC as NCHW) is off by order 1, hence the bound of 0.1.
    """
    images, targets, indices = batch
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        distiller = make(name, copy.deepcopy(teacher)).train().to(memory_format=layout)
        conv = next(m for m in distiller.student.modules() if isinstance(m, nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=layout)
        _, losses = step(distiller, (images.contiguous(memory_format=layout), targets, indices))
        sum(losses.values()).backward()
        grads = [p.grad for p in distiller.trainable_parameters() if p.grad is not None]
        results.append(({k: v.detach() for k, v in losses.items()}, grads))
    (losses, grads), (losses_cl, grads_cl) = results
    assert losses.keys() == losses_cl.keys() and len(grads) == len(grads_cl)
    for key in losses:
        torch.testing.assert_close(losses_cl[key], losses[key], rtol=1e-4, atol=1e-5)
    differences = sum(float((a - b).double().pow(2).sum()) for a, b in zip(grads_cl, grads))
    assert math.sqrt(differences / sum(float(g.double().pow(2).sum()) for g in grads)) < 0.1


@pytest.mark.parametrize("name", ["kd", "kdiffusion"])
@pytest.mark.parametrize("move", ["double", "to"])
def test_the_unregistered_teacher_follows_every_move_of_the_distiller(name, move, batch):
    """cuda(), cpu(), double() and to() must all carry the teacher, which is not a submodule."""
    distiller = make(name, build_model("resnet20", CLASSES))
    distiller.double() if move == "double" else distiller.to(torch.float64)
    assert {p.dtype for p in distiller.teacher.parameters()} == {torch.float64}
    images, targets, _ = batch
    _, losses = distiller(images.double(), targets)
    assert torch.isfinite(sum(losses.values()))


def _identity_connectors(distiller):
    if hasattr(distiller, "regressor"):
        distiller.regressor = nn.Identity()
    if hasattr(distiller, "connectors"):
        distiller.connectors = nn.ModuleList(nn.Identity() for _ in distiller.connectors)


@pytest.mark.parametrize("name", ["kd", "dkd", "fitnet", "at", "ofd"])
def test_distillation_loss_is_zero_when_the_student_is_the_teacher(name, teacher, batch):
    distiller = make(name, teacher, student=copy.deepcopy(teacher).requires_grad_(True))
    _identity_connectors(distiller)
    distiller.eval()  # the student's BatchNorms then compute what the teacher's do
    _, losses = step(distiller, batch)
    assert distill_term(losses).item() == pytest.approx(0.0, abs=1e-6)
    distiller.train()
    _, losses = step(distiller, batch)
    assert distill_term(losses).item() > 1e-4  # batch statistics differ from running ones: not trivially zero


@pytest.mark.slow  # 66 s here (2 CPU cores, one thread)
@pytest.mark.accuracy
def test_exported_students_have_exactly_the_vanilla_parameters(tmp_path, tiny_cfg):
    """train + fuse through the runner for every method; both artifacts match the vanilla student's."""
    from pipeline.artifacts.checkpoint import read_meta
    from pipeline.cli.runner import run_stages
    from pipeline.config import load_config
    from tests.conftest import TINY

    extra = ["data.synthetic.train_size=64", "data.synthetic.test_size=32", "data.val_fraction=0.0"]
    logs: list[str] = []
    cfg = load_config("default", None, [*TINY, *extra])
    run_stages(cfg, tmp_path, ("teacher",), log=logs.append)
    vanilla = build_model(cfg.student.arch, cfg.data.num_classes)
    train_ref = {k: v.shape for k, v in vanilla.state_dict().items()}
    fused_ref = {k: v.shape for k, v in fuse_model(vanilla).state_dict().items()}
    for name in method_names():
        args = {"crd": "{nce_k: 32}", "ofd": "{teacher_bn_train: true}"}.get(name, "{}")
        cfg = load_config("default", None, [*TINY, *extra, f"student.method={name}", f"student.method_args={args}"])
        outcomes = run_stages(cfg, tmp_path, ("train", "fuse"), log=logs.append)
        assert [o.manifest.status for o in outcomes] == ["ok", "ok"], name
        trained = load_file(str(tmp_path / "train" / "student.safetensors"))
        fused = load_file(str(tmp_path / "fuse" / "student_fused.safetensors"))
        assert {k: v.shape for k, v in fused.items()} == fused_ref, name
        if read_meta(tmp_path / "train" / "student.safetensors").reparam:
            continue  # trains extra branches inside the student (KDiffusion); only the fused form is vanilla
        assert {k: v.shape for k, v in trained.items()} == train_ref, name
        metrics = outcomes[0].manifest.metrics
        assert metrics["train_parameters"] == metrics["vanilla_parameters"], name
    assert any("teacher_bn_train=True" in line for line in logs)


# --- method-specific behaviour -------------------------------------------------------------------


def test_vid_variance_is_a_registered_trained_saved_parameter(teacher, batch):
    distiller = make("vid", teacher).train()
    names = [n for n, _ in distiller.named_parameters() if n.endswith("raw_variance")]
    assert len(names) == len(distiller.regressors) == 3
    state = distiller.state_dict()
    assert all(n in state for n in names)
    q = distiller.regressors[0]
    assert torch.allclose(q.variance(), torch.full_like(q.variance(), 5.0))
    before = q.raw_variance.detach().clone()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    _, losses = step(distiller, batch)
    sum(losses.values()).backward()
    optimizer.step()
    assert not torch.equal(before, q.raw_variance.detach())
    fresh = make("vid", teacher)
    fresh.load_state_dict(distiller.state_dict())
    assert torch.equal(fresh.regressors[0].raw_variance, q.raw_variance)


def test_crd_memory_bank_is_state_and_moves_only_at_the_batch(teacher, batch):
    distiller = make("crd", teacher).train()
    images, targets, indices = batch
    state = distiller.state_dict()
    assert {"memory_s", "memory_t", "labels", "z"} <= set(state)
    assert state["memory_s"].shape == (SAMPLES, 128)
    before = distiller.memory_s.clone()
    step(distiller, batch)
    changed = (distiller.memory_s != before).any(1)
    assert changed[indices].all() and changed.sum() == len(indices)
    assert torch.allclose(distiller.memory_s[indices].norm(dim=1), torch.ones(len(indices)))
    assert torch.equal(distiller.labels[indices], targets)
    assert (distiller.z > 0).all()
    fresh = make("crd", teacher)
    fresh.load_state_dict(distiller.state_dict())
    for key in ("memory_s", "memory_t", "labels", "z"):
        assert torch.equal(getattr(fresh, key), getattr(distiller, key))
    with pytest.raises(ValueError, match="index"):
        distiller(images, targets)


def test_crd_negatives_avoid_the_anchor_class_once_labels_are_known(teacher):
    distiller = make("crd", teacher, nce_k=256)
    distiller.labels.copy_(torch.arange(SAMPLES) % CLASSES)
    targets = torch.arange(BATCH) % CLASSES
    picks = distiller._negatives(targets)
    assert picks.shape == (BATCH, 256)
    assert not (distiller.labels[picks] == targets[:, None]).any()


def test_crd_defaults_are_the_benchmark_ones(teacher):
    distiller = build_distiller("crd", build_model("resnet20", CLASSES), teacher, {}, num_samples=SAMPLES)
    assert (distiller.nce_k, distiller.nce_t, distiller.nce_m, distiller.crd_weight) == (16384, 0.07, 0.5, 0.8)


def test_dkd_parts_recompose_kd():
    """The DKD paper's identity: KD = TCKD + (1 - p_target^teacher) NCKD, per sample."""
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(6, 7, generator=gen) * 3, torch.randn(6, 7, generator=gen) * 3
    targets = torch.randint(0, 7, (6,), generator=gen)
    t = 4.0
    tckd, nckd = dkd_parts(student, teacher, targets, t)
    p_target = torch.softmax(teacher / t, 1).gather(1, targets[:, None]).squeeze(1)
    kd = torch.stack([kd_loss(student[i : i + 1], teacher[i : i + 1], t) for i in range(6)])
    assert torch.allclose(tckd + (1 - p_target) * nckd, kd, atol=1e-5)


def test_dkd_and_reviewkd_warm_up_linearly(teacher, batch):
    for name, keys in (("dkd", ("tckd", "nckd")), ("reviewkd", ("review",))):
        distiller = make(name, teacher).eval()
        values = {}
        for progress in (0.0, 5.0, 20.0, 40.0):
            distiller.set_progress(progress)
            _, losses = step(distiller, batch)
            values[progress] = sum(losses[k] for k in keys).item()
        assert values[0.0] == 0.0
        assert values[5.0] == pytest.approx(values[20.0] / 4, rel=1e-4)
        assert values[40.0] == pytest.approx(values[20.0], rel=1e-5)


def test_at_is_scale_invariant_and_pools_to_the_smaller_map():
    feat = torch.randn(2, 4, 8, 8)
    assert at_loss(feat, 3 * feat, 2.0).item() == pytest.approx(0.0, abs=1e-9)
    pooled, same = match_spatial(torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4))
    assert pooled.shape[-2:] == same.shape[-2:] == (4, 4)


def test_hcl_of_a_constant_offset_is_its_square():
    student = torch.randn(2, 3, 8, 8)
    assert hcl_loss(student, student).item() == 0.0
    assert hcl_loss(student + 0.5, student).item() == pytest.approx(0.25, rel=1e-5)


def test_ofd_finds_the_batchnorm_before_each_pre_relu_tap():
    expected = {
        "resnet20": ["layer1.2.bn2", "layer2.2.bn2", "layer3.2.bn2"],
        "resnet8x4": ["layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"],  # not the projection shortcut's BN
        "wrn_16_2": ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"],
        "vgg8": ["block2.1", "block3.1", "block4.1"],
        "mobile_half": ["blocks.1.1.conv.7", "blocks.2.2.conv.7", "blocks.4.2.conv.7", "conv2.1"],
    }
    for arch, names in expected.items():
        model = build_model(arch, CLASSES)
        by_module = {m: n for n, m in model.named_modules()}
        assert [by_module[bn] for bn in bn_before_taps(model, model.info.stages)] == names, arch
    shuffle = build_model("ShuffleV2", CLASSES)
    with pytest.raises(ConfigError, match="no BatchNorm produces the tap"):
        bn_before_taps(shuffle, shuffle.info.stages)


def test_ofd_margin_is_the_expected_negative_response():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 5.0]))
    margin = bn_margin(bn)

    def truncated_mean(m: float, s: float) -> float:
        cdf = 0.5 * (1 + math.erf(-m / s / math.sqrt(2)))
        return m - s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf

    assert margin[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)
    assert margin[1].item() == pytest.approx(truncated_mean(-1.0, 2.0), rel=1e-6)
    assert margin[2].item() == pytest.approx(-3.0)  # P(x < 0) = 3e-7: the -3 sigma fallback


def test_ofd_train_mode_teacher_bn_leaves_the_teacher_untouched(teacher, batch):
    eval_mode = make("ofd", teacher).train()
    batch_stats = make("ofd", teacher, teacher_bn_train=True).train()
    assert batch_stats.notes() and not eval_mode.notes()
    running = {k: v.clone() for k, v in teacher.state_dict().items()}
    _, a = step(eval_mode, batch)
    _, b = step(batch_stats, batch)
    assert a["ofd"].item() != pytest.approx(b["ofd"].item())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in running.items())
    assert not any(m.training for m in teacher.modules())


def test_aligned_pairs_match_from_the_deep_end():
    assert aligned_pairs(4, 3) == [(1, 0), (2, 1), (3, 2)]
    assert aligned_pairs(3, 4) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("fitnet", {"hint_stage": 7}, "hint_stage must index"),
        ("fitnet", {"hint_layer": 2}, "has no option 'hint_layer'"),
        ("crd", {"num_samples": 5}, "has no option 'num_samples'"),
        ("crd", {"nce_t": 0}, r"option nce_t must be in \(0, 10000\]"),
        ("vid", {"init_variance": 0.0}, r"option init_variance must be in \(0, 1e\+06\]"),
        ("vid", {"init_variance": 1e-6}, "init_variance > eps"),
    ],
)
def test_bad_options_are_config_errors(name, args, message, teacher):
    with pytest.raises(ConfigError, match=message):
        build_distiller(name, build_model("resnet20", CLASSES), teacher, args, num_samples=SAMPLES)


def test_crd_needs_the_training_set_size(teacher):
    with pytest.raises(ConfigError, match="training set's size"):
        build_distiller("crd", build_model("resnet20", CLASSES), teacher, {})
    assert METHODS.get("crd").needs_indices and not METHODS.get("kd").needs_indices
