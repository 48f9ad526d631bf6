"""The training loop on one CPU process: exact resume, guards, TensorBoard, precision and memory-format paths."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config import DataConfig, OptimConfig, TrainingConfig
from pipeline.distill import build_distiller
from pipeline.errors import ConfigError
from pipeline.training import (
    RESUME_FILE,
    NonFiniteLossError,
    TrainingOutOfMemoryError,
    evaluate,
    fit,
    make_loader,
)
from pipeline.training.data import EpochSampler, SeededSamples, ShardSampler
from pipeline.training.speed import backend_flags, check_training, convert_sync_batchnorm, restore_batchnorm
from pipeline.training.state import load_state
from tests.trainkit import DATA, OPTIM, Scripted, TinyNet, fit_scripted, tiny_data

CPU = torch.device("cpu")


@pytest.fixture
def data():
    return tiny_data()


def _train(data, scratch=None, fail_at=0, failure="crash", workers=0, training=None, logdir=None, optim=OPTIM):
    return fit_scripted(
        data,
        training or TrainingConfig(checkpoint_every=2),
        scratch=scratch,
        fail_at=fail_at,
        failure=failure,
        logdir=logdir,
        optim=optim,
        data_cfg=DataConfig(**{**DATA.__dict__, "workers": workers}),
    )


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs"


def test_resume_mid_epoch_reproduces_the_uninterrupted_run_bit_for_bit(data, tmp_path):
    reference, ref_history = _train(data)
    # Checkpoints every 2 steps: the kill at forward call 6 (epoch 2, step 3) leaves the state after step 4.
    with pytest.raises(KeyboardInterrupt):
        _train(data, scratch=tmp_path, fail_at=6)
    saved = load_state(tmp_path / RESUME_FILE)
    assert (saved["epoch"], saved["step"], saved["global_step"]) == (1, 1, 4)
    # Resume with DataLoader workers: augmentation is seeded per sample, so workers do not change the batches.
    resumed, history = _train(data, scratch=tmp_path, workers=2)
    assert resumed.calls == 2  # only the two remaining steps ran
    _assert_same_weights(resumed.student, reference.student)
    assert [r["loss/ce"] for r in history.epochs] == [r["loss/ce"] for r in ref_history.epochs]
    assert [r["val_top1"] for r in history.epochs] == [r["val_top1"] for r in ref_history.epochs]


def test_a_finished_run_resumes_to_the_same_result_without_training(data, tmp_path):
    first, _ = _train(data, scratch=tmp_path)
    again, history = _train(data, scratch=tmp_path)
    assert again.calls == 0 and len(history.epochs) == OPTIM.epochs
    _assert_same_weights(first.student, again.student)


def test_non_finite_loss_names_step_and_term_and_keeps_the_last_good_checkpoint(data, tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        _train(data, scratch=tmp_path, fail_at=5, failure="nan", training=TrainingConfig(checkpoint_every=0))
    message = str(info.value)
    assert "non-finite loss term 'aux' at epoch 2, step 2 (global step 5)" in message
    assert "ce=" in message and "aux=nan" in message
    assert str(tmp_path / RESUME_FILE) in message
    state = load_state(tmp_path / RESUME_FILE)
    assert (state["epoch"], state["step"]) == (1, 0)  # the end of epoch 1, the last good state
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("failure", ["oom", "cpu_oom"])
def test_out_of_memory_suggests_a_smaller_batch(data, failure):
    with pytest.raises(TrainingOutOfMemoryError, match=r"at epoch 1, step 2.*--set data.batch_size=8"):
        _train(data, fail_at=2, failure=failure)


def test_tensorboard_events_hold_every_named_scalar(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(data, logdir=tmp_path / "tb", training=TrainingConfig(log_every=1))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/loss/ce", "train/loss/aux", "train/lr", "train/top1", "train/images_per_s"}
    assert expected | {"val/top1", "val/loss"} <= tags
    assert [e.step for e in events.Scalars("train/loss/ce")] == list(range(1, 7))
    assert [e.value for e in events.Scalars("train/lr")][-1] == pytest.approx(0.005)  # decayed at milestone 1
    assert all(math.isfinite(e.value) and e.value > 0 for e in events.Scalars("train/images_per_s"))


@pytest.mark.parametrize("writers_before", [0, 9])
def test_tensorboard_curves_continue_after_a_resume_without_the_killed_runs_points(
    data, tmp_path, monkeypatch, writers_before
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer import event_file_writer

    # An event file is named by its second, then a per-process writer count: at 9 writers the killed
    # run's file ends in .9 and a resume in the same second writes .10, which sorts first.
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(writers_before))
    training = TrainingConfig(log_every=1, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):  # killed in step 6; steps 1-5 logged, checkpoint after step 4
        _train(data, scratch=tmp_path / "scratch", fail_at=6, logdir=tmp_path / "tb", training=training)
    _train(data, scratch=tmp_path / "scratch", logdir=tmp_path / "tb", training=training)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss/ce")] == list(range(1, 7))


def test_extra_batch_items_reach_the_distiller(data):
    class WithIndex(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, i):
            return (*self.dataset[i], i)

    torch.manual_seed(0)
    distiller = Scripted(TinyNet())
    train = WithIndex(data.dataset("train", augment=True))
    fit(distiller, make_loader(train, DATA, train=True), None, OptimConfig(epochs=1), CPU, log=lambda _: None)
    (indices,) = distiller.seen_extra[0]
    assert indices.shape == (DATA.batch_size,) and indices.dtype == torch.int64
    assert len({i for (batch,) in distiller.seen_extra for i in batch.tolist()}) == 3 * DATA.batch_size


def test_bf16_autocast_on_cpu_leaves_fp32_islands_and_fp32_weights(data):
    distiller, history = _train(data, training=TrainingConfig(amp="bf16"), optim=OptimConfig(epochs=1))
    assert distiller.dtypes == {"logits": torch.bfloat16, "fp32_island": torch.float32}
    assert all(p.dtype == torch.float32 for p in distiller.parameters())
    assert math.isfinite(history.last["loss/ce"])


def test_channels_last_on_cpu(data):
    distiller, _ = _train(data, training=TrainingConfig(channels_last=True), optim=OptimConfig(epochs=1))
    assert distiller.student.conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"amp": "fp8"}, "training.amp must be one of none, bf16, fp16"),
        ({"amp": "fp16"}, "training.amp=fp16 needs a CUDA device"),
        ({"sync_bn": True}, "training.sync_bn needs CUDA devices"),
        ({"deterministic": True, "cudnn_benchmark": True}, "conflicts with training.cudnn_benchmark"),
        ({"checkpoint_every": -1}, "training.checkpoint_every must be >= 0"),
        ({"log_every": 0}, "training.log_every must be >= 1"),
        ({"val_every": 0}, "training.val_every must be >= 1"),
    ],
)
def test_impossible_training_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        check_training(TrainingConfig(**options), CPU)


def test_deterministic_mode_lasts_only_while_training():
    assert not torch.are_deterministic_algorithms_enabled()
    with backend_flags(TrainingConfig(deterministic=True), CPU):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()


def test_cli_reports_a_bad_training_option_in_one_line(tiny_overrides, tmp_path, capsys):
    from pipeline.cli import run_cli

    args = [a for item in [*tiny_overrides, "training.amp=fp16"] for a in ("--set", item)]
    assert run_cli(["run", "teacher", "--device", "cpu", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert "error: training.amp=fp16 needs a CUDA device" in err and "Traceback" not in err
    assert not (tmp_path / "teacher").exists()


def test_global_batch_must_split_evenly_and_fit_the_data(data):
    with pytest.raises(ConfigError, match="must be divisible by the number of processes"):
        EpochSampler(100, 15, world_size=2)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        EpochSampler(10, 16)


def test_ranks_share_each_global_batch_and_resume_mid_epoch():
    single = EpochSampler(50, 8, seed=1)
    ranks = [EpochSampler(50, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for sampler in (single, *ranks):
        sampler.set_epoch(3)
    batches = [list(single)[i : i + 8] for i in range(0, len(single), 8)]
    shards = [list(r) for r in ranks]
    assert len(batches) == 6 and all(len(s) == 24 for s in shards)  # 50 // 8 global batches, the rest dropped
    for k, batch in enumerate(batches):
        assert sorted(batch) == sorted(shards[0][4 * k : 4 * k + 4] + shards[1][4 * k : 4 * k + 4])
    assert {epoch for _, epoch in batches[0]} == {3}
    single.set_epoch(3, start_step=2)
    assert list(single) == [key for batch in batches[2:] for key in batch]
    single.set_epoch(4)
    assert [k for k, _ in single] != [k for batch in batches for k, _ in batch]  # reshuffled per epoch


def test_augmentation_depends_on_the_sample_key_only(data):
    samples = SeededSamples(data.dataset("train", augment=True), seed=5)
    first = samples[(7, 2)][0]
    torch.rand(100)  # the caller's RNG state does not matter, and is left alone
    state = torch.get_rng_state()
    assert torch.equal(samples[(7, 2)][0], first)
    assert torch.equal(torch.get_rng_state(), state)
    assert any(not torch.equal(samples[(7, epoch)][0], first) for epoch in (3, 4, 5))


def test_shards_cover_the_evaluation_set_once():
    shards = [list(ShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert [len(ShardSampler(10, r, 3)) for r in range(3)] == [4, 3, 3]


def test_evaluate_counts_every_sample(data):
    torch.manual_seed(0)
    model = TinyNet()
    result = evaluate(model, make_loader(data.dataset("test"), DATA, train=False), CPU)
    assert 0.0 <= result["top1"] <= 100.0 and result["loss"] > 0
    assert result["top1"] * 16 / 100 == pytest.approx(round(result["top1"] * 16 / 100))


def test_sync_batchnorm_swap_is_undone_with_the_trained_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(2)))
    originals = convert_sync_batchnorm(model)
    assert set(originals) == {"1", "2.0"}
    assert isinstance(model[1], nn.SyncBatchNorm) and isinstance(model[2][0], nn.SyncBatchNorm)
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
        model[1].weight.fill_(2.0)
    restore_batchnorm(model, originals)
    assert type(model[1]) is nn.BatchNorm2d and type(model[2][0]) is nn.BatchNorm1d
    assert torch.all(model[1].running_mean == 3.0) and torch.all(model[1].weight == 2.0)


def test_kd_trains_under_fit_with_the_teacher_left_out_of_the_state(data, tmp_path):
    torch.manual_seed(0)
    distiller = build_distiller("kd", TinyNet(), TinyNet())
    fit(
        distiller,
        make_loader(data.dataset("train", augment=True), DATA, train=True),
        None,
        OptimConfig(epochs=1),
        CPU,
        scratch=tmp_path,
        log=lambda _: None,
    )
    state = load_state(tmp_path / RESUME_FILE)
    assert state["model"].keys() == distiller.state_dict().keys()
    assert not any(key.startswith("teacher.") for key in state["model"])
    assert distiller.teacher.training is False


@pytest.mark.parametrize(
    "change, message",
    [
        ({"epochs": 0}, r"epochs must be in \[1, 100000\]"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"momentum": 0.0, "nesterov": True}, "nesterov needs a momentum"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0"),
        ({"lr_decay": 0.0}, "lr_decay must be positive"),
        ({"milestones": [5, -1]}, r"milestones must be at most 1000 epochs in \[0, 100000\]"),
        ({"schedule": "cos"}, "schedule must be one of step, cosine"),
    ],
)
def test_check_optim_names_each_unusable_setting(change, message):
    import dataclasses

    from pipeline.config import OptimConfig
    from pipeline.errors import ConfigError
    from pipeline.training import check_optim

    check_optim(OptimConfig(), "student.optim")
    with pytest.raises(ConfigError, match=f"^student.optim: {message}"):
        check_optim(dataclasses.replace(OptimConfig(), **change), "student.optim")


@pytest.mark.slow
def test_per_epoch_test_scores_are_optional_and_do_not_change_the_final_figure(tmp_path, tiny_overrides):
    """``training.test_each_epoch=false`` only drops the per-epoch test passes: same weights, same test top-1."""
    import json
    import shutil

    from pipeline.artifacts.store import RunStore
    from pipeline.cli.runner import run_stages
    from pipeline.config import load_config

    sets = [*tiny_overrides, "student.optim.epochs=2"]
    run_stages(load_config("default", None, sets), tmp_path / "each", ("teacher", "train"), log=lambda _: None)
    (tmp_path / "last").mkdir()
    shutil.copytree(tmp_path / "each" / "teacher", tmp_path / "last" / "teacher")
    cfg = load_config("default", None, [*sets, "training.test_each_epoch=false"])
    run_stages(cfg, tmp_path / "last", ("train",), log=lambda _: None)

    each, last = RunStore(tmp_path / "each"), RunStore(tmp_path / "last")
    history = json.loads((tmp_path / "each" / "train" / "history.json").read_text())
    assert [("test_top1" in e) for e in history] == [True, True]
    assert not any("test_top1" in e for e in json.loads((tmp_path / "last" / "train" / "history.json").read_text()))
    assert each.manifest("train").metrics["test_top1"] == history[-1]["test_top1"]
    assert last.manifest("train").metrics["test_top1"] == each.manifest("train").metrics["test_top1"]
    weights = [(tmp_path / run / "train" / "student.safetensors").read_bytes() for run in ("each", "last")]
    assert weights[0] == weights[1]  # the extra test passes draw no random numbers the training uses


@pytest.mark.slow
def test_val_every_scores_fewer_epochs_and_keeps_the_weights(tmp_path, tiny_overrides):
    """``training.val_every=2`` over 3 epochs scores val after epochs 2 and 3 (the last always), and the weights
    are those of scoring every epoch: the teacher preset skips passes without changing the teacher it hashes."""
    import json

    from pipeline.artifacts.store import RunStore
    from pipeline.cli.runner import run_stages
    from pipeline.config import load_config

    sets = [*tiny_overrides, "teacher.optim.epochs=3"]
    for name, every in (("each", 1), ("every2", 2)):
        cfg = load_config("default", None, [*sets, f"training.val_every={every}"])
        run_stages(cfg, tmp_path / name, ("teacher",), log=lambda _: None)
    scored = [
        [e["epoch"] for e in json.loads((tmp_path / name / "teacher" / "history.json").read_text()) if "val_top1" in e]
        for name in ("each", "every2")
    ]
    assert scored == [[1, 2, 3], [2, 3]]
    each, every2 = RunStore(tmp_path / "each").manifest("teacher"), RunStore(tmp_path / "every2").manifest("teacher")
    assert every2.metrics["val_top1"] == each.metrics["val_top1"] is not None
    weights = [(tmp_path / name / "teacher" / "teacher.safetensors").read_bytes() for name in ("each", "every2")]
    assert weights[0] == weights[1]


def test_the_report_joins_the_epochs_that_scored_val(monkeypatch):
    """With ``val_every`` the history has val figures on some epochs only: one line through those, none broken."""
    import matplotlib.pyplot as plt

    from pipeline.report import plots

    figures = []
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or b"png")
    history = [
        {"epoch": e, "train_top1": 50.0 + e, **({"val_top1": 40.0 + e, "val_loss": 1 / e} if e in (2, 4, 5) else {})}
        for e in range(1, 6)
    ]
    assert plots.training_curves(history, "teacher") == b"png"
    left, right = figures[0].axes
    plt.close(figures[0])
    assert {line.get_label(): list(line.get_xdata()) for line in right.get_lines()} == {
        "train": [1, 2, 3, 4, 5],
        "val (held out)": [2, 4, 5],
    }
    assert [(line.get_label(), list(line.get_xdata())) for line in left.get_lines()] == [
        ("val cross-entropy", [2, 4, 5])
    ]
