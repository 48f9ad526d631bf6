"""The one atomic file write (pipeline.artifacts.atomic): readers see the old file or the new one, never a part."""

import ast
import os
import stat
from pathlib import Path

import pytest

from pipeline.artifacts import atomic
from pipeline.artifacts.atomic import atomic_write, atomic_write_bytes, atomic_write_text
from pipeline.artifacts.code_version import PROJECT_PACKAGES


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "file.json"
    atomic_write_text(path, "one")
    assert path.read_text() == "one"
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["file.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    atomic_write_bytes(path, b"old")

    def half_then_crash(f):
        f.write(b"ne")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["022", "027"])
def test_a_written_file_has_the_mode_a_plain_open_gives(tmp_path, monkeypatch, umask, mode):
    """Not tempfile's 0600: a report or resume state replaced in place stays readable by whom the umask allows."""
    monkeypatch.setattr(atomic, "_UMASK", umask)
    path = atomic_write_text(tmp_path / "report.html", "<html>")
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_file_system_that_refuses_chmod_still_gets_the_file(tmp_path, monkeypatch):
    """vfat and some network mounts answer chmod with EPERM: the mode is best effort, the write is not."""

    def refuse(*_):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", refuse)
    assert atomic_write_text(tmp_path / "model.json", "{}").read_text() == "{}"


# --- the one way: no other module moves a file into place -------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
FOLDER_SWAP = "pipeline/artifacts/store.py"  # renames whole stage folders into place (staging -> committed), not files


def _moves(source: Path) -> list[int]:
    """Lines that move a file into place: ``os.replace``/``os.rename``, or ``x.replace(target)``/``x.rename(target)``
    with one argument (``str.replace`` takes two, ``dataclasses.replace`` keywords)."""
    lines = []
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in ("replace", "rename"):
            continue
        on_os = isinstance(node.func.value, ast.Name) and node.func.value.id == "os"
        if on_os or (len(node.args) == 1 and not node.keywords):
            lines.append(node.lineno)
    return lines


def test_a_pipe_in_place_of_the_file_is_written_into_not_replaced(tmp_path):
    """``--output /dev/stdout`` or a FIFO: renaming over it would put a regular file where the node was."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so that opening for writing does not block
    try:
        atomic_write_text(fifo, "hello")
        assert os.read(reader, 100) == b"hello"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and [p.name for p in tmp_path.iterdir()] == ["pipe"]


def test_only_pipeline_atomic_moves_a_file_into_place():
    moves = {
        path.relative_to(ROOT).as_posix(): lines
        for package in PROJECT_PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if (lines := _moves(path))
    }
    assert moves.pop("pipeline/artifacts/atomic.py") and moves.pop(FOLDER_SWAP)  # the rule sees both
    assert not moves, f"write these through pipeline.artifacts.atomic: {moves}"
