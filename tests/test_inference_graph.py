"""The distillation teacher as a graph optimized for inference (``training.teacher_graph``), without timing.

What is checked: the graph gives the module's logits and tapped features up to float rounding at any batch size
and layout, the methods that read the teacher by one eval-mode forward train through it (backward included) to
the losses they reach without it, ``auto`` turns it on only on a CPU in fp32 without compile, a method that runs
its teacher otherwise (OFD's batch statistics) keeps the module, and a teacher the tracer cannot follow runs as
itself, with the reason logged.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import OptimConfig, TrainingConfig, load_config
from pipeline.distill import build_distiller
from pipeline.distill.features import TappedModel, tapped_forward
from pipeline.errors import ConfigError
from pipeline.models import build_model
from pipeline.models.inference_graph import inference_graph
from pipeline.training import fit, make_loader
from pipeline.training.speed import check_training, resolve
from tests.trainkit import DATA, TinyNet, tiny_data

CPU = torch.device("cpu")


def _teacher(arch: str = "resnet20") -> nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, 4).eval()
    for module in model.modules():  # running statistics away from (0, 1), so folding BatchNorm matters
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def test_the_graph_gives_the_modules_logits_at_any_batch_size_and_layout():
    teacher = _teacher().to(memory_format=torch.channels_last)
    example = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    graph, why = inference_graph(teacher, example)
    assert graph is not None and why == ""
    for n in (8, 3, 1):  # the last batch of an epoch is smaller
        images = torch.randn(n, 3, 32, 32)
        with torch.inference_mode():
            expected = teacher(images)
            for layout in (torch.contiguous_format, torch.channels_last):
                got = graph(images.contiguous(memory_format=layout))
                assert got.shape == expected.shape
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


class DictOut(nn.Module):
    def forward(self, x):
        return {"logits": x.mean(dim=(2, 3))}


class BranchOnValue(nn.Module):
    """Control flow on a value: the trace follows one branch, which the check on the example catches or not;
    either way the graph must give the module's logits on the example."""

    def forward(self, x):
        return x.mean(dim=(2, 3)) if float(x.sum()) > 0 else -x.mean(dim=(2, 3))


def test_a_teacher_the_tracer_cannot_follow_runs_as_itself_with_the_reason():
    graph, why = inference_graph(DictOut(), torch.randn(2, 3, 8, 8))
    assert graph is None and why.startswith("tracing failed (") and "\n" not in why
    graph, why = inference_graph(BranchOnValue(), torch.randn(2, 3, 8, 8))
    assert (graph is None) == bool(why)


def _graphed(distiller) -> bool:
    return any(graph is not None for graph in distiller._teacher_graphs.values())


def test_the_graph_gives_the_modules_features_too():
    teacher = _teacher()
    taps = teacher.info.stages
    graph, why = inference_graph(TappedModel(teacher, taps), torch.randn(4, 3, 32, 32))
    assert graph is not None and why == ""
    images = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        expected, features = tapped_forward(teacher, taps, images)
        logits, *got = graph(images)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert len(got) == len(features) == len(taps)
    for have, want in zip(got, features):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["kd", "dkd", "kdiffusion", "fitnet", "at", "vid", "reviewkd"])
def test_the_methods_train_through_the_graph_to_the_same_losses(method):
    images, targets = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    runs = []
    for graph in (False, True):
        torch.manual_seed(1)
        distiller = build_distiller(method, build_model("resnet20", 4), _teacher(), {})
        if graph:
            distiller.use_teacher_graph()
        distiller.train()
        _, losses = distiller(images, targets)
        sum(losses.values()).backward()  # the losses that save the teacher's outputs for backward
        assert _graphed(distiller) == graph and distiller.teacher_graph_note == ""
        runs.append({k: float(v.detach()) for k, v in losses.items()})
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        assert runs[1][name] == pytest.approx(runs[0][name], rel=1e-4, abs=1e-6), name


def test_a_method_that_runs_its_teacher_otherwise_keeps_its_teacher_module():
    distiller = build_distiller("ofd", build_model("resnet20", 4), _teacher(), {})
    assert not distiller.teacher_graph_ok
    with pytest.raises(ValueError, match="reads its teacher other than by one eval-mode forward"):
        distiller.use_teacher_graph()


@pytest.mark.parametrize(
    "options, device, expected",
    [({}, "cpu", True), ({"amp": "bf16"}, "cpu", False), ({"compile": True}, "cpu", False),
     ({}, "cuda", False), ({"teacher_graph": False}, "cpu", False)],
)  # fmt: skip
def test_auto_is_on_only_on_a_cpu_in_fp32_without_compile(options, device, expected):
    assert resolve(TrainingConfig(**options), device).teacher_graph is expected


def test_the_default_config_asks_for_it_and_impossible_or_unknown_settings_are_config_errors():
    assert load_config("default", None, []).training.teacher_graph == "auto"
    with pytest.raises(ConfigError, match="training.teacher_graph must be true, false or auto"):
        check_training(TrainingConfig(teacher_graph="fast"), CPU)
    with pytest.raises(ConfigError, match="needs a CPU, training.amp=none"):
        check_training(TrainingConfig(teacher_graph=True, amp="bf16"), CPU)
    check_training(TrainingConfig(teacher_graph=True), CPU)


class Lookup(nn.Module):
    """A teacher whose forward returns a dict: untraceable, so KD must train with the module itself."""

    def __init__(self):
        super().__init__()
        self.net = TinyNet()

    def forward(self, x):
        return self.net(x)

    def __call__(self, x):  # what the tracer sees differs from what the module returns: a dict
        if torch.jit.is_tracing():
            return {"logits": super().__call__(x)}
        return super().__call__(x)


def test_fit_logs_the_graph_and_falls_back_to_the_module_with_the_reason():
    loader = make_loader(tiny_data().dataset("train", augment=True), DATA, train=True)
    optim = OptimConfig(epochs=1, milestones=[])
    lines: list[str] = []
    torch.manual_seed(0)
    distiller = build_distiller("kd", TinyNet(), TinyNet(), {})
    fit(distiller, loader, None, optim, CPU, log=lines.append, training=TrainingConfig())
    assert any(
        "the teacher is traced on the first batch into a graph optimized for inference" in line for line in lines
    )
    assert _graphed(distiller)

    lines.clear()
    distiller = build_distiller("kd", TinyNet(), Lookup(), {})
    fit(distiller, loader, None, optim, CPU, log=lines.append, training=TrainingConfig())
    fallback = [line for line in lines if "the teacher runs as a module, not a graph: tracing failed" in line]
    assert len(fallback) == 1 and not _graphed(distiller)

    lines.clear()
    distiller = build_distiller("kd", TinyNet(), TinyNet(), {})
    fit(distiller, loader, None, optim, CPU, log=lines.append, training=TrainingConfig(teacher_graph=False))
    assert not any("graph" in line for line in lines) and not _graphed(distiller)
