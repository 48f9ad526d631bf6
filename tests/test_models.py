"""Model zoo contract: parameter counts, forward split, feature taps, re-parameterization sites, checkpoints.

Parametrized over the model registry, so a newly registered model is covered without editing this file.
Inputs are small (batch 2, 32 px for CIFAR, 64 px for most ImageNet students) to keep the file fast on CPU.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import fx, nn

from pipeline.errors import ConfigError
from pipeline.models import MODELS, Tap, build_model, count_parameters, model_info
from pipeline.models.hooks import FeatureTaps
from pipeline.models.spec import model_name

model_info("resnet20")  # importing the zoo fills the registry before parametrizing
ALL = MODELS.names()
WITH_SITES = [n for n in ALL if model_info(n).reparam_sites]

CIFAR_PARAMS = {
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_40_2": 2_255_156,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "vgg13": 9_462_180,
    "vgg8": 3_965_028,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
    "mobile_half": 812_836,
    "resnet56": 861_620,
    "resnet20": 278_324,
    "resnet110": 1_736_564,
    "ResNet50": 23_705_252,
}
IMAGENET = [
    "swin_t",
    "swin_s",
    "swin_b",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "resnet18",
    "shufflenet_v2_x1_0",
    "shufflenet_v1_g3",
]

# (channels, height, width) of each stage tap, shallow to deep, at the input size of _input_size().
STAGE_SHAPES = {
    "resnet8x4": [(64, 32, 32), (128, 16, 16), (256, 8, 8)],
    "resnet32x4": [(64, 32, 32), (128, 16, 16), (256, 8, 8)],
    "resnet20": [(16, 32, 32), (32, 16, 16), (64, 8, 8)],
    "resnet56": [(16, 32, 32), (32, 16, 16), (64, 8, 8)],
    "resnet110": [(16, 32, 32), (32, 16, 16), (64, 8, 8)],
    "wrn_40_2": [(32, 32, 32), (64, 16, 16), (128, 8, 8)],
    "wrn_16_2": [(32, 32, 32), (64, 16, 16), (128, 8, 8)],
    "wrn_40_1": [(16, 32, 32), (32, 16, 16), (64, 8, 8)],
    "vgg13": [(256, 8, 8), (512, 4, 4), (512, 4, 4)],
    "vgg8": [(256, 8, 8), (512, 4, 4), (512, 4, 4)],
    "ResNet50": [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)],
    "ShuffleV1": [(240, 16, 16), (480, 8, 8), (960, 4, 4)],
    "ShuffleV2": [(116, 16, 16), (232, 8, 8), (1024, 4, 4)],
    "mobile_half": [(12, 16, 16), (16, 8, 8), (48, 4, 4), (1280, 2, 2)],
    "swin_t": [(192, 28, 28), (384, 14, 14), (768, 7, 7)],
    "mobilenet_v2": [(16, 112, 112), (24, 56, 56), (32, 28, 28), (96, 14, 14), (1280, 7, 7)],
}
TORCHVISION = ["mobilenet_v2", "mobilenet_v3_large", "resnet18", "shufflenet_v2_x1_0"]


def _input_size(name: str) -> int | None:
    """32 px for CIFAR; 224 px for swin_t and one student; 64 px for the other students; None: no forward test."""
    if model_info(name).family == "cifar":
        return 32
    if name in ("swin_t", "mobilenet_v2"):
        return 224
    return None if name.startswith("swin") else 64


FORWARD = [n for n in ALL if _input_size(n)]


@functools.cache
def _model(name: str) -> nn.Module:
    """One eval-mode instance per model (100 classes) shared by the read-only tests."""
    torch.manual_seed(0)
    return build_model(name, 100).eval()


@functools.cache
def _images(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _stage_taps(name: str) -> dict[str, Tap]:
    return {f"stage{i}": tap for i, tap in enumerate(model_info(name).stages)}


def test_registry_has_the_zoo():
    assert set(ALL) == set(CIFAR_PARAMS) | set(IMAGENET)


@pytest.mark.parametrize("name", sorted(CIFAR_PARAMS))
def test_cifar_parameter_count(name):
    assert count_parameters(_model(name)) == CIFAR_PARAMS[name]


@pytest.mark.parametrize("name", ALL)
def test_info(name):
    info = model_info(name)
    assert _model(name).info is info
    assert info.name == name
    assert (info.family, info.input_size) == (("cifar", 32) if name in CIFAR_PARAMS else ("imagenet", 224))
    assert info.stages
    assert len(info.reparam_sites) <= len(info.stages)
    assert not info.reparam_sites or len(info.reparam_sites) == 3, "KDiffusion Multiple Layer uses the deepest 3"


@pytest.mark.parametrize("name", ALL)
def test_tap_and_site_paths_resolve(name):
    model, info = _model(name), model_info(name)
    taps = list(info.stages) + [site.tap for site in info.reparam_sites]
    for tap in taps:
        module = model.get_submodule(tap.path)
        if tap.io == "input":
            assert not getattr(module, "inplace", False), f"{tap.path} is in-place, so its input is overwritten"
    for site in info.reparam_sites:
        conv, bn = model.get_submodule(site.conv), model.get_submodule(site.bn)
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        assert conv.out_channels == bn.num_features


@pytest.mark.parametrize("name", WITH_SITES)
def test_site_conv_feeds_only_its_bn(name):
    """Traced with torch.fx, as the fuse stage does: each site's BN is the sole consumer of its conv's output."""
    graph = fx.Tracer().trace(_model(name))
    calls = {node.target: node for node in graph.nodes if node.op == "call_module"}
    for site in model_info(name).reparam_sites:
        source = calls[site.bn].args[0]
        assert source.target == site.conv and len(source.users) == 1


@pytest.mark.parametrize("name", FORWARD)
def test_forward_split_and_stage_taps(name):
    model, info, size = _model(name), model_info(name), _input_size(name)
    x = _images(size)
    with torch.no_grad():
        with FeatureTaps(model, _stage_taps(name)) as taps:
            logits = model(x)
        features = model.forward_features(x)
        kept = features.clone()
        head = model.forward_head(features)
    assert logits.shape == (2, 100)
    assert torch.equal(features, kept), "forward_head must not write into the features"
    torch.testing.assert_close(head, logits, rtol=0, atol=1e-6)
    shapes = [tuple(taps.features[f"stage{i}"].shape) for i in range(len(info.stages))]
    assert all(s[0] == 2 for s in shapes)
    assert torch.equal(taps.features[f"stage{len(info.stages) - 1}"], features)
    if name in STAGE_SHAPES:
        assert [s[1:] for s in shapes] == STAGE_SHAPES[name]
    if info.family == "imagenet":  # spec §2.3: the deepest three taps sit at strides 8, 16, 32
        assert [s[-1] for s in shapes[-3:]] == [size // 8, size // 16, size // 32]
    for i in range(len(info.stages)):  # pre-activation, and not overwritten by an in-place op after the hook
        assert taps.features[f"stage{i}"].min() < 0, f"stage {i} of {name} looks post-ReLU"


@pytest.mark.parametrize("name", FORWARD)
def test_tapped_tensors_are_not_overwritten(name):
    """No in-place op may change a stage tap, a site's tap or a site's BN output after its hook has read it."""
    model, info = _model(name), model_info(name)
    taps = [*info.stages, *(site.tap for site in info.reparam_sites), *(Tap(site.bn) for site in info.reparam_sites)]
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    handles = [model.get_submodule(tap.path).register_forward_hook(_keep(tap, seen)) for tap in taps]
    try:
        with torch.no_grad():
            model(_images(_input_size(name)))
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) >= len(taps)
    for path, tensor, copy in seen:
        assert torch.equal(tensor, copy), f"{path} was overwritten in place after it was hooked"


def _keep(tap: Tap, seen: list):
    def hook(module, inputs, output):
        tensor = inputs[0] if tap.io == "input" else output
        seen.append((tap.path, tensor, tensor.clone()))

    return hook


@pytest.mark.parametrize("name", WITH_SITES)
def test_site_output_reaches_tap_linearly(name):
    """Shifting a site's BN output by d shifts its tap by d (embed identity) or its last channels by d (concat_tail)."""
    model, size = _model(name), _input_size(name) or 64
    x = _images(size)
    for site in model_info(name).reparam_sites:
        bn = model.get_submodule(site.bn)
        taps = {"tap": site.tap}
        with torch.no_grad(), FeatureTaps(model, taps) as before, FeatureTaps(model, {"bn": Tap(site.bn)}) as out:
            model(x)
        delta = torch.randn(out.features["bn"].shape, generator=torch.Generator().manual_seed(1))
        handle = bn.register_forward_hook(_shift_output(delta))
        try:
            with torch.no_grad(), FeatureTaps(model, taps) as after:
                model(x)
        finally:
            handle.remove()
        shift = after.features["tap"] - before.features["tap"]
        atol = 1e-5 + 1e-6 * before.features["tap"].abs().max().item()  # a few ulps of the (deep-ResNet-sized) sum
        if site.embed == "concat_tail":
            channels = delta.shape[1]
            torch.testing.assert_close(shift[:, -channels:], delta, rtol=0, atol=atol)
            assert shift[:, :-channels].abs().max() == 0
        else:
            torch.testing.assert_close(shift, delta, rtol=0, atol=atol)


def _shift_output(delta: torch.Tensor):
    return lambda module, inputs, output: output + delta


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name):
    source, target = _model(name).state_dict(), build_model(name, 100)
    target.load_state_dict(source, strict=True)
    for key, value in target.state_dict().items():
        assert torch.equal(value, source[key]), key


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_checkpoint_loads_and_matches(name):
    import torchvision

    reference = torchvision.models.get_model(name, weights=None, num_classes=100).eval()
    model = build_model(name, 100).eval()
    assert count_parameters(model) == count_parameters(reference)
    model.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(_images(64)), reference(_images(64)), rtol=0, atol=1e-6)


def test_timm_swin_checkpoint_loads_and_matches():
    import timm

    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=100).eval()
    model = build_model("swin_t", 100).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(_images(224)), reference(_images(224)), rtol=0, atol=1e-5)


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown model 'nope'.*resnet32x4"):
        build_model("nope", 10)


def test_feature_taps_reject_a_bad_path_and_leave_no_hooks():
    model = _model("resnet20")
    taps = {"good": Tap("layer1.2.act", "input"), "bad": Tap("layer9.act")}
    message = r"tap 'bad': model 'resnet20' has no submodule 'layer9.act'"
    with pytest.raises(ConfigError, match=message), FeatureTaps(model, taps):
        pass
    assert not any(m._forward_hooks for m in model.modules())


def test_messages_name_a_model_by_its_architecture_else_by_its_class():
    assert model_name(_model("resnet20")) == "resnet20" and model_name(nn.Linear(2, 2)) == "Linear"


def test_feature_taps_remove_their_hooks_on_exit():
    model = _model("resnet20")
    with torch.no_grad(), FeatureTaps(model, _stage_taps("resnet20")) as taps:
        model(_images(32))
    assert not any(m._forward_hooks for m in model.modules())
    assert set(taps.features) == {"stage0", "stage1", "stage2"}
