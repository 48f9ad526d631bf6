"""Per-stage code fingerprints: a stage goes stale only when code it imports changes
(pipeline.artifacts.code_version)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.artifacts.code_version import (
    changed_files,
    code_digest,
    import_closure,
    source_hashes,
    stage_code_version,
)
from stages import get_stage, stage_order

PROJECT = Path(__file__).resolve().parent.parent


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_closure_follows_lazy_relative_and_package_imports(tmp_path):
    _write(
        tmp_path,
        {
            "pipeline/__init__.py": "",
            "pipeline/leaf.py": "X = 1\n",
            "pipeline/sub/__init__.py": "from . import helper\n",
            "pipeline/sub/helper.py": "from ..leaf import X\n",
            "pipeline/lazy.py": "def f():\n    import pipeline.unused_elsewhere\n",
            "pipeline/unused_elsewhere.py": "",
            "pipeline/island.py": "import os\n",
            "stages/__init__.py": "",
            "stages/one.py": "from pipeline.sub import helper\nfrom pipeline import lazy\n",
            "stages/two.py": "import pipeline.island\n",
            "exports/__init__.py": "",
        },
    )
    closure = import_closure("stages.one", tmp_path)
    assert set(closure) == {
        "stages",
        "stages.one",
        "pipeline",
        "pipeline.sub",
        "pipeline.sub.helper",
        "pipeline.leaf",  # through a relative import of a package's module
        "pipeline.lazy",  # `from package import module`
        "pipeline.unused_elsewhere",  # imported inside a function: it runs when the stage does
    }
    hashes = source_hashes("stages.one", tmp_path)
    assert set(hashes) >= {"stages/one.py", "pipeline/sub/__init__.py", "pipeline/leaf.py"}
    before = stage_code_version(hashes, 1)
    assert stage_code_version(hashes, 2) != before  # the explicit per-stage version counts
    (tmp_path / "pipeline/island.py").write_text("import sys\n")  # not imported by stages.one
    assert stage_code_version(source_hashes("stages.one", tmp_path), 1) == before
    (tmp_path / "pipeline/leaf.py").write_text("X = 2\n")
    after = source_hashes("stages.one", tmp_path)
    assert stage_code_version(after, 1) != before
    assert changed_files(hashes, after) == ["pipeline/leaf.py"]
    with pytest.raises(ValueError, match="not a module"):
        import_closure("stages.three", tmp_path)


def test_changed_files_names_edits_additions_and_removals():
    assert changed_files({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}) == ["b", "c (added)"]
    assert changed_files({"a": "1"}, {}) == ["a (removed)"]


def test_code_digest_ignores_comments_docstrings_and_layout(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        '"""Doc."""\n\nX = 1\n\n\nclass A:\n    """Doc."""\n\n    y = 2\n    """Of y."""\n\n'
        "    def f(self):\n        return 3\n"
    )
    before = code_digest(path)
    path.write_text(
        '"""Other doc."""\n# a comment\nX = 1  # one\n\nclass A:\n    y = 2\n\n    def f(self):\n'
        '        """Said."""\n        # why\n        return 3\n'
    )
    assert code_digest(path) == before
    path.write_text(path.read_text().replace("return 3", "return 4"))
    assert code_digest(path) != before


def _copy_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    for package in ("pipeline", "stages", "exports"):
        shutil.copytree(PROJECT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    return project


def _edit_comments_and_docstrings(path: Path) -> None:
    """Edit the module docstring, a function's docstring and add comments; the code stays the same."""
    _edit_docstring(path)
    text = path.read_text().replace('    """', '    """Edited. ', 1)
    path.write_text(text.replace("\nimport ", "\n# A comment.\nimport ", 1) + "# The end.\n")


def _edit_code(path: Path) -> None:
    path.write_text(path.read_text() + "\nEDITED = True\n")


def test_a_method_edit_reaches_train_and_its_consumers_never_teacher(tmp_path, monkeypatch):
    from pipeline.artifacts.manifest import Manifest
    from pipeline.cli import runner

    project = _copy_project(tmp_path)
    modules = {name: type(get_stage(name)).__module__ for name in stage_order()}
    assert "pipeline/distill/crd.py" not in source_hashes(modules["teacher"], project)

    def stage_code(stage):
        files = source_hashes(type(stage).__module__, project)
        return stage_code_version(files, stage.version), files

    built = {name: stage_code(get_stage(name)) for name in modules}
    crd = project / "pipeline" / "distill" / "crd.py"
    _edit_comments_and_docstrings(crd)
    assert crd.read_text() != (PROJECT / "pipeline" / "distill" / "crd.py").read_text()
    assert {name: stage_code(get_stage(name)) for name in modules} == built

    _edit_code(crd)
    now = {name: stage_code(get_stage(name))[0] for name in modules}
    assert now["train"] != built["train"][0]
    assert now["teacher"] == built["teacher"][0]
    # inspect: the stale stage names the file that changed, the teacher is unchanged.
    monkeypatch.setattr(runner, "stage_code", stage_code)
    for name in ("teacher", "train"):
        code, files = built[name]
        status = runner.code_status(Manifest(name, "ok", {}, {}, [], [], code, code_files=files))
        expected = "unchanged since built" if name == "teacher" else "changed since built: pipeline/distill/crd.py"
        assert status == expected, (name, status)


def test_stages_reach_the_methods_only_through_the_catalog():
    """``pipeline.distill`` hands out the by-name API lazily, out of the import graph's sight (see its docstring).

    A module a stage runs that took it from there would leave the methods out of the stage's fingerprint; only
    ``pipeline.config`` does, and it only drops a preset's method options, which the stage's params record.
    """
    import ast

    from pipeline.distill import CATALOG

    for stage in stage_order():
        for name, path in import_closure(type(get_stage(stage)).__module__).items():
            hidden = {
                alias.name
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and node.module == "pipeline.distill"
                for alias in node.names
                if alias.name in CATALOG
            }
            assert not hidden or name == "pipeline.config", (stage, name, hidden)


def _closure_files(stage: str) -> set[str]:
    return set(source_hashes(type(get_stage(stage)).__module__))


def test_each_stage_covers_only_the_code_it_imports():
    closures = {name: _closure_files(name) for name in stage_order()}
    for name in ("teacher", "train", "fuse", "verify"):
        assert not any(f.startswith("exports/") for f in closures[name]), name
    for name in ("export", "engine"):
        assert "exports/onnx_export.py" in closures[name] or "exports/trt_engine.py" in closures[name]
    assert "exports/onnx_export.py" in closures["export"]
    assert "pipeline/training/loop.py" in closures["train"] and "pipeline/training/loop.py" in closures["teacher"]
    assert "pipeline/distill/kdiffusion/chain.py" in closures["train"]
    modules = {name: f"stages/{name}.py" for name in closures}
    for name, files in closures.items():
        assert modules[name] in files
        assert not files & (set(modules.values()) - {modules[name]}), f"{name} imports another stage"
        assert not files & {"pipeline/cli/runner.py", "pipeline/cli/__init__.py", "pipeline/__main__.py"}, name


def _run(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(project), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )


def _code_lines(inspect_output: str) -> dict[str, str]:
    """Stage -> its ``code:`` line in ``inspect``'s text output."""
    code, stage = {}, ""
    for line in inspect_output.splitlines():
        if line and not line.startswith(" "):
            stage = line.split(":", 1)[0]
        elif line.strip().startswith("code:"):
            code[stage] = line.strip()
    return code


def _edit_docstring(path: Path) -> None:
    text = path.read_text()
    assert text.startswith('"""')
    path.write_text('"""Edited. ' + text[3:])


@pytest.mark.slow
def test_run_all_reruns_what_a_code_edit_reaches_and_keep_holds_a_stage(tmp_path):
    from tests.conftest import TINY

    project = _copy_project(tmp_path)
    args = ["--out", "run", *(a for item in (*TINY, "export.precisions=[fp32]") for a in ("--set", item))]
    first = _run(project, "run", "all", *args)
    assert first.returncode == 0, first.stderr

    # Comments and docstrings are not code: editing them reruns nothing.
    crd = project / "pipeline" / "distill" / "crd.py"
    _edit_comments_and_docstrings(crd)
    _edit_comments_and_docstrings(project / "exports" / "onnx_export.py")
    docs = _run(project, "run", "all", *args)
    assert docs.returncode == 0, docs.stderr
    for name in ("teacher", "train", "fuse", "verify", "export"):
        assert f"[{name}] up to date" in docs.stderr, docs.stderr

    # A method's code is train's, never the teacher's.
    _edit_code(crd)
    code = _code_lines(_run(project, "inspect", "run").stdout)
    assert code["teacher"] == "code: unchanged since built"
    assert code["train"] == "code: changed since built: pipeline/distill/crd.py"
    method = _run(project, "run", "all", *args)
    assert method.returncode == 0, method.stderr
    assert "[teacher] up to date" in method.stderr
    assert "[train] running (code_changed: pipeline/distill/crd.py)" in method.stderr

    _edit_code(project / "exports" / "onnx_export.py")
    inspect = _run(project, "inspect", "run")
    assert inspect.returncode == 0, inspect.stderr
    code = _code_lines(inspect.stdout)
    for name in ("teacher", "train", "fuse", "verify"):
        assert "unchanged since built" in code[name], (name, code[name])
    assert "changed since built: exports/onnx_export.py" in code["export"]

    second = _run(project, "run", "all", *args)
    assert second.returncode == 0, second.stderr
    for name in ("teacher", "train", "fuse", "verify"):
        assert f"[{name}] up to date" in second.stderr, second.stderr
    assert "[export] running (code_changed: exports/onnx_export.py)" in second.stderr
    engine = json.loads((project / "run" / "engine" / "manifest.json").read_text())
    # A skipped engine (no TensorRT or GPU here) is retried on every run; a built one reruns for the code.
    why = "previous run skipped" if engine["status"] == "skipped" else "code_changed: exports/onnx_export.py"
    assert f"[engine] running ({why})" in second.stderr

    # The training loop is the teacher's code too; --keep holds the teacher across the change on purpose.
    _edit_code(project / "pipeline" / "training" / "loop.py")
    third = _run(project, "run", "teacher", "train", "--keep", "teacher", *args)
    assert third.returncode == 0, third.stderr
    assert "teacher  ok (kept)" in third.stdout
    assert "[teacher] kept on request although its code changed (pipeline/training/loop.py)" in third.stderr
    assert "[train] running (code_changed: pipeline/training/loop.py)" in third.stderr
    manifest = json.loads((project / "run" / "teacher" / "manifest.json").read_text())
    assert manifest["kept"][0]["changed"] == ["pipeline/training/loop.py"]
    assert manifest["kept"][0]["built_with"] != manifest["code_version"] == manifest["kept"][0]["kept_for"]
    again = _run(project, "run", "teacher", *args)
    assert "[teacher] up to date" in again.stderr, again.stderr
    code = _code_lines(_run(project, "inspect", "run").stdout)
    assert code["teacher"] == "code: unchanged since built; kept across 1 code change(s) with --keep"
