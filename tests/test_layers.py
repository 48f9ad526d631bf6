"""The import rules of the layers (design §4, §7), read from the sources with ast (artifacts.code_version).

A module's layer is its folder; dependencies point one way, foundation <- library <- stages <- top:

- foundation: the modules at the root of ``pipeline/`` (errors, config, registry, ...) and ``pipeline/artifacts/``;
- library: the rest of ``pipeline/`` (models, data, distill, reparam, training, experiments, report);
- stages: ``stages/`` (the contract in ``stages/base.py``, helpers shared by stages in ``stages/support/``);
- exports: ``exports/``, which the stages use and which itself needs only foundation leaves;
- top: ``pipeline/cli/`` (the command line and the runner that orders stages) and ``pipeline/__main__.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.artifacts.code_version import PROJECT_PACKAGES, import_closure, project_imports, project_modules

MODULES = project_modules()
PACKAGES = {m.rpartition(".")[0] for m in MODULES}


def layer(module: str) -> str:
    """The layer of ``module``, read from its folder alone."""
    parts = module.split(".")
    if parts[0] in ("stages", "exports"):
        if parts[0] == "stages" and (len(parts) == 1 or parts[1] in ("base", "support")):
            return "stage support"
        return parts[0]
    if len(parts) > 1 and parts[1] in ("cli", "__main__"):
        return "top"
    if len(parts) == 1 or parts[1] == "artifacts" or (len(parts) == 2 and module not in PACKAGES):
        return "foundation"
    return "library"


TOP_LAYER = {m for m in MODULES if layer(m) == "top"}
STAGE_SUPPORT = {m for m in MODULES if layer(m) == "stage support"}
LIBRARY = [m for m in MODULES if layer(m) in ("foundation", "library")]
STAGES = [m for m in MODULES if layer(m) == "stages"]
EXPORTS = [m for m in MODULES if layer(m) == "exports"]


def _is_leaf(module: str) -> bool:
    """A foundation leaf: a foundation module whose whole import closure is foundation modules."""
    return all(layer(m) == "foundation" for m in import_closure(module))


def test_layers_are_folders():
    assert layer("pipeline.errors") == layer("pipeline.artifacts.store") == "foundation"
    assert layer("pipeline.models.loading") == layer("pipeline.distill.catalog") == "library"
    assert layer("pipeline.cli") == layer("pipeline.cli.runner") == layer("pipeline.__main__") == "top"
    assert layer("stages.support.kit") == layer("stages.base") == "stage support"
    assert layer("stages.train") == "stages" and layer("exports.int8") == "exports"


@pytest.mark.parametrize("module", MODULES)
def test_every_command_line_module_is_in_the_top_layer(module):
    import pipeline.artifacts.code_version as cv

    path = cv._module_files(None)[module]
    tree = ast.parse(path.read_text())
    uses_click = any(
        (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "click" for a in n.names))
        or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "click")
        for n in ast.walk(tree)
    )
    assert not uses_click or layer(module) == "top", f"{module} parses a command line outside pipeline/cli/"


@pytest.mark.parametrize("module", LIBRARY)
def test_library_never_imports_exports(module):
    bad = {m for m in project_imports(module) if m.split(".")[0] == "exports"}
    assert not bad, f"{module} imports {sorted(bad)}: the library must not depend on the exporters"


@pytest.mark.parametrize("module", LIBRARY)
def test_library_never_imports_stages_or_the_top_layer(module):
    bad = {m for m in project_imports(module) if m.split(".")[0] == "stages" or m in TOP_LAYER}
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", STAGES)
def test_no_stage_imports_another_stage_or_the_top_layer(module):
    bad = {
        m for m in project_imports(module) if (m.split(".")[0] == "stages" and m not in STAGE_SUPPORT) or m in TOP_LAYER
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
    from pipeline.artifacts.store import RunStore
    from pipeline.cli import runner
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
