"""``--teacher-checkpoint``: a teacher-zoo file is loaded strictly, checked, evaluated and recorded."""

import pytest
import torch

from pipeline.artifacts.checkpoint import load_checkpoint
from pipeline.artifacts.store import RunStore
from pipeline.cli import run_cli
from pipeline.config import load_config
from pipeline.data import Transformed, load_data
from pipeline.data.transforms import build_transform
from pipeline.models import build_model
from tests.fake_data import write_cifar100

PRESET = "cifar100-resnet32x4-shufflev1"
CIFAR_ARGS = ["--method", "kd", "--set", "data.verify_checksums=false", "--set", "data.workers=0"]
TEACHER = "resnet8x4"  # a zoo model that is quick on a CPU, in place of the preset's resnet32x4


def _zoo_file(path, model: torch.nn.Module, legacy: bool = False):
    """A RepDistiller / mdistiller teacher file: ``{'epoch', 'model', 'accuracy', 'optimizer'}``."""
    state = model.state_dict()
    if legacy:  # saved before PyTorch 0.4.1: no BatchNorm counters
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"epoch": 240, "model": state, "accuracy": torch.tensor(79.42), "optimizer": optimizer.state_dict()}
    torch.save(content, path)
    return path


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-default BatchNorm statistics, so a silently skipped load would show."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def _predict(model: torch.nn.Module, dataset) -> list[int]:
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        return model(images).argmax(1).tolist()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The user's command for a CIFAR preset, with a teacher file from the zoo.

    The data are labelled so that the teacher is right on exactly the images whose index is not a
    multiple of 3, which makes its accuracy on any split known in advance.
    """
    base = tmp_path_factory.mktemp("import")
    root = base / "data"
    write_cifar100(root, n_train=60, n_test=60)
    torch.manual_seed(0)
    teacher = _randomized(build_model(TEACHER, 100), seed=1)
    cfg = load_config(PRESET, None, [f"data.root={root}", "data.workers=0", "data.verify_checksums=false"])
    bundle = load_data(cfg.data, seed=cfg.seed)
    evaluation = build_transform(bundle.info, train=False)
    labels = {}
    for split, source in (("train", bundle.raw.train), ("test", bundle.raw.test)):
        predicted = _predict(teacher, Transformed(source, evaluation))
        labels[split] = [p if i % 3 else (p + 1) % 100 for i, p in enumerate(predicted)]
    write_cifar100(root, n_train=60, n_test=60, labels=labels)
    path = _zoo_file(base / f"{TEACHER}_vanilla" / "ckpt_epoch_240.pth", teacher)
    out = base / "run"
    argv = ["run", "teacher", "--preset", PRESET, "--data-root", str(root), "--teacher-checkpoint", str(path)]
    code = run_cli([*argv, *CIFAR_ARGS, "--set", f"teacher.arch={TEACHER}", "--out", str(out)])
    val_indices = bundle.source("val").indices
    return code, out, path, teacher, val_indices


def test_zoo_checkpoint_imports_through_the_cli(imported):
    code, out, path, teacher, _ = imported
    assert code == 0
    manifest = RunStore(out).manifest("teacher")
    assert manifest.status == "ok"
    assert manifest.metrics["imported_from"] == str(path)
    assert "optim" not in manifest.params  # an imported teacher's fingerprint does not depend on a recipe
    (external,) = [a for a in manifest.inputs if a.source == "external"]
    assert external.path == str(path.resolve()) and len(external.sha256) == 64
    state, meta = load_checkpoint(out / "teacher" / "teacher.safetensors")
    assert meta.arch == TEACHER and meta.num_classes == 100 and meta.class_names[3] == "fine_03"
    for key, value in teacher.state_dict().items():
        assert torch.equal(state[key], value), key


def test_imported_teacher_accuracy_is_recorded(imported):
    code, out, *_, val_indices = imported
    assert code == 0
    metrics = RunStore(out).manifest("teacher").metrics
    assert metrics["test_top1"] == pytest.approx(100.0 * 40 / 60)
    right = sum(1 for i in val_indices if i % 3)
    assert len(val_indices) == 6 and metrics["val_top1"] == pytest.approx(100.0 * right / len(val_indices))


def test_legacy_checkpoint_without_batchnorm_counters(tmp_path, tiny_overrides, capsys):
    teacher = _randomized(build_model("resnet20", 4), seed=2)
    path = _zoo_file(tmp_path / "resnet20_vanilla" / "ckpt_epoch_240.pth", teacher, legacy=True)
    args = [a for item in tiny_overrides for a in ("--set", item)]
    code = run_cli(["run", "teacher", "--teacher-checkpoint", str(path), *args, "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    assert "predates PyTorch 0.4.1; added" in capsys.readouterr().err
    state, _ = load_checkpoint(tmp_path / "run" / "teacher" / "teacher.safetensors")
    assert torch.equal(state["bn1.running_mean"], teacher.state_dict()["bn1.running_mean"])


@pytest.mark.parametrize(
    "arch, classes, message",
    [
        ("resnet20", 10, "has 10 outputs (fc.weight: (10, 64)) but dataset 'synthetic' has 4 classes"),
        ("resnet56", 4, "does not fit architecture resnet20"),
    ],
)
def test_mismatched_checkpoints_are_refused(tmp_path, tiny_overrides, capsys, arch, classes, message):
    path = _zoo_file(tmp_path / "ckpt.pth", build_model(arch, classes))
    args = [a for item in tiny_overrides for a in ("--set", item)]
    code = run_cli(["run", "teacher", "--teacher-checkpoint", str(path), *args, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "teacher").exists()


def test_preset_without_teacher_checkpoint_stops_before_any_work(tmp_path, capsys):
    argv = ["run", "all", "--preset", PRESET, "--data-root", str(tmp_path), *CIFAR_ARGS, "--out", str(tmp_path / "run")]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert "pass --teacher-checkpoint FILE" in err and "resnet32x4_vanilla/ckpt_epoch_240.pth" in err
    assert "--set teacher.source=train (240 epochs)" in err
    assert not list((tmp_path / "run").glob("*/manifest.json"))


@pytest.mark.parametrize(
    "sets, message",
    [
        (["teacher.source=train", "teacher.checkpoint=x.pth"], "teacher.source=train conflicts"),
        (["teacher.source=download"], "teacher.source must be one of auto, import, train"),
    ],
)
def test_teacher_source_errors(tmp_path, capsys, sets, message):
    args = [a for item in sets for a in ("--set", item)]
    assert run_cli(["run", "teacher", *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
