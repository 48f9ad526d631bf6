"""Ctrl-C at any moment (issue 13): exit status 130 after cleaning up, never death by the signal, and the
interrupted stage leaves nothing that looks complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import interrupts
from pipeline.artifacts.store import RunStore
from pipeline.cli import main, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _tiny_args(tiny_overrides) -> list[str]:
    return [a for item in tiny_overrides for a in ("--set", item)]


@pytest.mark.slow
def test_sigint_in_a_background_job_stops_the_run_with_130(tmp_path, tiny_overrides):
    """A shell starts background jobs with SIGINT ignored; the run must still stop when it gets one."""
    out = tmp_path / "run"
    args = [*_tiny_args(tiny_overrides), "--set", "student.optim.epochs=50"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "teacher", "train", "--out", str(out), *args],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("student (kd) epoch 1/"):  # well inside train
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    code = proc.wait(timeout=120)
    err = "".join(lines) + rest
    assert code == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert "[train] ok" not in err and "student (kd) epoch 50/50" not in err
    store = RunStore(out)
    assert store.stages() == ["teacher"] and store.manifest("teacher").status == "ok"
    assert not any((out / ".staging").iterdir())


@pytest.mark.parametrize("delay", [0.8, 2.0])
def test_sigint_during_startup_is_130_not_death_by_signal(tmp_path, delay):
    """While the imports and the config load run (a signal before Python runs any of the package is the
    interpreter's own business)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "--out", str(tmp_path / "run")],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err


def test_a_ctrl_c_inside_an_import_is_raised_once_the_import_is_over(tmp_path, monkeypatch):
    """Raised inside ``import torch`` it was lost (torch drops what its numpy import raises) or fatal (pybind11
    aborts): the handler holds it until the import has finished."""
    (tmp_path / "interrupted_module.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(0.3)\nFINISHED = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    interrupts.catch()
    try:
        with pytest.raises(KeyboardInterrupt):
            import interrupted_module  # noqa: F401

            time.sleep(10)
            pytest.fail("the held signal was never raised")
        assert sys.modules["interrupted_module"].FINISHED
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.modules.pop("interrupted_module", None)


def test_a_ctrl_c_a_library_swallowed_stops_the_run_before_its_first_stage(tmp_path, tiny_overrides, monkeypatch):
    import pipeline.config

    load_config = pipeline.config.load_config

    def swallowing(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)
        except KeyboardInterrupt:
            pass  # what a library's ``except BaseException`` does
        return load_config(*args, **kwargs)

    monkeypatch.setattr(pipeline.config, "load_config", swallowing)
    out = tmp_path / "run"
    interrupts.catch()
    try:
        assert run_cli(["run", "teacher", "--out", str(out), *_tiny_args(tiny_overrides)]) == 130
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert not (out / "teacher").exists()


@pytest.mark.slow
def test_sigint_during_verify_exits_130_and_commits_nothing(tmp_path, tiny_overrides, monkeypatch, capsys):
    import stages.verify

    out = tmp_path / "run"
    args = _tiny_args(tiny_overrides)
    assert run_cli(["run", "teacher", "train", "fuse", "--out", str(out), *args]) == 0

    def interrupted(self, ctx):
        (ctx.out / "report.json").write_text("{}")
        os.kill(os.getpid(), signal.SIGINT)  # a real signal, delivered while the stage runs
        time.sleep(5)
        raise AssertionError("the signal did not interrupt the stage")

    monkeypatch.setattr(stages.verify.VerifyStage, "run", interrupted)
    monkeypatch.setattr(sys, "argv", ["pipeline", "run", "verify", "--out", str(out), *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (out / "verify").exists() and not any((out / ".staging").iterdir())
    signal.signal(signal.SIGINT, signal.default_int_handler)  # main() ignores late signals; restore for pytest


def test_an_error_raised_while_ctrl_c_unwinds_is_the_interrupt(tmp_path, tiny_overrides, monkeypatch, capsys):
    """Tensorboard's writer, interrupted inside its flush, raises ``RuntimeError: release unlocked lock`` in place
    of the KeyboardInterrupt: still 130 and the interrupt's message, not exit 1 and a traceback."""
    import threading

    import stages.teacher

    def broken_by_interrupt(self, ctx):
        (ctx.out / "partial.bin").write_bytes(b"0")
        lock = threading.Lock()
        try:
            raise KeyboardInterrupt
        finally:
            lock.release()  # what the interrupted queue.join does: RuntimeError, with the interrupt as context

    monkeypatch.setattr(stages.teacher.TeacherStage, "run", broken_by_interrupt)
    out = tmp_path / "run"
    assert run_cli(["run", "teacher", "--out", str(out), *_tiny_args(tiny_overrides)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert not (out / "teacher").exists()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the handler ignores late signals; restore for pytest


def test_other_errors_are_not_taken_for_an_interrupt(tmp_path, tiny_overrides, monkeypatch):
    import stages.teacher

    def bug(self, ctx):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(stages.teacher.TeacherStage, "run", bug)
    with pytest.raises(RuntimeError, match="a bug of ours"):
        run_cli(["run", "teacher", "--out", str(tmp_path / "run"), *_tiny_args(tiny_overrides)])
