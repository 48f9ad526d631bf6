"""The step-overhead options on a CUDA GPU: device batches equal the CPU ones, CUDA graphs train, resume is exact."""

from __future__ import annotations

import math
import os

import pytest
import torch

from pipeline.config import DataConfig, TrainingConfig
from pipeline.distill import build_distiller
from pipeline.training import fit, make_loader
from pipeline.training.device_data import batch_draws
from tests.trainkit import DATA, OPTIM, Scripted, TinyNet, tiny_data

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GPU = torch.device("cuda")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture
def data():
    return tiny_data()


def test_device_batches_on_cuda_equal_the_cpu_ones(data):
    indices = torch.tensor([0, 5, 2**31 + 7, 2**32 - 1])
    assert torch.equal(batch_draws(3, 9, indices.to(GPU)).cpu(), batch_draws(3, 9, indices))
    cfg = DataConfig(**{**DATA.__dict__, "batch_size": 8})
    dataset = data.dataset("train", augment=True)
    cpu = list(make_loader(dataset, cfg, train=True, seed=3, on_device=True))
    gpu = list(make_loader(dataset, cfg, train=True, seed=3, device=GPU, on_device=True))
    assert len(cpu) == len(gpu) > 0
    for (a, ta), (b, tb) in zip(cpu, gpu, strict=True):
        assert b.device.type == "cuda" and torch.equal(ta, tb.cpu())
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=1e-6)


def _fit(data, training: TrainingConfig, scratch=None, fail_at=0, distiller=None):
    torch.manual_seed(0)
    distiller = distiller or Scripted(TinyNet(), fail_at=fail_at)
    history = fit(
        distiller,
        make_loader(data.dataset("train", augment=True), DATA, train=True, seed=3, device=GPU, on_device=True),
        None,
        OPTIM,
        GPU,
        scratch=scratch,
        log=lambda _: None,
        seed=3,
        training=training,
    )
    return distiller, history


def test_cuda_graphs_with_every_step_option_train(data, monkeypatch):
    training = TrainingConfig(cuda_graphs=True, defer_metrics=True, optimizer_impl="fused", log_every=2)
    torch.manual_seed(0)
    distiller = build_distiller("vanilla", TinyNet(), None)
    keys = set(distiller.state_dict())
    replay, replays = torch.cuda.CUDAGraph.replay, []

    def counted(graph):
        replays.append(graph)
        return replay(graph)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counted)
    distiller, history = _fit(data, training, distiller=distiller)
    assert replays  # the steps ran as captured CUDA graphs, not op by op
    assert len(history.epochs) == OPTIM.epochs and math.isfinite(history.last["loss/ce"])
    assert set(distiller.state_dict()) == keys
    assert all(torch.isfinite(p).all() for p in distiller.parameters())


def test_device_data_and_deferred_reads_resume_bit_exact_on_cuda(data, tmp_path):
    training = TrainingConfig(deterministic=True, device_data=True, defer_metrics=True, checkpoint_every=2)
    reference, _ = _fit(data, training)
    with pytest.raises(KeyboardInterrupt):
        _fit(data, training, scratch=tmp_path, fail_at=6)
    resumed, _ = _fit(data, training, scratch=tmp_path)
    assert resumed.calls == 2
    a, b = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
