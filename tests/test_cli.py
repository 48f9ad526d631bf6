"""The CLI surface: help on every command, and one-line errors with exit status 2 for user mistakes."""

import json

import pytest

from pipeline.cli import cli, run_cli


@pytest.mark.parametrize("command", [[], *[[name] for name in cli.commands]])
def test_help(command, capsys):
    assert run_cli([*command, "--help"]) == 0
    assert "Usage:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "nostage"], "unknown stage 'nostage'; choose one of: engine, export, fuse, teacher, train, verify"),
        (["run", "--keep", "teachr"], "unknown stage 'teachr'; choose one of"),
        (["run", "--preset", "nope"], "unknown preset 'nope'"),
        (["run", "--set", "student.arch=nonet"], "unknown model 'nonet'"),
        (["run", "--set", "student.optim.epochz=1"], "unknown config key 'student.optim.epochz'"),
        (["run", "train", "--checkpoint", "x.safetensors"], "--checkpoint is for `run export`"),
        (["run", "train", "export", "--checkpoint", "x.safetensors"], "--checkpoint is for `run export`"),
        (["run", "teacher", "--teacher-checkpoint", "/no/such.pth"], "does not exist"),
        (["run", "export", "--checkpoint", "/no/such.safetensors"], "does not exist"),
        (["run", "fuse"], "stage 'train' has no artifacts"),
        (["run", "--method", "nomethod", "train"], "unknown method 'nomethod'"),
        (["run", "train"], "stage 'teacher' has no artifacts"),
        (["run", "--set", "student.optim.lr=-1"], "student.optim: lr must be positive, got -1"),
        (["run", "teacher", "--set", "teacher.optim.schedule=cosin"], "schedule must be one of step, cosine"),
        (["run", "--set", "student.optim.momentum=0", "--set", "student.optim.nesterov=true"], "nesterov needs"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, capsys, tmp_path):
    code = run_cli([*argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err
    assert not any((tmp_path / "run").glob("*/manifest.json"))


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run_cli(["run", "teacher", "--out", str(blocker / "run")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_inspect_needs_a_run_folder(tmp_path, capsys):
    assert run_cli(["inspect", str(tmp_path)]) == 2
    assert "holds no stage manifests" in capsys.readouterr().err
    (tmp_path / "sweep.json").write_text('{"cells": [], "teachers": []}')
    assert run_cli(["inspect", str(tmp_path)]) == 2
    assert f"is a sweep folder: inspect one of its runs ({tmp_path}/cells/<cell>)" in capsys.readouterr().err


def test_inspect_on_a_stage_folder_names_its_run(tmp_path, capsys):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "manifest.json").write_text("{}")
    assert run_cli(["inspect", str(tmp_path / "export")]) == 2
    assert f"is the export stage of a run: inspect the run, {tmp_path}" in capsys.readouterr().err


def test_listings(capsys):
    assert run_cli(["presets"]) == 0
    assert "default" in capsys.readouterr().out
    assert run_cli(["methods"]) == 0
    assert "kd" in capsys.readouterr().out


def test_presets_name_prints_the_preset_file_with_its_comments(capsys):
    from pipeline.config import load_config

    assert run_cli(["presets", "fmnist-teacher-resnet20"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# Fashion-MNIST: the strong teacher")
    assert "python -m pipeline run teacher --preset fmnist-teacher-resnet20" in text
    assert f"epochs: {load_config('fmnist-teacher-resnet20').teacher.optim.epochs}" in text
    for name in ("../../pyproject", "nope", ""):  # looked up among the shipped presets, never as a path
        assert run_cli(["presets", name]) == 2
        assert capsys.readouterr().err.startswith("error: unknown preset" if name else "error: NAME is empty")


def test_presets_json_lists_every_preset_with_its_pair(capsys):
    from pipeline.config import list_presets, load_config

    assert run_cli(["presets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(list_presets())
    default = load_config("default")
    assert (rows["default"]["teacher"], rows["default"]["student"]) == (default.teacher.arch, default.student.arch)
    assert rows["cifar100-resnet32x4-shufflev1"]["expected"]


@pytest.mark.slow
def test_models_json_gives_every_model_with_its_100_class_parameter_count(capsys):
    from pipeline.models import list_models

    assert run_cli(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(list_models())
    # design §5 figures (100 classes)
    assert rows["resnet8x4"]["parameters"] == 1_233_540 and rows["resnet8x4"]["input_size"] == 32
    assert rows["ShuffleV1"]["parameters"] == 949_258
    assert rows["swin_t"]["family"] != "cifar" and rows["swin_t"]["input_size"] == 224


def test_a_missing_optional_package_names_its_install_command():
    from exports.deps import require
    from exports.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match=r"tensorrt.*pip install 'kdiffusion-pipeline\[tensorrt\]'"):
        require("tensorrt.no_such_submodule_here")


@pytest.mark.parametrize(
    "setting, message",
    [
        ("data.batch_size=0", "data.batch_size must be at least 1"),
        ("data.workers=-1", "data.workers must be at least 0"),
        ("data.num_classes=1", "data.num_classes must be at least 2"),
        ("data.val_fraction=1.5", "data.val_fraction must be in [0, 1)"),
        ("data.synthetic.test_size=0", "data.synthetic.test_size must be at least 1"),
        ("verify.samples=0", "verify.samples must be at least 1"),
        ("seed=-5", "seed must be in [0, 2**32)"),
    ],
)
def test_unusable_numbers_are_refused_before_any_stage(setting, message, tmp_path, capsys):
    assert run_cli(["run", "all", "--set", setting, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and "running" not in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_inspect_lists_stages_in_pipeline_order(tmp_path, capsys):
    """A run reads top to bottom: teacher first, engine last, in the text and in the JSON."""
    from pipeline.artifacts.manifest import Manifest
    from pipeline.artifacts.store import RunStore
    from stages import stage_order

    store = RunStore(tmp_path)
    for stage in sorted(stage_order()):
        store.commit(store.staging(stage), Manifest(stage, "ok", {}, [], [], [], "code"))
    assert run_cli(["inspect", str(tmp_path)]) == 0
    shown = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert shown == list(stage_order())
    assert run_cli(["inspect", str(tmp_path), "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == list(stage_order())


def _console_script() -> list[str]:
    """What the installed ``kdpipe`` runs, read from pyproject.toml: pip's wrapper imports the entry and calls it."""
    import sys
    from pathlib import Path

    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["kdpipe"].partition(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


@pytest.mark.parametrize("entry", ["python -m pipeline", "kdpipe"])
@pytest.mark.parametrize("package", ["torch", "click"])
def test_a_core_package_that_does_not_import_is_one_line(package, entry, tmp_path):
    """An install whose torch (or click, imported before the CLI exists) is broken gets the fix, not a traceback,
    from either entry point."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("raise ImportError('libsomething.so: cannot open shared object')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "pipeline"] if entry == "python -m pipeline" else _console_script()
    done = subprocess.run([*command, "methods"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: {package} is not installed or cannot be imported (")
    assert f"; install it with: pip install '{package}>=" in done.stderr


def test_a_long_message_is_clipped_to_one_line_keeping_its_start_and_end():
    from pipeline.errors import clipped

    long = "start " + "x" * 1000 + " names model.onnx"
    assert clipped("short") == "short" and len(clipped(long)) <= 400
    assert clipped(long).startswith("start x") and clipped(long).endswith("names model.onnx")
    assert len(clipped(long, 300)) <= 300


@pytest.mark.parametrize(
    "raised",
    [
        RuntimeError(
            "unable to mmap 3322837232 bytes from file <run/train/student.safetensors>: Cannot allocate memory (12)"
        ),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1"
        ),
        MemoryError(),
    ],
)
def test_running_out_of_memory_is_one_line_with_exit_2(raised, monkeypatch, tmp_path, capsys):
    """The machine's limit, not a bug: safetensors mapping a 3.3 GB checkpoint under a 20 GiB address-space limit
    (the support matrix's torchvision regnet_y_128gf) raised a RuntimeError that reached the user as a traceback."""
    import pipeline.cli.runner

    def run_stages(*args, **kwargs):
        raise raised

    monkeypatch.setattr(pipeline.cli.runner, "run_stages", run_stages)
    assert run_cli(["run", "teacher", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of memory: ") and "lower data.batch_size" in err[0]


def test_a_runtime_error_that_is_not_memory_is_still_raised(monkeypatch, tmp_path):
    import pipeline.cli.runner

    def run_stages(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline.cli.runner, "run_stages", run_stages)
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(["run", "teacher", "--out", str(tmp_path / "run")])
