"""docs/extending.md, done as it says: its code blocks, the edits its steps name, and the commands it shows.

A code block whose first line is ``# <file>.py`` is a file of the walkthrough (``(appended)``: added at the end
of that project file). The in-project route runs in a copy of the project, so the working tree is untouched;
the from-your-own-code route runs in this process, with every registry put back as it was afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from tests.conftest import TINY

PROJECT = Path(__file__).resolve().parent.parent
DOC = PROJECT / "docs" / "extending.md"
FILE_LINE = re.compile(r"# (?P<path>[\w/]+\.py)(?P<appended> \(appended\))?$")
# The tiny run of every walkthrough: the shared tiny settings, fp32 ONNX alone, the quicker TorchScript exporter.
SMALL = [*TINY, "export.precisions=[fp32]", "export.dynamo=false"]


def doc_blocks() -> dict[str, tuple[str, bool]]:
    """File named on a python block's first line -> (the block, whether it is appended to that file)."""
    blocks = {}
    for code in re.findall(r"^```python\n(.*?)^```$", DOC.read_text(), flags=re.M | re.S):
        first = FILE_LINE.match(code.splitlines()[0])
        if first:
            blocks[first["path"]] = (code, bool(first["appended"]))
    return blocks


def as_module(name: str, path: str) -> types.ModuleType:
    """The doc's block for ``path`` imported as module ``name`` (which runs its registrations)."""
    module = types.ModuleType(name)
    code, _ = doc_blocks()[path]
    exec(compile(code, f"{DOC}:{path}", "exec"), module.__dict__)
    return module


@pytest.fixture
def registries():
    """Every registry as it was before the test: whatever the test registers is gone afterwards."""
    from exports.precisions import PRECISIONS
    from pipeline.distill.catalog import METHODS
    from pipeline.models import MODELS, list_models
    from stages import STAGES, load_stages

    list_models(), load_stages()  # the project's own entries are in before the snapshot
    saved = {registry: dict(registry._items) for registry in (METHODS, MODELS, STAGES, PRECISIONS)}
    yield
    for registry, items in saved.items():
        registry._items.clear()
        registry._items.update(items)


@pytest.fixture
def own_code(registries, monkeypatch):
    """The method and the model of the page, as the modules ``my_methods`` and ``my_models`` of its last route."""
    for name, path in (("my_methods", "distill/feature_l2.py"), ("my_models", "models/cifar/mynet.py")):
        monkeypatch.setitem(sys.modules, name, as_module(name, f"pipeline/{path}"))


def test_the_page_has_a_block_for_each_walkthrough():
    assert set(doc_blocks()) == {
        "pipeline/distill/feature_l2.py",
        "pipeline/models/cifar/mynet.py",
        "stages/sparsity.py",
        "exports/precisions.py",
        "my_run.py",
    }
    assert doc_blocks()["exports/precisions.py"][1], "the precision is appended to the registry's module"


def test_a_registered_model_builds_with_its_info(own_code):
    import torch

    from pipeline.models import build_model, count_parameters, list_models

    assert "mynet" in list_models()
    model = build_model("mynet", num_classes=4)
    assert model.info.name == "mynet" and len(model.info.stages) == len(model.info.reparam_sites) == 3
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    assert count_parameters(model) == 8 * 27 + 16 * 72 + 32 * 144 + 2 * (8 + 16 + 32) + 32 * 4 + 4


def test_method_options_are_refused_before_any_stage(own_code, tmp_path):
    from pipeline.cli.runner import run_stages
    from pipeline.config import load_config

    model = ["teacher.arch=mynet", "student.arch=mynet", "student.method=feature_l2"]
    with pytest.raises(ConfigError, match=r"option feat_weight must be in \[0, 1e\+06\], got -1"):
        run_stages(load_config("default", None, [*model, "student.method_args.feat_weight=-1"]), tmp_path / "run")
    with pytest.raises(ConfigError, match="has no option 'feat'; its options: ce_weight, feat_weight"):
        run_stages(load_config("default", None, [*model, "student.method_args.feat=1"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_your_own_method_and_model_run_every_stage_and_rerun_when_forced(own_code, tmp_path, monkeypatch):
    """``my_run.py`` as the page gives it, at tiny size (``load_config`` starts from :data:`SMALL`)."""
    from pipeline import config
    from pipeline.artifacts.checkpoint import load_checkpoint
    from pipeline.cli.runner import run_stages

    real = config.load_config
    monkeypatch.setattr(config, "load_config", lambda preset, file, sets: real(preset, file, [*SMALL, *sets]))
    monkeypatch.chdir(tmp_path)
    exec(compile(doc_blocks()["my_run.py"][0], f"{DOC}:my_run.py", "exec"), {"__name__": "my_run"})

    run = tmp_path / "runs" / "mine"
    manifests = {p.parent.name: json.loads(p.read_text()) for p in run.glob("*/manifest.json")}
    assert {k: m["status"] for k, m in manifests.items()} == {
        **dict.fromkeys(("teacher", "train", "fuse", "verify", "export"), "ok"),
        "engine": "skipped",
    }
    assert manifests["teacher"]["params"]["arch"] == manifests["train"]["params"]["arch"] == "mynet"
    assert manifests["train"]["params"]["method"] == "feature_l2"
    history = json.loads((run / "train" / "history.json").read_text())
    assert {"loss/ce", "loss/feat"} <= set(history[0])
    state, _ = load_checkpoint(run / "train" / "student.safetensors")
    assert not any("bridge" in key for key in state), "the bridge lives on the method, not in the student"
    assert (run / "export" / "model.onnx").is_file()

    cfg = real("default", None, [*SMALL, "teacher.arch=mynet", "student.arch=mynet", "student.method=feature_l2"])
    assert {o.action for o in run_stages(cfg, run, log=lambda line: None)} == {"up to date", "ran"}  # engine retries
    forced = run_stages(cfg, run, ["train"], force=True, log=lambda line: None)
    assert [(o.stage, o.reason) for o in forced] == [("train", "forced")]
    after = {o.stage: o.reason for o in run_stages(cfg, run, log=lambda line: None)}
    assert after["teacher"] == "" and after["train"] == ""
    assert after["fuse"] and after["verify"] and after["export"], after  # rerun: train was made again


def test_a_stage_is_ordered_by_what_it_requires_but_runs_only_from_stages(registries):
    from pipeline.cli.runner import stage_code
    from pipeline.config import Config
    from stages import get_stage, stage_order

    as_module("sparsity_example", "stages/sparsity.py")
    order = stage_order()
    assert order.index("sparsity") == order.index("fuse") + 1, order  # after fuse, and before verify by name
    assert get_stage("sparsity").requires(Config()) == ("fuse",)
    with pytest.raises(ValueError, match="'sparsity_example' is not a module of the project packages"):
        stage_code(get_stage("sparsity"))


@pytest.mark.slow
def test_a_timm_name_needs_no_code():
    from click.testing import CliRunner

    from pipeline.cli import cli
    from pipeline.models import build_model, check_model_name

    model = build_model("timm:resnet10t", num_classes=4, input_size=32)
    assert [tap.path for tap in model.info.stages] == ["layer2", "layer3", "layer4"]
    assert len(model.info.reparam_sites) == 3
    described = CliRunner().invoke(cli, ["models", "--describe", "timm:resnet10t", "--size", "32"])
    assert described.exit_code == 0 and "layer4" in described.output, described.output
    with pytest.raises(ConfigError, match="close matches: timm:resnet50"):
        check_model_name("timm:resnet5")


# The in-project route, in a copy of the project.


def _copy_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    for package in ("pipeline", "stages", "exports"):
        shutil.copytree(PROJECT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    return project


def _edit_line(path: Path, starts: str, edit) -> None:
    """Apply ``edit`` to the one line of ``path`` that starts with ``starts`` (the step's edit)."""
    lines = path.read_text().splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.startswith(starts)]
    assert len(hits) == 1, f"{path}: {len(hits)} lines start with {starts!r}; the walkthrough's edit needs one"
    lines[hits[0]] = edit(lines[hits[0]].rstrip("\n")) + "\n"
    path.write_text("".join(lines))


def _add_import(line: str, name: str) -> str:
    code, sep, comment = line.partition("  #")
    return f"{code}, {name}{sep}{comment}"


def _apply_walkthroughs(project: Path) -> None:
    for path, (code, appended) in doc_blocks().items():
        if path == "my_run.py":
            continue
        target = project / path
        target.write_text(target.read_text() + code if appended else code)
    # The edits the steps name: the method in the catalog's import line, the model in its folder's package,
    # the precision in the order.
    catalog = project / "pipeline/distill/catalog.py"
    _edit_line(catalog, "from pipeline.distill import ", lambda s: _add_import(s, "feature_l2"))
    cifar = project / "pipeline/models/cifar/__init__.py"
    _edit_line(cifar, "from pipeline.models.cifar import ", lambda s: _add_import(s, "mynet"))
    _edit_line(cifar, "__all__ = [", lambda s: s.removesuffix("]") + ', "mynet"]')
    order = project / "pipeline/precision_order.py"
    _edit_line(order, "PRECISION_ORDER = (", lambda s: s.removesuffix(")") + ', "fp16_full")')


def _cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(project), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_the_walkthroughs_in_a_copy_of_the_project(tmp_path):
    project = _copy_project(tmp_path)
    _apply_walkthroughs(project)

    methods = _cli(project, "methods")
    assert methods.returncode == 0, methods.stderr
    assert re.search(r"^feature_l2 +CE plus the MSE between", methods.stdout, re.M), methods.stdout
    described = _cli(project, "models", "--describe", "mynet")
    assert described.returncode == 0, described.stderr
    assert described.stdout.startswith("mynet  (cifar, 32 px, ") and "conv3 + bn3" in described.stdout, described.stdout

    small = [a for item in (*TINY, "export.dynamo=false") for a in ("--set", item)]
    mine = ["--set", "teacher.arch=mynet", "--set", "student.arch=mynet", "--out", "run"]
    precisions = ["--set", "export.precisions=[fp32,fp16_full]"]
    first = _cli(project, "run", "all", "--method", "feature_l2", *small, *mine, *precisions)
    assert first.returncode == 0, first.stderr
    ran = re.findall(r"^\[(\w+)\] running", first.stderr, re.M)
    assert ran[ran.index("fuse") + 1] == "sparsity", ran  # after what it requires, before verify (by name)
    run = project / "run"
    manifests = {p.parent.name: json.loads(p.read_text()) for p in run.glob("*/manifest.json")}
    assert manifests["teacher"]["params"]["arch"] == manifests["train"]["params"]["arch"] == "mynet"
    assert manifests["train"]["params"]["method"] == "feature_l2"
    sparsity = manifests["sparsity"]
    assert sparsity["status"] == "ok" and 0 <= sparsity["metrics"]["near_zero_fraction"] < 1
    assert [c["name"] for c in sparsity["checks"]] == ["weights_finite"] and sparsity["checks"][0]["passed"]
    assert any(o["path"] == "sparsity.json" for o in sparsity["outputs"])
    assert "stages/sparsity.py" in sparsity["code_files"]
    assert "pipeline/distill/feature_l2.py" in manifests["train"]["code_files"]
    assert "pipeline/distill/feature_l2.py" not in manifests["teacher"]["code_files"]
    export = manifests["export"]
    assert (run / "export" / "model.fp16_full.onnx").is_file()
    assert any(o["path"] == "model.fp16_full.onnx" for o in export["outputs"])
    cosine = [c for c in export["checks"] if c["name"] == "onnx_fp16_full_min_cosine"]
    assert cosine and cosine[0]["passed"], export["checks"]
    assert "model.fp16_full.onnx" in (run / "export" / "build_engine.sh").read_text()

    # The model's KDiffusion sites: the default method distils it and fuse folds its three blocks.
    kdiffusion = _cli(project, "run", "train", "fuse", "--method", "kdiffusion", *small, *mine)
    assert kdiffusion.returncode == 0, kdiffusion.stderr
    fuse = json.loads((run / "fuse" / "manifest.json").read_text())
    assert fuse["status"] == "ok" and fuse["metrics"]["fused_blocks"] == 3
