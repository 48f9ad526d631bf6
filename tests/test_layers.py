"""The import rules of the layers (design §4, §7), read from the sources with ast (pipeline.code_version).

Dependencies point one way: library <- stages <- runner/CLI. The library is ``pipeline/`` except its top
layer, the modules that order stages and parse the command line (``pipeline/runner.py``, ``pipeline/cli.py``,
``pipeline/__main__.py``): design §4 puts them on top, and ``python -m pipeline`` needs ``__main__`` there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.code_version import PROJECT_PACKAGES, import_closure, project_imports, project_modules

TOP_LAYER = {"pipeline.runner", "pipeline.cli", "pipeline.__main__"}
STAGE_SUPPORT = {"stages", "stages.base"}  # the stage contract and discovery; not stages themselves
MODULES = project_modules()
LIBRARY = [m for m in MODULES if m.split(".")[0] == "pipeline" and m not in TOP_LAYER]
STAGES = [m for m in MODULES if m.split(".")[0] == "stages" and m not in STAGE_SUPPORT]
EXPORTS = [m for m in MODULES if m.split(".")[0] == "exports"]


def _is_leaf(module: str) -> bool:
    """A library leaf: a top-level ``pipeline`` module whose whole import closure is top-level library modules."""
    return module.count(".") == 1 and all(m == "pipeline" or m.count(".") == 1 for m in import_closure(module))


@pytest.mark.parametrize("module", LIBRARY)
def test_library_never_imports_stages_or_the_top_layer(module):
    bad = {m for m in project_imports(module) if m.split(".")[0] == "stages" or m in TOP_LAYER}
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", STAGES)
def test_no_stage_imports_another_stage_or_the_top_layer(module):
    bad = {
        m
        for m in project_imports(module)
        if (m.split(".")[0] == "stages" and m not in STAGE_SUPPORT) or m in TOP_LAYER
    }
    assert not bad, f"{module} imports {sorted(bad)}"


def test_stage_support_imports_no_stage():
    for module in STAGE_SUPPORT:
        assert not {m for m in project_imports(module) if m.startswith("stages.") and m not in STAGE_SUPPORT}


@pytest.mark.parametrize("module", EXPORTS)
def test_exports_depend_only_on_library_leaves(module):
    imported = project_imports(module)
    assert not {m for m in imported if m.split(".")[0] == "stages" or m in TOP_LAYER}, module
    library = {m for m in imported if m.split(".")[0] == "pipeline" and m != "pipeline"}
    heavy = sorted(m for m in library if not _is_leaf(m))
    assert not heavy, f"{module} imports the non-leaf library modules {heavy}"


def test_the_rules_see_a_violation(tmp_path):
    # The checks above read sources; make sure they would notice a stage importing a stage.
    for name, text in {
        "pipeline/__init__.py": "",
        "pipeline/errors.py": "",
        "pipeline/config.py": "from pipeline.distill import x\n",
        "pipeline/distill/__init__.py": "",
        "stages/__init__.py": "",
        "stages/a.py": "def f():\n    from stages.b import THING\n",
        "stages/b.py": "",
        "exports/__init__.py": "",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert "stages.b" in project_imports("stages.a", tmp_path)
    assert set(import_closure("pipeline.config", tmp_path)) == {"pipeline", "pipeline.config", "pipeline.distill"}


def test_stage_order_comes_from_requires_and_cli_choices_from_the_registry():
    from pipeline.config import Config
    from stages import STAGES, get_stage, load_stages, stage_order

    order = stage_order()
    assert set(order) == set(load_stages()) == set(STAGES.names())
    cfg = Config()
    for position, name in enumerate(order):
        assert set(get_stage(name).requires(cfg)) <= set(order[:position]), name
    assert order[0] == "teacher" and order[-1] == "engine"


def test_every_stage_declares_its_outputs_and_consumers_use_library_names():
    from pipeline import stage_files
    from stages import get_stage, stage_order

    outputs = {name: get_stage(name).outputs for name in stage_order()}
    assert all(outputs.values()), outputs
    assert stage_files.TEACHER_CHECKPOINT in outputs["teacher"]
    assert stage_files.STUDENT_CHECKPOINT in outputs["train"]
    assert stage_files.FUSED_CHECKPOINT in outputs["fuse"]
    assert stage_files.HISTORY in outputs["train"]
    assert all(stage_files.REPORT in outputs[name] for name in ("verify", "export", "engine"))


def test_a_stage_that_misses_a_declared_output_commits_nothing(tmp_path, monkeypatch, tiny_cfg):
    from pipeline import runner
    from pipeline.store import RunStore
    from stages.base import Stage, StageResult

    class Forgetful(Stage):
        name = "forgetful"
        outputs = ("promised.json",)

        def params(self, cfg):
            return {}

        def run(self, ctx):
            (ctx.out / "other.json").write_text("{}")
            return StageResult()

    monkeypatch.setattr(runner, "get_stage", lambda name: Forgetful())
    monkeypatch.setattr(runner, "stage_code", lambda stage: ("v1-test", {}))
    store = RunStore(tmp_path / "run")
    store.ensure_writable()
    with pytest.raises(RuntimeError, match=r"did not write its declared outputs \['promised.json'\]"):
        runner.run_stage(store, tiny_cfg, "forgetful", False, print)
    assert store.manifest("forgetful") is None and not store.folder("forgetful").exists()


def _file_name_literals(source: Path, names: set[str]) -> list[str]:
    """String constants (f-string parts too) that are one of ``names`` or a path ending in one."""
    return [
        f"{node.lineno}: {node.value}"
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source)))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and not any(c.isspace() for c in node.value)  # prose (docstrings) may name the files
        and (node.value in names or any(node.value.endswith("/" + name) for name in names))
    ]


def test_the_files_stages_hand_on_are_named_only_in_stage_files():
    from pipeline import stage_files

    names = {value for key, value in vars(stage_files).items() if key.isupper()}
    root = Path(__file__).resolve().parents[1]
    literals = {
        path.relative_to(root).as_posix(): found
        for package in PROJECT_PACKAGES
        for path in sorted((root / package).rglob("*.py"))
        if path.name != "stage_files.py" and (found := _file_name_literals(path, names))
    }
    assert not literals, f"name these through pipeline.stage_files: {literals}"
    assert _file_name_literals(Path(stage_files.__file__), names)  # the rule sees the definitions
