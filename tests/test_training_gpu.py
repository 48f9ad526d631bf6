"""The GPU speed paths of the training loop: fp16 + GradScaler, bf16, channels_last, torch.compile, determinism."""

from __future__ import annotations

import math
import os

import pytest
import torch

from pipeline.config import OptimConfig, TrainingConfig
from pipeline.training import RESUME_FILE, fit, make_loader
from pipeline.training.state import load_state
from tests.trainkit import DATA, OPTIM, Scripted, TinyNet, count_compiled_calls, tiny_data

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (AMP, channels_last, torch.compile)"),
]
GPU = torch.device("cuda")
# Deterministic cuBLAS must be configured before the first GPU matmul of the process, not in the test.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture
def data():
    return tiny_data()


def _fit(data, training: TrainingConfig, scratch=None, fail_at=0, optim: OptimConfig | None = None):
    torch.manual_seed(0)
    distiller = Scripted(TinyNet(), fail_at=fail_at)
    history = fit(
        distiller,
        make_loader(data.dataset("train", augment=True), DATA, train=True, device=GPU),
        make_loader(data.dataset("val"), DATA, train=False, device=GPU),
        optim or OptimConfig(epochs=1),
        GPU,
        scratch=scratch,
        log=lambda _: None,
        training=training,
    )
    return distiller, history


def test_fp16_uses_a_grad_scaler_and_keeps_fp32_islands(data, tmp_path):
    distiller, history = _fit(data, TrainingConfig(amp="fp16"), scratch=tmp_path)
    assert distiller.dtypes == {"logits": torch.float16, "fp32_island": torch.float32}
    assert all(p.dtype == torch.float32 for p in distiller.parameters())
    assert math.isfinite(history.last["loss/ce"])
    assert load_state(tmp_path / RESUME_FILE)["scaler"]["scale"] > 0


def test_bf16_with_channels_last(data):
    distiller, history = _fit(data, TrainingConfig(amp="bf16", channels_last=True))
    assert distiller.dtypes["logits"] == torch.bfloat16
    assert distiller.student.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert math.isfinite(history.last["loss/ce"])


def test_compile_keeps_state_dict_keys(data, monkeypatch):
    counts = count_compiled_calls(monkeypatch)
    distiller, history = _fit(data, TrainingConfig(compile=True))
    assert len(counts) == 1 and counts[0] >= distiller.calls > 0  # the compiled student ran every step
    assert set(distiller.student.state_dict()) == set(TinyNet().state_dict())
    assert math.isfinite(history.last["loss/ce"])


def test_deterministic_gpu_resume_is_exact(data, tmp_path):
    training = TrainingConfig(deterministic=True, checkpoint_every=2)
    reference, _ = _fit(data, training, optim=OPTIM)
    with pytest.raises(KeyboardInterrupt):
        _fit(data, training, scratch=tmp_path, fail_at=6, optim=OPTIM)
    resumed, _ = _fit(data, training, scratch=tmp_path, optim=OPTIM)
    for key, value in reference.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
