"""The GPU step-overhead options on a CPU: device-resident data, deferred metric reads, SGD kernels, guards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DataConfig, OptimConfig, TrainingConfig
from pipeline.data import Transformed, WithIndices
from pipeline.data.synthetic import TensorImages
from pipeline.data.transforms import build_transform
from pipeline.errors import ConfigError
from pipeline.training import RESUME_FILE, NonFiniteLossError, build_optimizer, make_loader
from pipeline.training.device_data import DeviceLoader, batch_draws, crop_flip, sample_draws
from pipeline.training.speed import check_training
from pipeline.training.state import load_state
from tests.trainkit import DATA, TinyNet, count_compiled_calls, fit_scripted, tiny_data

CPU = torch.device("cpu")


@pytest.fixture
def data():
    return tiny_data()


def _reference_image(data, position: int, seed: int, epoch: int) -> torch.Tensor:
    """One training sample augmented alone: the hash draws in plain Python, crop/flip/normalize per image."""
    image, _ = data.source("train")[position]
    top, left, flip = sample_draws(seed, epoch, position)
    top, left = top % 9, left % 9
    crop = F.pad(image, (4, 4, 4, 4))[:, top : top + 32, left : left + 32]
    if flip >> 31:
        crop = crop.flip(-1)
    mean, std = torch.tensor(data.info.mean).view(3, 1, 1), torch.tensor(data.info.std).view(3, 1, 1)
    return (crop.float() / 255 - mean) / std


def test_batched_draws_equal_the_per_sample_python_formula():
    indices = torch.tensor([0, 1, 2, 53, 4097, 2**31 - 1, 2**32 - 5])
    for seed, epoch in [(0, 0), (3, 7), (2**40 + 1, 239)]:
        batched = batch_draws(seed, epoch, indices).tolist()
        assert batched == [sample_draws(seed, epoch, i) for i in indices.tolist()]
        assert all(0 <= d < 2**32 for row in batched for d in row)
    top, left, flip = crop_flip(batch_draws(0, 0, torch.arange(4000)), padding=4)
    assert set(top.tolist()) == set(left.tolist()) == set(range(9))  # every offset of the pad-4 crop occurs
    assert 0.45 < flip.float().mean() < 0.55


def test_device_batches_equal_the_per_sample_reference_and_keep_the_data_order(data):
    cfg = DataConfig(**{**DATA.__dict__, "batch_size": 8})
    dataset = data.dataset("train", augment=True)
    loader = make_loader(dataset, cfg, train=True, seed=3, device=CPU, on_device=True)
    plain = make_loader(dataset, cfg, train=True, seed=3)
    assert isinstance(loader, DeviceLoader) and len(loader) == len(plain) == 6
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        plain.sampler.set_epoch(epoch)
        order = [index for index, _ in plain.sampler]
        batches = list(loader)
        assert len(batches) == 6
        images = torch.cat([b[0] for b in batches])
        targets = torch.cat([b[1] for b in batches])
        assert targets.tolist() == [int(data.source("train")[i][1]) for i in order]
        for row, position in enumerate(order):
            assert torch.equal(images[row], _reference_image(data, position, seed=3, epoch=epoch)), (epoch, row)


def test_a_samples_augmentation_depends_only_on_seed_epoch_and_index(data):
    dataset = WithIndices(data.dataset("train", augment=True))
    small = DataConfig(**{**DATA.__dict__, "batch_size": 8})
    whole = make_loader(dataset, small, train=True, seed=5, on_device=True)
    whole.sampler.set_epoch(1)
    by_index = {}
    for images, _, indices in whole:
        by_index.update(zip(indices.tolist(), images))
    later = make_loader(dataset, DATA, train=True, seed=5, on_device=True)  # other batch size, from step 2
    later.sampler.set_epoch(1, start_step=2)
    images, _, indices = next(iter(later))
    for image, index in zip(images, indices.tolist()):
        assert torch.equal(image, by_index[index])
    whole.sampler.set_epoch(2)
    other_epoch = {i: im for ims, _, idx in whole for i, im in zip(idx.tolist(), ims)}
    assert any(not torch.equal(other_epoch[i], by_index[i]) for i in by_index)


def test_device_data_refuses_datasets_it_cannot_hold(data):
    images = TensorImages(torch.zeros(40, 3, 32, 32, dtype=torch.uint8), torch.zeros(40, dtype=torch.long))
    imagenet_info = data.info.__class__(**{**data.info.__dict__, "recipe": "imagenet"})
    for dataset in (
        Transformed(images, build_transform(imagenet_info, train=True)),
        Transformed(images, build_transform(data.info, train=False)),  # no augmentation: not a training set
    ):
        with pytest.raises(ConfigError, match="training.device_data=true needs an in-memory small-image dataset"):
            make_loader(dataset, DATA, train=True, on_device=True)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _scalars(logdir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_deferred_metric_reads_give_the_same_weights_and_curves(data, tmp_path):
    every_step, history = fit_scripted(data, TrainingConfig(log_every=2, checkpoint_every=0), logdir=tmp_path / "a")
    deferred, deferred_history = fit_scripted(
        data, TrainingConfig(log_every=2, checkpoint_every=0, defer_metrics=True), logdir=tmp_path / "b"
    )
    assert _same_weights(every_step.student, deferred.student)
    for a, b in zip(history.epochs, deferred_history.epochs, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key != "images_per_s":
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    for tag, steps in (("train/loss/ce", [2, 4, 6]), ("train/loss", [2, 4, 6]), ("train/top1", [3, 6])):
        a, b = _scalars(tmp_path / "a", tag), _scalars(tmp_path / "b", tag)
        assert [s for s, _ in a] == [s for s, _ in b] == steps
        assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-5)


def test_deferred_reads_still_stop_a_non_finite_loss_before_any_checkpoint_holds_it(data, tmp_path):
    training = TrainingConfig(log_every=3, checkpoint_every=0, defer_metrics=True)
    with pytest.raises(NonFiniteLossError) as info:
        fit_scripted(data, training, scratch=tmp_path, fail_at=5, failure="nan")
    message = str(info.value)
    assert "non-finite loss term 'aux' in epoch 2, steps 1-3 (global steps 4-6;" in message
    assert "aux=nan" in message and str(tmp_path / RESUME_FILE) in message
    state = load_state(tmp_path / RESUME_FILE)
    assert (state["epoch"], state["step"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_with_device_data_and_deferred_reads_is_bit_exact(data, tmp_path):
    training = TrainingConfig(checkpoint_every=2, log_every=2, defer_metrics=True)
    reference, ref_history = fit_scripted(data, training, on_device=True)
    with pytest.raises(KeyboardInterrupt):  # killed in step 6; the checkpoint holds the state after step 4
        fit_scripted(data, training, scratch=tmp_path, fail_at=6, on_device=True)
    assert load_state(tmp_path / RESUME_FILE)["global_step"] == 4
    resumed, history = fit_scripted(data, training, scratch=tmp_path, on_device=True)
    assert resumed.calls == 2
    assert _same_weights(resumed.student, reference.student)
    assert [r["loss/ce"] for r in history.epochs] == [r["loss/ce"] for r in ref_history.epochs]
    plain, _ = fit_scripted(data, training)  # the DataLoader path draws other crops: other weights
    assert not _same_weights(plain.student, reference.student)


@pytest.mark.parametrize("impl", ["for_loop", "foreach", "fused"])
def test_every_sgd_implementation_makes_the_same_update(impl):
    torch.manual_seed(0)
    model = TinyNet()
    inputs, targets = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    results = {}
    for name in ("auto", impl):
        copy = TinyNet()
        copy.load_state_dict(model.state_dict())
        optimizer = build_optimizer(list(copy.parameters()), OptimConfig(lr=0.1), name)
        torch.manual_seed(1)  # the same dropout masks
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(copy(inputs), targets).backward()
            optimizer.step()
        results[name] = copy.state_dict()
    for key, value in results["auto"].items():
        torch.testing.assert_close(results[impl][key], value, rtol=1e-5, atol=1e-6)


def test_compile_runs_the_student_through_the_compiled_callable(data, monkeypatch):
    counts = count_compiled_calls(monkeypatch, compile_for_real=False)
    fit_scripted(data, TrainingConfig())
    assert counts == []  # the option off compiles nothing
    distiller, _ = fit_scripted(data, TrainingConfig(compile=True))
    assert len(counts) == 1 and counts[0] >= distiller.calls > 0  # the student (no teacher), on every step


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cuda_graphs": True}, "training.cuda_graphs needs a CUDA device"),
        ({"optimizer_impl": "adamw"}, "training.optimizer_impl must be one of auto, for_loop, foreach, fused"),
    ],
)
def test_step_options_a_cpu_cannot_use_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        check_training(TrainingConfig(**options), CPU)


@pytest.mark.parametrize("method", ["kd", "kdiffusion"])
def test_teacher_under_inference_mode_gives_the_same_losses_and_gradients(method):
    from pipeline.distill import build_distiller
    from pipeline.models import build_model

    results = []
    for inference in (True, False):
        torch.manual_seed(0)
        args = {"warmup_epochs": 0} if method == "kdiffusion" else {}
        distiller = build_distiller(method, build_model("resnet8x4", 4), build_model("resnet32x4", 4), args)
        distiller.teacher_inference_mode = inference
        _, losses = distiller(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
        sum(losses.values()).backward()
        results.append(([v.detach() for v in losses.values()], [p.grad for p in distiller.trainable_parameters()]))
    (losses_a, grads_a), (losses_b, grads_b) = results
    assert all(torch.equal(a, b) for a, b in zip(losses_a, losses_b, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert any(g.abs().sum() > 0 for g in grads_a)


def test_device_data_enters_the_stage_fingerprints_only_when_on(tiny_cfg):
    import dataclasses

    from stages.support.kit import training_params

    fp32 = dataclasses.replace(tiny_cfg, training=dataclasses.replace(tiny_cfg.training, amp="none"))
    assert training_params(fp32) == {"amp": "none", "sync_bn": False}  # old fingerprints still hold
    on = dataclasses.replace(fp32, training=dataclasses.replace(fp32.training, device_data=True))
    assert training_params(on) == {"amp": "none", "sync_bn": False, "device_data": True}


@pytest.mark.parametrize("mode", ["mean", "student_noise", "gaussian"])
@pytest.mark.parametrize(("schedule", "weight"), [("cosine", "uniform"), ("linear1000", "kl_clipped")])
def test_the_batched_chain_gives_the_sequential_loss_and_gradients(mode, schedule, weight):
    from pipeline.distill.kdiffusion.chain import batched_chain_loss, reverse_chain_loss, step_weights
    from pipeline.distill.kdiffusion.schedule import make_schedule

    sched = make_schedule(schedule, 4)
    weights = step_weights(sched, weight)
    x0 = torch.randn(3, 5, 4, 4)
    results = []
    for chain in (reverse_chain_loss, batched_chain_loss):
        branches = torch.randn(4, 3, 5, 4, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
        torch.manual_seed(2)  # the same noise for the gaussian targets
        inputs = branches if chain is batched_chain_loss else list(branches)
        loss = chain(inputs, x0, sched, [2, 0, 3, 1], mode, weights)
        loss.backward()
        results.append((loss.detach(), branches.grad))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert loss_a > 0
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-5, atol=1e-7)


def test_kdiffusion_with_the_batched_chain_trains_like_the_sequential_one():
    from pipeline.distill import build_distiller
    from pipeline.models import build_model

    results = []
    for batched in (False, True):
        torch.manual_seed(0)
        args = {"warmup_epochs": 0, "batched_chain": batched}
        distiller = build_distiller("kdiffusion", build_model("resnet8x4", 4), build_model("resnet32x4", 4), args)
        _, losses = distiller(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
        sum(losses.values()).backward()
        results.append((losses["diff"].detach(), [p.grad for p in distiller.trainable_parameters()]))
    (diff_a, grads_a), (diff_b, grads_b) = results
    torch.testing.assert_close(diff_b, diff_a, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
