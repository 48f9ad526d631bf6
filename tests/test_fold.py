"""BatchNorm folding: exact function, deploy-form structure, and only foldable pairs folded."""

import pytest
import torch
from torch import nn

from pipeline.reparam import conv_bn_pairs, fold_batchnorm, fuse_model


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pre_bn = nn.BatchNorm2d(8)  # BN before a conv (pre-activation style): not foldable
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=True)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1)  # output used twice: not foldable
        self.bn3 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(torch.relu(self.pre_bn(x))))
        y = self.conv3(x)
        return self.bn3(y) + y


def test_pairs_are_found_on_the_graph():
    assert conv_bn_pairs(Net()) == [("conv1", "bn1"), ("conv2", "bn2")]


def test_fold_is_exact_and_keeps_paths():
    model = Net()
    _randomize_bn(model)
    model.eval()
    folded = fold_batchnorm(model)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.Identity)
    assert isinstance(folded.bn3, nn.BatchNorm2d) and isinstance(folded.pre_bn, nn.BatchNorm2d)
    assert folded.conv1.bias is not None
    assert isinstance(model.bn1, nn.BatchNorm2d), "fold_batchnorm must not modify its input by default"
    keys = set(folded.state_dict())
    assert "conv1.bias" in keys and not any(k.startswith("bn1.") for k in keys)


def test_fold_is_idempotent():
    model = fold_batchnorm(Net())
    again = fold_batchnorm(model)
    assert model.state_dict().keys() == again.state_dict().keys()


class Rewritable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return (self.a(x) + self.b(x)) / 2

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        conv = nn.Conv2d(3, 3, 1)
        conv.weight.copy_((self.a.weight + self.b.weight) / 2)
        conv.bias.copy_((self.a.bias + self.b.bias) / 2)
        return conv


def test_fuse_model_uses_the_fuse_protocol_then_folds():
    model = nn.Sequential(Rewritable(), nn.BatchNorm2d(3))
    _randomize_bn(model)
    model.eval()
    fused = fuse_model(model)
    assert isinstance(fused[0], nn.Conv2d) and isinstance(fused[1], nn.Identity)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["resnet20", "mobile_half", "ShuffleV2", "wrn_16_2", "vgg8"])
def test_fold_zoo_models(arch):
    from pipeline.models import build_model

    model = build_model(arch, 10)
    _randomize_bn(model, seed=1)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    folded = fold_batchnorm(model)
    torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    assert conv_bn_pairs(folded) == []
