"""The run folder is the pipeline's own (issue 13): files outside it are never written, deleted or followed,
manifests are chained so later edits are named, and a full disk or a killed run leaves nothing that looks done.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.artifacts.hashing import sha256_file, sha256_json
from pipeline.artifacts.store import MARKER, RunStore
from pipeline.cli import run_cli

pytestmark = pytest.mark.xdist_group("ownership")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny run with a trained teacher and a distilled student, copied by each test that changes it."""
    from tests.conftest import TINY

    out = tmp_path_factory.mktemp("made") / "run"
    args = [a for item in TINY for a in ("--set", item)]
    assert run_cli(["run", "teacher", "train", "--out", str(out), *args]) == 0
    return out, args


@pytest.fixture
def run(made, tmp_path) -> tuple[Path, list[str]]:
    out, args = made
    copy = tmp_path / "run"
    shutil.copytree(out, copy, symlinks=True)
    return copy, args


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def _rewrite(path: Path, edit, redigest: bool) -> None:
    """Edit a manifest as a tamperer would; ``redigest`` also recomputes its digest (the scheme is public)."""
    data = json.loads(path.read_text())
    edit(data)
    if redigest:
        signature = data.pop("signature", None)
        data.pop("digest", None)
        data["digest"] = sha256_json(data)
        if signature:
            data["signature"] = signature  # kept: without the key it cannot be recomputed
    path.write_text(json.dumps(data, indent=2))


# --- ownership ------------------------------------------------------------------------------------------


def test_a_non_empty_folder_that_is_not_a_run_is_refused(tmp_path, tiny_overrides, capsys):
    thesis = tmp_path / "mine" / "teacher" / "thesis.txt"
    thesis.parent.mkdir(parents=True)
    thesis.write_text("four years of work")
    args = [a for item in tiny_overrides for a in ("--set", item)]
    assert run_cli(["run", "teacher", "--out", str(tmp_path / "mine"), *args]) == 2
    assert "is not empty and is not a run folder" in _error(capsys)
    assert thesis.read_text() == "four years of work"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["teacher"]


def test_a_lock_symlink_is_never_followed(run, tmp_path, capsys):
    out, args = run
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / ".lock").unlink(missing_ok=True)
    (out / ".lock").symlink_to(victim)
    assert run_cli(["run", "teacher", "--out", str(out), *args]) == 2
    assert ".lock is a symbolic link" in _error(capsys)
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("name", [".staging", ".scratch", "tensorboard"])
def test_links_in_place_of_the_store_s_folders_are_refused(run, tmp_path, name, capsys):
    out, args = run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("x")
    shutil.rmtree(out / name, ignore_errors=True)
    (out / name).symlink_to(elsewhere, target_is_directory=True)
    assert run_cli(["run", "teacher", "train", "--force", "--out", str(out), *args]) == 2
    assert f"{name} is a symbolic link" in _error(capsys)
    assert [p.name for p in elsewhere.iterdir()] == ["precious"]


def test_force_through_a_stage_folder_symlink_deletes_nothing_outside(run, tmp_path, capsys):
    out, args = run
    outside = tmp_path / "outside"
    shutil.move(out / "teacher", outside)
    (out / "teacher").symlink_to(outside, target_is_directory=True)
    before = {p.name: sha256_file(p) for p in outside.iterdir()}
    assert run_cli(["run", "teacher", "--force", "--out", str(out), *args]) == 2
    assert "teacher is a symbolic link" in _error(capsys)
    assert {p.name: sha256_file(p) for p in outside.iterdir()} == before


def test_a_stage_folder_that_is_a_file_is_one_line(run, capsys):
    out, args = run
    shutil.rmtree(out / "teacher")
    (out / "teacher").write_text("not a folder")
    assert run_cli(["run", "teacher", "--out", str(out), *args]) == 2
    assert "is not a stage folder (a file is in its place)" in _error(capsys)
    assert (out / "teacher").read_text() == "not a folder"


def test_a_symlinked_artifact_is_refused(run, tmp_path, capsys):
    out, _ = run
    artifact = out / "teacher" / "teacher.safetensors"
    outside = tmp_path / "teacher.safetensors"
    shutil.move(artifact, outside)
    artifact.symlink_to(outside)
    assert run_cli(["inspect", str(out)]) == 2
    assert "teacher.safetensors is outside its stage folder" in _error(capsys)


# --- manifests that are not what they claim ---------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: [1, 2, 3], "is not a manifest (a JSON list"),
        (lambda d: {**d, "outputs": [{**d["outputs"][0], "path": "/etc/passwd"}]}, "points outside its stage folder"),
        (
            lambda d: {**d, "outputs": [{**d["outputs"][0], "path": "../../../../etc/passwd"}]},
            "points outside its stage folder",
        ),
        (lambda d: {**d, "outputs": [{**d["outputs"][0], "sha256": 5}]}, "malformed field"),
        (lambda d: {**d, "checks": "none"}, "malformed field"),
    ],
    ids=["list", "absolute-output", "dotdot-output", "sha-type", "checks-type"],
)
def test_malformed_manifests_are_one_line_for_stages_and_inspect(run, edit, message, capsys):
    out, args = run
    path = out / "teacher" / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    assert run_cli(["inspect", str(out)]) == 2
    assert message in _error(capsys)
    assert run_cli(["run", "train", "--out", str(out), *args]) == 2
    assert message in _error(capsys)


def test_a_replaced_artifact_with_its_sha_updated_is_refused(run, capsys):
    out, args = run
    artifact = out / "teacher" / "teacher.safetensors"
    artifact.write_bytes(artifact.read_bytes()[:-1] + b" ")
    sha = sha256_file(artifact)
    _rewrite(out / "teacher" / "manifest.json", lambda d: d["outputs"][-1].update(sha256=sha), redigest=False)
    assert run_cli(["run", "train", "--out", str(out), *args]) == 2
    assert "teacher/manifest.json was edited after the stage wrote it" in _error(capsys)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(status="failed"),
        lambda d: d["metrics"].update(test_top1=99.9),
        lambda d: d.update(
            checks=[{"name": "x", "metric": "m", "value": 1, "threshold": 0, "op": "<=", "passed": False, "detail": ""}]
        ),
    ],
    ids=["status", "metrics", "checks"],
)
def test_edited_status_checks_or_metrics_are_refused(run, edit, capsys):
    out, _ = run
    _rewrite(out / "teacher" / "manifest.json", edit, redigest=False)
    assert run_cli(["inspect", str(out)]) == 2
    assert "teacher/manifest.json was edited after the stage wrote it" in _error(capsys)


def test_a_redigested_upstream_edit_breaks_the_chain_and_is_named(run, capsys):
    """Whoever recomputes the public digest still cannot update what the downstream stage recorded."""
    out, args = run
    _rewrite(out / "teacher" / "manifest.json", lambda d: d["metrics"].update(test_top1=99.9), redigest=True)
    assert run_cli(["inspect", str(out)]) == 2
    assert "teacher/manifest.json changed after stage 'train' consumed it" in _error(capsys)
    assert run_cli(["run", "fuse", "--out", str(out), *args]) == 2
    assert "changed after stage 'train' consumed it" in _error(capsys)
    assert not (out / "fuse").exists()


def test_a_signing_key_refuses_a_redigested_manifest(made, tmp_path, monkeypatch, capsys):
    out, args = made
    monkeypatch.setenv("KDPIPE_MANIFEST_KEY", "s3cret")
    signed = tmp_path / "signed"
    assert run_cli(["run", "teacher", "--out", str(signed), *args]) == 0
    assert "signature" in json.loads((signed / "teacher" / "manifest.json").read_text())
    assert run_cli(["inspect", str(signed)]) == 0
    capsys.readouterr()
    _rewrite(signed / "teacher" / "manifest.json", lambda d: d["metrics"].update(test_top1=99.9), redigest=True)
    assert run_cli(["inspect", str(signed)]) == 2
    assert "has a signature that does not match" in _error(capsys)
    monkeypatch.setenv("KDPIPE_MANIFEST_KEY", "another")
    assert run_cli(["inspect", str(out)]) == 2
    assert "is not signed with the key in KDPIPE_MANIFEST_KEY" in _error(capsys)


def test_changed_data_settings_make_the_upstream_stage_stale(run, capsys):
    out, args = run
    before = (out / "train" / "manifest.json").read_text()
    assert run_cli(["run", "train", "--out", str(out), *args, "--set", "data.synthetic.seed=7"]) == 2
    message = _error(capsys)
    assert "stage 'teacher'" in message and "was made from other data" in message
    assert "data.synthetic.seed: 0 -> 7" in message
    assert (out / "train" / "manifest.json").read_text() == before


def test_a_pinned_split_seed_lets_another_seed_reuse_the_teacher(run, capsys):
    """The run's seed draws the val split unless data.split_seed pins it; only the split decides the data."""
    out, args = run
    assert run_cli(["run", "train", "--out", str(out), *args, "--set", "seed=1"]) == 2
    assert "split seed: 0 -> 1" in _error(capsys)
    pinned = ["--set", "seed=1", "--set", "data.split_seed=0"]
    assert run_cli(["run", "train", "--out", str(out), *args, *pinned]) == 0
    assert run_cli(["run", "train", "--out", str(out), *args, "--set", "data.split_seed=1"]) == 2
    assert "split seed: 0 -> 1" in _error(capsys)


def test_every_stage_records_the_digest_of_what_it_consumed(made):
    out, _ = made
    store = RunStore(out)
    teacher, train = store.manifest("teacher"), store.manifest("train")
    assert teacher.upstream == {} and train.upstream == {"teacher": teacher.digest}
    assert (out / MARKER).is_file()


# --- full disks and leftovers ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_fails_the_stage_in_one_line_and_leaves_nothing(run, monkeypatch, code, capsys):
    import stages.teacher

    out, args = run
    before = (out / "teacher" / "manifest.json").read_text()

    def full(path, *a, **k):
        Path(path).write_bytes(b"half")
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(stages.teacher, "save_checkpoint", full)
    assert run_cli(["run", "teacher", "--force", "--out", str(out), *args]) == 2
    message = _error(capsys)
    assert "stage 'teacher' failed" in message and os.strerror(code) in message
    assert (out / "teacher" / "manifest.json").read_text() == before
    assert not any((out / ".staging").iterdir())


class _FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes, then refuses every write as a full disk does."""

    def __init__(self, room: int):
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return len(data)


def test_a_write_torch_save_makes_on_a_full_disk_is_one_line(run, monkeypatch, capsys):
    """torch.save swallows the OSError and reports its zip writer's position check instead ("unexpected pos")."""
    import pipeline.training.state

    out, args = run
    before = (out / "teacher" / "manifest.json").read_text()
    monkeypatch.setattr(
        pipeline.training.state, "atomic_write", lambda path, write: write(io.BufferedWriter(_FullDisk(4096)))
    )
    assert run_cli(["run", "teacher", "--force", "--out", str(out), *args]) == 2
    message = _error(capsys)
    assert "stage 'teacher' failed: a file could not be written, the disk is likely full (" in message
    assert "unexpected pos" in message and message.endswith("nothing was committed, free space and rerun")
    assert (out / "teacher" / "manifest.json").read_text() == before
    assert not any((out / ".staging").iterdir())


def test_a_torch_file_that_cannot_be_read_is_not_taken_for_a_full_disk(tmp_path):
    import torch

    from pipeline.errors import no_space

    path = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # half a file: torch's zip reader fails
    with pytest.raises(RuntimeError, match="PytorchStreamReader") as read:
        torch.load(path)
    with pytest.raises(RuntimeError) as written:
        torch.save({"w": torch.zeros(100_000)}, io.BufferedWriter(_FullDisk(4096)))  # more than the buffer
    assert not no_space(read.value) and no_space(written.value)


def test_a_write_safetensors_makes_on_a_full_disk_is_one_line(run, monkeypatch, capsys):
    import pipeline.artifacts.checkpoint as checkpoint

    out, args = run

    def full(*args, **kwargs):  # what safetensors raises on a full tmpfs, its os error in the message
        raise checkpoint.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    assert run_cli(["run", "teacher", "--force", "--out", str(out), *args]) == 2
    assert "the disk is likely full (Error while serializing: I/O error: No space left" in _error(capsys)


def test_a_stage_failing_on_a_nearly_full_disk_says_how_much_was_free(run, monkeypatch, capsys):
    """ONNX's shape inference writes a truncated file on a full disk without an error, and the reader's error
    ("Wire format was corrupt") says nothing of space: the runner adds what was free, once."""
    import pipeline.artifacts.store as store
    import stages.teacher
    from pipeline.errors import UnsupportedModelError

    out, args = run
    monkeypatch.setattr(store.shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(2**30, 2**30, 2**20))

    def truncated(*args, **kwargs):
        raise UnsupportedModelError("export: fp16 conversion of m failed: DecodeError: Wire format was corrupt")

    monkeypatch.setattr(stages.teacher, "save_checkpoint", truncated)
    assert run_cli(["run", "teacher", "--force", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert f"note: only 1.0 MiB free for the run folder {out}; if a disk filled up, free space and rerun" in err
    assert "error: export: fp16 conversion of m failed" in err

    def full(*args, **kwargs):  # a full disk that says so is said once, by the error
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(stages.teacher, "save_checkpoint", full)
    assert run_cli(["run", "teacher", "--force", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert "note: only" not in err and "error: stage 'teacher' failed: No space left on device" in err


def test_a_full_disk_outside_a_stage_is_one_line(run, monkeypatch, capsys):
    import pipeline.report

    out, _ = run

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(pipeline.report, "atomic_write_text", full)
    assert run_cli(["report", str(out)]) == 2
    assert _error(capsys).startswith("error: a file could not be written: [Errno 28] No space left on device: ")


def test_leftovers_of_killed_runs_are_cleaned_by_the_next_run(run, capsys):
    out, args = run
    (out / ".staging" / "train-kill3d").mkdir(parents=True)
    (out / ".staging" / "train-kill3d" / "half.bin").write_bytes(b"x")
    (out / ".scratch" / "train-0123456789abcdef").mkdir(parents=True)
    assert run_cli(["run", "teacher", "train", "--out", str(out), *args]) == 0
    assert "train-kill3d, left by a run that was killed" in capsys.readouterr().err
    assert not any((out / ".staging").iterdir())
    assert not any((out / ".scratch").glob("train-*"))


def test_a_stage_kept_across_a_code_change_does_not_break_the_chain_below_it(run):
    from pipeline.cli.runner import _keep

    out, _ = run
    store = RunStore(out)
    teacher = store.manifest("teacher")
    kept = _keep(store, teacher, "v1-other", {}, ["pipeline/training/loop.py"])
    assert kept.digest != teacher.digest and teacher.digest in store.manifest("teacher").accepted_digests
    assert store.audit("train")[1] == []
    # A rewrite that does not say it was kept is still a broken link.
    store.amend(dataclasses.replace(store.manifest("teacher"), kept=[]))
    assert "changed after stage 'train' consumed it" in " ".join(store.audit("train")[1])
