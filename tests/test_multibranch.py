"""The m-branch block and its fusion (spec §3, §9): the fusion grid (I9), I10, I13, branch order, the
zoo's sites, and the branch-feature embedding checked against an explicit forward pass."""

import pytest
import torch
from torch import nn

from pipeline.distill.kdiffusion.loss import branch_features
from pipeline.errors import ConfigError
from pipeline.models import Tap, build_model, list_models, model_info
from pipeline.models.hooks import FeatureTaps
from pipeline.reparam import apply_reparam, conv_bn_pairs, fuse_model
from pipeline.reparam.multibranch import (
    MultiBranchConvBN,
    apply_multibranch,
    block_fusion_errors,
    branch_tap,
    fused_weights,
    multibranch_blocks,
)


def _randomize(block: MultiBranchConvBN, seed: int = 0) -> None:
    """Random BN statistics and affine terms, and non-zero conv biases where there are any."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in block.branches:
            bn, conv = branch.bn, branch.conv
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=gen))
            bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.weight.copy_(torch.randn(n, generator=gen))
            bn.bias.copy_(torch.randn(n, generator=gen))
            if conv.bias is not None:
                conv.bias.copy_(torch.randn(conv.out_channels, generator=gen))


GRID = {
    "1x1": (nn.Conv2d(12, 24, 1, bias=False), 4, False),
    "1x1_m8": (nn.Conv2d(12, 24, 1, bias=False), 8, False),
    "grouped_1x1_g3": (nn.Conv2d(12, 24, 1, groups=3, bias=False), 4, False),
    "3x3": (nn.Conv2d(12, 24, 3, padding=1, bias=False), 4, False),
    "mixed_3x3_1x1": (nn.Conv2d(12, 24, 3, padding=1, bias=False), 4, True),
    "stride2_3x3": (nn.Conv2d(12, 24, 3, stride=2, padding=1, bias=False), 4, False),
    "stride2_mixed": (nn.Conv2d(12, 24, 3, stride=2, padding=1, bias=False), 4, True),
    "depthwise_3x3": (nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False), 4, False),
    "depthwise_mixed_stride2": (nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=12, bias=False), 4, True),
}


@pytest.mark.parametrize("bias", [False, True], ids=["no_conv_bias", "conv_bias"])
@pytest.mark.parametrize("case", list(GRID))
def test_i9_fusion_grid(case, bias):
    torch.manual_seed(0)
    conv, m, mixed = GRID[case]
    block = MultiBranchConvBN(conv, nn.BatchNorm2d(conv.out_channels), m=m, mixed_kernels=mixed, bias=bias)
    if mixed:
        assert block.branch_kernel_sizes == [(3, 3)] * (m - m // 2) + [(1, 1)] * (m // 2)
    _randomize(block)
    block.eval()
    h = torch.randn(4, 12, 9, 9)
    fused = block.fuse()
    assert isinstance(fused, nn.Conv2d) and fused.bias is not None
    assert tuple(fused.weight.shape) == tuple(conv.weight.shape) and fused.groups == conv.groups
    with torch.no_grad():
        reference = sum(branch(h) for branch in block.branches) / m
        out = fused(h)
    assert out.shape == reference.shape
    assert (out - reference).abs().max().item() <= 1e-5
    assert ((out - reference).norm() / reference.norm()).item() <= 1e-6


def test_i7_fused_weights_do_not_depend_on_branch_order():
    block = MultiBranchConvBN(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), m=4, mixed_kernels=True)
    _randomize(block)
    weight, bias = fused_weights(block)
    block.branches = nn.ModuleList([block.branches[i] for i in (2, 0, 3, 1)])
    weight2, bias2 = fused_weights(block)
    torch.testing.assert_close(weight2, weight, atol=1e-7, rtol=0)
    torch.testing.assert_close(bias2, bias, atol=1e-7, rtol=0)


def test_i10_branches_keep_their_own_batch_statistics():
    torch.manual_seed(0)
    block = MultiBranchConvBN(nn.Conv2d(5, 7, 3, padding=1), nn.BatchNorm2d(7, momentum=0.1), m=3).train()
    h = torch.randn(6, 5, 8, 8)
    out = block(h)
    expected = []
    for branch in block.branches:
        z = branch.conv(h)
        expected.append(nn.functional.batch_norm(z, None, None, branch.bn.weight, branch.bn.bias, training=True))
        torch.testing.assert_close(branch.bn.running_mean, 0.1 * z.mean((0, 2, 3)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, torch.stack(expected).mean(0), atol=1e-6, rtol=1e-5)
    means = [b.bn.running_mean for b in block.branches]
    assert not torch.allclose(means[0], means[1])


def test_i13_branch_mean_variance_is_one_over_m_when_independent():
    """Eq. 15: Var(mean) ≈ Var(single)/m at initialisation; it degrades as branches correlate."""
    torch.manual_seed(0)
    m = 4
    block = MultiBranchConvBN(nn.Conv2d(64, 32, 3, padding=1), nn.BatchNorm2d(32), m=m).train()
    h = torch.randn(32, 64, 8, 8)
    with torch.no_grad():
        single = block.branches[0](h).var()
        ratio = (block(h).var() / single).item()
        assert ratio == pytest.approx(1 / m, rel=0.1)
        for branch in block.branches[1:]:  # perfectly correlated branches: no reduction at all
            branch.load_state_dict(block.branches[0].state_dict())
        assert (block(h).var() / single).item() == pytest.approx(1.0, rel=1e-4)


def test_scale_init_and_template_affine():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.bias.fill_(0.5)
    block = MultiBranchConvBN(nn.Conv2d(3, 4, 1), bn, m=4, scale_init=True)
    for branch in block.branches:
        torch.testing.assert_close(branch.bn.weight, torch.full((4,), 2.0))
        torch.testing.assert_close(branch.bn.bias, torch.full((4,), 0.5))
        assert branch.conv.bias is None
    assert not torch.equal(block.branches[0].conv.weight, block.branches[1].conv.weight)


def test_bad_blocks_are_refused():
    with pytest.raises(ValueError, match="m >= 1"):
        MultiBranchConvBN(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), m=0)
    with pytest.raises(ValueError, match="4 outputs"):
        MultiBranchConvBN(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="odd kernel"):
        MultiBranchConvBN(nn.Conv2d(3, 4, 2, padding=1), nn.BatchNorm2d(4), mixed_kernels=True)
    with pytest.raises(ValueError, match="padding"):
        MultiBranchConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), mixed_kernels=True)
    with pytest.raises(ValueError, match="running statistics"):
        MultiBranchConvBN(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    model = build_model("resnet20", 10)
    with pytest.raises(ConfigError, match="model 'resnet20' has no submodule 'layer9.conv'"):
        apply_multibranch(model, [("layer9.conv", "layer9.bn")])
    with pytest.raises(ConfigError, match="expected an nn.Conv2d"):
        apply_multibranch(model, [("layer1.0.bn1", "layer1.0.bn1")])


def test_rebuild_from_checkpoint_settings_and_fuse_to_the_vanilla_deploy_form():
    torch.manual_seed(0)
    sites = model_info("resnet20").reparam_sites
    model = apply_multibranch(build_model("resnet20", 10), sites, m=3, mixed_kernels=True)
    for block in multibranch_blocks(model).values():
        _randomize(block)
    settings = {"kind": "multibranch", "sites": [[s.conv, s.bn] for s in sites], "m": 3, "mixed_kernels": True}
    rebuilt = apply_reparam(build_model("resnet20", 10), settings)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert set(multibranch_blocks(rebuilt)) == {s.conv for s in sites}
    model.eval()
    fused = fuse_model(model)
    vanilla = fuse_model(build_model("resnet20", 10))
    vanilla.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=0)
    errors = block_fusion_errors(model, x)
    assert set(errors) == {s.conv for s in sites}
    assert all(e["max_abs"] <= 1e-5 for e in errors.values())


def _models_with_sites() -> list[str]:
    return [name for name in list_models() if model_info(name).reparam_sites]


@pytest.mark.parametrize("arch", _models_with_sites())
def test_zoo_sites_and_branch_features_match_an_explicit_forward(arch):
    """For every declared site: a direct conv->BN pair, and s̃_i = what the tap reads when the block outputs x_i.

    With m = 2 and the mean of the s̃_i equal to the tapped feature, checking branch 0 checks branch 1 too.
    """
    torch.manual_seed(0)
    info = model_info(arch)
    model = build_model(arch, 10)
    pairs = set(conv_bn_pairs(model))
    assert all((s.conv, s.bn) in pairs for s in info.reparam_sites), "a site is not a conv feeding only its BN"
    m = 2
    apply_multibranch(model, info.reparam_sites, m=m)
    model.train()
    size = max(16, info.input_size // 2)  # half resolution keeps the big teachers cheap; every stage stays > 1 px
    x = torch.randn(2, 3, size, size)
    taps = {}
    for j, site in enumerate(info.reparam_sites):
        taps[f"tap{j}"], taps[f"out{j}"] = site.tap, Tap(site.conv)
        taps.update({f"b{j}.{i}": branch_tap(site, i) for i in range(m)})
    with FeatureTaps(model, taps) as captured:
        model(x)
    features = dict(captured.features)
    for j, site in enumerate(info.reparam_sites):
        branches = [features[f"b{j}.{i}"] for i in range(m)]
        computed = branch_features(features[f"tap{j}"], features[f"out{j}"], branches, site.embed)
        torch.testing.assert_close(computed.mean(0), features[f"tap{j}"], atol=1e-5, rtol=1e-5)
        block = model.get_submodule(site.conv)
        handle = block.register_forward_hook(lambda mod, inp, out: mod.branches[0](inp[0]))
        try:
            with FeatureTaps(model, {"tap": site.tap}) as explicit:
                model(x)
        finally:
            handle.remove()
        torch.testing.assert_close(computed[0], explicit.features["tap"], atol=1e-5, rtol=1e-5)


def test_block_gate_scales_with_the_block_output_and_still_catches_a_wrong_fusion(monkeypatch):
    """Random-weight MobileOne's blocks output 1e12 where float error alone is 1e6: the per-block gate is
    ``atol + rtol * max |mean of branches|`` (issue 25), so an exact fusion passes at any scale and a fusion off
    by 1 % of one output channel fails at any scale."""
    from stages.fuse import block_checks

    torch.manual_seed(0)
    sites = model_info("resnet20").reparam_sites
    model = apply_multibranch(build_model("resnet20", 10), sites, m=3, mixed_kernels=True)
    for block in multibranch_blocks(model).values():
        _randomize(block)
    with torch.no_grad():  # blow the activations up: every input weight of the first conv times 1e8
        model.conv1.weight.mul_(1e8)
    model.eval()
    errors = block_fusion_errors(model, torch.randn(4, 3, 32, 32))
    assert min(e["scale"] for e in errors.values()) > 1e6
    assert max(e["max_abs"] for e in errors.values()) > 1e-5  # an absolute 1e-5 would fail this exact fusion
    checks = block_checks(model, 32)
    assert checks and all(checks), [c.describe() for c in checks if not c]
    assert "max |reference|" in checks[0].detail

    fuse = MultiBranchConvBN.fuse

    def off_by_one_percent(block):
        conv = fuse(block)
        with torch.no_grad():
            conv.weight[0].mul_(1.01)
        return conv

    monkeypatch.setattr(MultiBranchConvBN, "fuse", off_by_one_percent)
    assert not any(block_checks(model, 32))
