"""timm: and torchvision: models: names, probed taps and sites, KDiffusion end to end, checkpoints, export.

Every model is built with random weights (timm ``pretrained=False``, torchvision ``weights=None``) at 32 px:
nothing is downloaded.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.artifacts.checkpoint import load_state_dict_file
from pipeline.cli import run_cli
from pipeline.cli.runner import validate
from pipeline.config import load_config
from pipeline.distill import build_distiller
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models import build_model, check_model_name, count_parameters
from pipeline.models.hooks import FeatureTaps
from pipeline.models.loading import load_foreign_weights
from pipeline.reparam import fuse_model
from pipeline.reparam.multibranch import MultiBranchConvBN, multibranch_blocks

pytestmark = pytest.mark.accuracy  # verdicts on trained or converted models (CI reruns these under AVX2)

SIZE = 32
CLASSES = 5
TEACHER = "timm:resnet10t"
# (student, expected number of KDiffusion sites): one per family of docs/models.md's table
STUDENTS = [
    ("timm:resnet10t", 3),
    ("timm:mobilenetv2_050", 3),
    ("timm:mobilenetv3_small_050", 3),
    ("timm:efficientnet_b0", 3),
    ("timm:regnetx_002", 3),
    ("timm:repvgg_a0", 3),
    ("timm:mobileone_s0", 3),
    ("torchvision:shufflenet_v2_x0_5", 3),
    ("torchvision:mobilenet_v2", 3),
    ("torchvision:resnet18", 3),
]
SLOW = {"timm:mobileone_s0"}  # over 3 s on 2 CPU cores


def _calibrating(model: nn.Module) -> nn.Module:
    """Cumulative BN statistics, so a few random-init training steps leave sane running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    return model


@torch.no_grad()
def _recalibrated(model: nn.Module) -> nn.Module:
    """Running statistics of the final weights, in eval mode: a random-init net with stale statistics blows its
    activations up until fp32 rounding alone differs between two equal computations."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    generator = torch.Generator().manual_seed(3)
    for _ in range(4):
        model(torch.randn(16, 3, SIZE, SIZE, generator=generator))
    return model.eval()


def _steps(distiller, steps: int = 2) -> dict[str, float]:
    torch.manual_seed(0)
    opt = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9)
    distiller.train()
    for _ in range(steps):
        images, targets = torch.randn(8, 3, SIZE, SIZE), torch.randint(0, CLASSES, (8,))
        _, losses = distiller.losses(images, targets)
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: float(v.detach()) for k, v in losses.items()}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1.0))


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(1)
    return build_model(TEACHER, CLASSES, SIZE).eval()


def test_names_are_checked_with_close_matches():
    check_model_name("timm:resnet18")
    check_model_name("torchvision:shufflenet_v2_x0_5")
    with pytest.raises(ConfigError, match=r"unknown timm model 'resnet5'; close matches: timm:resnet50"):
        check_model_name("timm:resnet5")
    with pytest.raises(ConfigError, match="unknown torchvision model 'resnet19'.*torchvision:resnet18"):
        check_model_name("torchvision:resnet19")
    cfg = load_config("default", None, ["teacher.arch=timm:resnet50", "student.arch=torchvision:mobilenet_v2"])
    validate(cfg)
    with pytest.raises(ConfigError, match="unknown timm model 'mobilenetv3_smal_100'"):
        validate(load_config("default", None, ["student.arch=timm:mobilenetv3_smal_100"]))


def test_input_too_small_for_the_model_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot run torchvision:alexnet on 8 px inputs: .*too small"):
        build_model("torchvision:alexnet", CLASSES, 8)


def test_a_library_assert_on_the_input_size_is_a_config_error():
    # timm's halo attention asserts with an empty message; the line must still say what and where
    with pytest.raises(
        ConfigError,
        match=r"cannot run timm:halonet_h1 on 64 px inputs: AssertionError raised in timm\.layers\.halo_attn ",
    ):
        build_model("timm:halonet_h1", CLASSES, 64)


def test_cli_refuses_unknown_timm_name_in_one_line(capsys):
    assert run_cli(["run", "--set", "student.arch=timm:resnet5", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "close matches: timm:resnet50" in err


def test_describe_lists_taps_and_sites_with_shapes(capsys):
    assert run_cli(["models", "--describe", "timm:mobilenetv3_small_050", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "stage2        blocks (output, nchw)" in out and "blocks.5.0.conv + blocks.5.0.bn1" in out
    assert "teacher head  forward_head" in out and "logits        [100]" in out


@pytest.mark.parametrize(
    "tv_name, zoo_name",
    [
        ("mobilenet_v2", "mobilenet_v2"),
        ("mobilenet_v3_large", "mobilenet_v3_large"),
        ("resnet18", "resnet18"),
        ("shufflenet_v2_x1_0", "shufflenet_v2_x1_0"),
    ],
)
def test_automatic_sites_are_the_zoos_hand_placed_ones(tv_name, zoo_name):
    from pipeline.models import model_info

    found = build_model(f"torchvision:{tv_name}", CLASSES, 64).info.reparam_sites
    declared = model_info(zoo_name).reparam_sites
    assert [(s.conv, s.bn) for s in found] == [(s.conv, s.bn) for s in declared]


def test_build_uses_class_count_input_size_and_no_inplace_activation():
    model = build_model("timm:vit_tiny_patch16_224", CLASSES, SIZE)
    assert model(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, CLASSES)
    assert model.info.input_size == SIZE and model.info.head == "head"
    assert model.info.extra["pretrained_cfg"]["input_size"] == 224
    tv = build_model("torchvision:resnet18", CLASSES, SIZE)
    assert tv.fc.out_features == CLASSES
    assert not any(getattr(m, "inplace", False) for m in tv.modules())


@pytest.mark.parametrize(
    "name, layouts",
    [
        ("timm:vit_tiny_patch16_224", ["nlc", "nlc", "nc"]),
        ("timm:swin_tiny_patch4_window7_224", ["nhwc", "nhwc", "nc"]),
        ("timm:convnext_atto", ["nchw", "nchw", "nchw"]),
    ],
)
def test_transformer_and_layernorm_taps_are_nchw_maps(name, layouts):
    model = build_model(name, CLASSES, SIZE if "swin" not in name else 64).eval()
    size = model.info.input_size
    assert [t.layout for t in model.info.stages] == layouts
    with FeatureTaps(model, {str(i): t for i, t in enumerate(model.info.stages)}) as taps:
        model(torch.zeros(2, 3, size, size))
    assert all(f.dim() == 4 and f.shape[0] == 2 for f in taps.features.values())
    assert model.info.reparam_sites == ()
    assert "no BatchNorm" in model.info.extra["skipped_sites"][0]


@pytest.mark.parametrize(
    "student_name, n_sites", [pytest.param(*s, marks=pytest.mark.slow) if s[0] in SLOW else s for s in STUDENTS]
)
def test_kdiffusion_branches_trains_and_fuses_back_to_the_vanilla_model(teacher, student_name, n_sites):
    torch.manual_seed(0)
    student = _calibrating(build_model(student_name, CLASSES, SIZE))
    vanilla_params = count_parameters(student)
    sites = student.info.reparam_sites
    assert len(sites) == n_sites
    distiller = build_distiller("kdiffusion", student, teacher, {"warmup_epochs": 0})
    assert len(multibranch_blocks(student)) == n_sites
    losses = _steps(distiller)
    assert losses["diff"] > 0 and losses["guided"] >= 0
    fused = fuse_model(_recalibrated(student))
    assert not multibranch_blocks(fused)
    images = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _max_rel(student(images), fused(images)) <= 1e-4
    reference = fuse_model(build_model(student_name, CLASSES, SIZE))
    reference.load_state_dict(fused.state_dict(), strict=True)
    assert set(reference.state_dict()) == set(fused.state_dict())
    assert count_parameters(fused) == count_parameters(reference) <= vanilla_params


def test_repvgg_fusion_composes_with_timms_reparameterize(teacher):
    from timm.utils.model import reparameterize_model

    student = _calibrating(build_model("timm:repvgg_a0", CLASSES, SIZE))
    distiller = build_distiller("kdiffusion", student, teacher, {"warmup_epochs": 0})
    _steps(distiller, 1)
    fused = fuse_model(student.eval())
    timm_deploy = reparameterize_model(build_model("timm:repvgg_a0", CLASSES, SIZE))
    assert set(fused.state_dict()) == set(timm_deploy.state_dict())
    assert not any(isinstance(m, (MultiBranchConvBN, nn.BatchNorm2d)) for m in fused.modules())


def test_branches_inside_a_library_block_with_its_own_fuse_are_restored_first(teacher):
    # timm's RepViT ConvNorm.fuse() reads its own conv and BatchNorm, where KDiffusion put an m-branch block
    torch.manual_seed(0)
    student = _calibrating(build_model("timm:repvit_m1", CLASSES, SIZE))
    distiller = build_distiller("kdiffusion", student, teacher, {"warmup_epochs": 0})
    assert len(multibranch_blocks(student)) == 3
    _steps(distiller, 1)
    fused = fuse_model(_recalibrated(student))
    assert not any(isinstance(m, (MultiBranchConvBN, nn.BatchNorm2d)) for m in fused.modules())
    images = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _max_rel(student(images), fused(images)) <= 1e-4


@pytest.mark.parametrize("teacher_name", ["timm:vit_tiny_patch16_224", "torchvision:resnet18"])
def test_pooled_head_teachers_guide_through_their_classifier(teacher_name):
    torch.manual_seed(0)
    teacher = build_model(teacher_name, CLASSES, SIZE).eval()
    student = _calibrating(build_model("timm:mobilenetv3_small_050", CLASSES, SIZE))
    distiller = build_distiller("kdiffusion", student, teacher, {"warmup_epochs": 0})
    losses = _steps(distiller, 1)
    assert losses["guided"] > 0


def test_kdiffusion_refuses_a_student_without_sites_with_the_reason(teacher):
    student = build_model("timm:convnext_atto", CLASSES, SIZE)
    with pytest.raises(ConfigError, match="declares 0 re-parameterization sites .*no BatchNorm"):
        build_distiller("kdiffusion", student, teacher, {})
    build_distiller("kd", student, teacher, {})  # logit methods still work


@pytest.mark.parametrize("method", ["fitnet", "at", "crd", "reviewkd"])
def test_feature_methods_read_the_probed_taps(teacher, method):
    student = build_model("torchvision:shufflenet_v2_x0_5", CLASSES, SIZE)
    distiller = build_distiller(method, student, teacher, {}, num_samples=16)
    images, targets = torch.randn(4, 3, SIZE, SIZE), torch.randint(0, CLASSES, (4,))
    args = (images, targets, torch.arange(4)) if distiller.needs_indices else (images, targets)
    _, losses = distiller.losses(*args)
    assert all(torch.isfinite(v) for v in losses.values())


# --- checkpoints written by timm's and torchvision's training scripts ---


def _timm_train_checkpoint(model: nn.Module, ema: nn.Module | None = None) -> dict:
    """The dict timm's train.py (CheckpointSaver) saves."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpt = {
        "epoch": 3,
        "arch": "resnet10t",
        "state_dict": model.state_dict(),
        "optimizer": opt.state_dict(),
        "version": 2,
        "args": argparse.Namespace(model="resnet10t", lr=0.1, epochs=4, input_size=None, mean=None),
        "metric": 12.5,
    }
    if ema is not None:
        ckpt["state_dict_ema"] = ema.state_dict()
    return ckpt


def test_timm_train_script_checkpoint_loads_strictly(tmp_path):
    torch.manual_seed(0)
    model = build_model("timm:resnet10t", CLASSES, SIZE)
    path = tmp_path / "last.pth.tar"
    torch.save(_timm_train_checkpoint(model), path)
    fresh = build_model("timm:resnet10t", CLASSES, SIZE)
    load_foreign_weights(fresh, path, CLASSES, "dataset")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_ema_only_and_torchvision_reference_layouts(tmp_path):
    model = build_model("torchvision:resnet18", CLASSES, SIZE)
    ema = torch.optim.swa_utils.AveragedModel(model)
    torch.save({"model_ema": ema.state_dict(), "epoch": 1}, tmp_path / "tv.pth")
    assert set(load_state_dict_file(tmp_path / "tv.pth")) == set(model.state_dict())
    torch.save({"state_dict_ema": model.state_dict()}, tmp_path / "ema.pth")
    assert set(load_state_dict_file(tmp_path / "ema.pth")) == set(model.state_dict())
    compiled = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": compiled, "optimizer": {}, "args": argparse.Namespace(lr=0.5)}, tmp_path / "ddp.pth")
    assert set(load_state_dict_file(tmp_path / "ddp.pth")) == set(model.state_dict())


def test_weights_under_a_wrappers_prefix_are_found(tmp_path):
    """A LightningModule's ``model.`` beside other modules' keys; a distiller's student beside its teacher."""
    torch.manual_seed(0)
    student = build_model("torchvision:resnet18", CLASSES, SIZE)
    teacher = build_model("torchvision:resnet34", CLASSES, SIZE)
    state = {f"model.{k}": v for k, v in student.state_dict().items()} | {"criterion.weight": torch.ones(CLASSES)}
    torch.save({"state_dict": state, "epoch": 3, "pytorch-lightning_version": "2.4.0"}, tmp_path / "pl.ckpt")
    fresh, lines = build_model("torchvision:resnet18", CLASSES, SIZE), []
    load_foreign_weights(fresh, tmp_path / "pl.ckpt", CLASSES, "dataset", lines.append)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in student.state_dict().items())
    assert lines == [f"{tmp_path / 'pl.ckpt'}: loading the 122 weights under 'model.', ignoring 1 other keys"]

    both = {f"student.{k}": v for k, v in student.state_dict().items()}
    torch.save(both | {f"teacher.{k}": v for k, v in teacher.state_dict().items()}, tmp_path / "kd.pth")
    load_foreign_weights(build_model("torchvision:resnet18", CLASSES, SIZE), tmp_path / "kd.pth", CLASSES, "d", print)
    torch.save(both | {f"ema.{k}": v for k, v in student.state_dict().items()}, tmp_path / "same.pth")
    with pytest.raises(CheckpointError, match=r"under several prefixes \(ema\., student\.\)"):
        load_foreign_weights(build_model("torchvision:resnet18", CLASSES, SIZE), tmp_path / "same.pth", CLASSES, "d")
    with pytest.raises(CheckpointError, match="missing keys"):  # a prefix is never taken for another architecture
        load_foreign_weights(build_model("torchvision:resnet34", CLASSES, SIZE), tmp_path / "pl.ckpt", CLASSES, "d")


def test_wrong_architecture_names_missing_and_unexpected_keys(tmp_path):
    torch.save(_timm_train_checkpoint(build_model("timm:resnet10t", CLASSES, SIZE)), tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(e\.g\. \[.*unexpected keys \(e\.g\. \["):
        load_foreign_weights(build_model("timm:mobilenetv2_050", CLASSES, SIZE), tmp_path / "c.pth", CLASSES, "d")
    with pytest.raises(CheckpointError, match="has 5 outputs .* but the data has 7 classes"):
        load_foreign_weights(build_model("timm:resnet10t", 7, SIZE), tmp_path / "c.pth", 7, "the data")


def _export_only(tmp_path, extra: list[str]) -> int:
    torch.manual_seed(0)
    model = _calibrating(build_model("timm:resnet10t", 4, SIZE))
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, SIZE, SIZE))
    torch.save(_timm_train_checkpoint(model, ema=model), tmp_path / "model_best.pth.tar")
    tiny = ["data.synthetic.train_size=160", "data.synthetic.test_size=64", "data.num_classes=4"]
    sets = [
        x for item in [*tiny, f"data.image_size={SIZE}", "student.arch=timm:resnet10t", *extra] for x in ("--set", item)
    ]
    return run_cli(
        ["run", "export", "--checkpoint", str(tmp_path / "model_best.pth.tar"), "--out", str(tmp_path / "run"), *sets]
    )


@pytest.mark.slow
def test_export_only_on_a_timm_train_script_checkpoint(tmp_path):
    assert _export_only(tmp_path, ["export.precisions=[fp32]", "export.parity_samples=8"]) == 0
    from pipeline.artifacts.manifest import Manifest

    manifest = Manifest.read(tmp_path / "run" / "export")
    assert manifest.status == "ok" and all(manifest.checks)
    from exports.onnx_export import read_metadata

    meta = read_metadata(tmp_path / "run" / "export" / "model.onnx")
    assert meta["arch"] == "timm:resnet10t" and "0.485" in meta["mean"]  # timm's pretrained-cfg normalization


@pytest.mark.slow
def test_export_only_with_int8_on_a_timm_train_script_checkpoint(tmp_path):
    assert _export_only(tmp_path, ["export.calibration_samples=32", "export.parity_samples=8"]) == 0


# --- ONNX, ONNX Runtime parity and TensorRT-style INT8 Q/DQ per family ---


@pytest.mark.slow
@pytest.mark.parametrize("student_name", [s for s, _ in STUDENTS] + ["timm:convnext_atto"])
def test_fused_family_exports_to_onnx_with_ort_parity_and_tensorrt_int8(tmp_path, teacher, student_name):
    from exports.int8 import CalibrationCache, quantize_int8, tensorrt_qdq_problems
    from exports.metadata import DeployMeta
    from exports.onnx_export import export_onnx
    from exports.runners import run_onnx

    torch.manual_seed(0)
    student = _calibrating(build_model(student_name, CLASSES, SIZE))
    if student.info.reparam_sites:
        _steps(build_distiller("kdiffusion", student, teacher, {"warmup_epochs": 0}), 1)
    fused = fuse_model(_recalibrated(student))
    meta = DeployMeta(student_name, CLASSES, SIZE, [0.5] * 3, [0.25] * 3, SIZE, SIZE)
    path = export_onnx(fused, tmp_path / "m.onnx", SIZE, 18, True, meta)
    images = np.random.default_rng(0).standard_normal((8, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        expected = fused(torch.from_numpy(images)).numpy()
    got = run_onnx(path, images)
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    int8 = quantize_int8(path, tmp_path / "m.int8.onnx", images, CalibrationCache(tmp_path / "cache"), meta)
    assert tensorrt_qdq_problems(tmp_path / "m.int8.onnx") == []
    assert run_onnx(tmp_path / "m.int8.onnx", images).shape == expected.shape
    assert int8.ranges.exists()


@pytest.mark.slow
def test_run_all_distills_timm_resnet50_into_mobilenetv3_with_kdiffusion(tmp_path, tiny_overrides):
    """The issue's done-when command, on the tiny synthetic data (about 3 minutes on 2 cores)."""
    overrides = [o for o in tiny_overrides if not o.startswith(("teacher.arch", "student.arch", "student.method"))]
    overrides += [
        "teacher.arch=timm:resnet50",
        "student.arch=timm:mobilenetv3_small_100",
        "student.method=kdiffusion",
        "data.image_size=64",
        "export.calibration_samples=64",
    ]
    assert run_cli(["run", "all", "--out", str(tmp_path), *[x for o in overrides for x in ("--set", o)]]) == 0
    from pipeline.artifacts.manifest import Manifest

    fuse = Manifest.read(tmp_path / "fuse")
    assert fuse.metrics["fused_blocks"] == 3 and all(fuse.checks)
    assert all(Manifest.read(tmp_path / "export").checks)
