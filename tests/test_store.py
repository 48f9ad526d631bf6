"""Manifests, hashing, atomic commits and the refusal rules of the single artifact loader."""

import json
import os
import stat

import pytest

from pipeline.artifacts import atomic
from pipeline.artifacts.checks import Check
from pipeline.artifacts.manifest import Artifact, Manifest
from pipeline.artifacts.store import RunStore, describe_file, external_input
from pipeline.cli.runner import stale_reason
from pipeline.errors import ArtifactError, ConfigError


def _commit(store: RunStore, stage: str, content: bytes = b"weights", status="ok", checks=()) -> Manifest:
    staged = store.staging(stage)
    (staged / "out.bin").write_bytes(content)
    manifest = Manifest(stage, status, {"p": 1}, [], [describe_file(staged, "out.bin")], list(checks), "v1")
    store.commit(staged, manifest)
    return manifest


def test_manifest_round_trip_is_deterministic(tmp_path):
    store = RunStore(tmp_path)
    written = _commit(store, "a", checks=[Check.of("c", "x", 0.5, 1.0)])
    read = Manifest.read(tmp_path / "a")
    assert read.fingerprint == written.fingerprint
    assert read.checks[0].passed and read.checks[0].threshold == 1.0
    again = tmp_path / "again"
    again.mkdir()
    assert read.write(again).read_text() == (tmp_path / "a" / "manifest.json").read_text()


def test_metrics_keep_the_stage_s_order(tmp_path):
    """The run summary shows a stage's key figures in its own order, fresh or up to date."""
    (tmp_path / "a").mkdir()
    Manifest("a", "ok", {}, [], [], [], "v1", metrics={"test_top1": 1.0, "parameters": 2}).write(tmp_path / "a")
    assert list(Manifest.read(tmp_path / "a").metrics) == ["test_top1", "parameters"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not a readable manifest"),
        ('{"schema": 0}', "has schema 0"),
        (None, "has malformed field"),
    ],
)
def test_unreadable_or_foreign_manifests_are_refused(tmp_path, content, message):
    store = RunStore(tmp_path)
    _commit(store, "a")
    path = tmp_path / "a" / "manifest.json"
    if content is None:  # a current schema with a field missing
        data = json.loads(path.read_text())
        del data["outputs"]
        content = json.dumps(data)
    path.write_text(content)
    with pytest.raises(ArtifactError, match=message):
        Manifest.read(tmp_path / "a")


def test_load_refuses_missing_stage(tmp_path):
    with pytest.raises(ArtifactError, match="stage 'train' has no artifacts.*run train"):
        RunStore(tmp_path).load("train")


def test_load_refuses_modified_output(tmp_path):
    store = RunStore(tmp_path)
    _commit(store, "a")
    assert store.load("a").path("out.bin").read_bytes() == b"weights"
    data = bytearray((tmp_path / "a" / "out.bin").read_bytes())
    data[0] ^= 1
    (tmp_path / "a" / "out.bin").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="modified since stage 'a' wrote it.*--force"):
        store.load("a")


def test_load_refuses_deleted_output(tmp_path):
    store = RunStore(tmp_path)
    _commit(store, "a")
    (tmp_path / "a" / "out.bin").unlink()
    with pytest.raises(ArtifactError, match="missing since"):
        store.load("a")


def test_load_refuses_failed_stage(tmp_path):
    store = RunStore(tmp_path)
    _commit(store, "a", status="failed", checks=[Check.of("gate", "x", 2.0, 1.0)])
    with pytest.raises(ArtifactError, match="stage 'a' .* is failed"):
        store.load("a")


def test_hand_edited_manifest_is_refused(tmp_path):
    store = RunStore(tmp_path)
    _commit(store, "a")
    path = tmp_path / "a" / "manifest.json"
    data = json.loads(path.read_text())
    data["params"]["p"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="was edited after the stage wrote it"):
        store.load("a")


def test_commit_replaces_previous_folder_atomically(tmp_path):
    store = RunStore(tmp_path)
    _commit(store, "a", b"one")
    _commit(store, "a", b"two")
    assert (tmp_path / "a" / "out.bin").read_bytes() == b"two"
    assert not list((tmp_path / ".staging").glob("a-*"))


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_a_committed_stage_folder_has_the_mode_a_plain_mkdir_gives(tmp_path, monkeypatch):
    """Not tempfile's 0700: an exported model's folder is read by the service or container build that deploys it."""
    monkeypatch.setattr(atomic, "_UMASK", 0o022)
    store = RunStore(tmp_path)
    _commit(store, "a")
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755


def test_uncommitted_staging_never_looks_complete(tmp_path):
    store = RunStore(tmp_path)
    staged = store.staging("a")
    (staged / "out.bin").write_bytes(b"half")
    assert store.manifest("a") is None
    assert store.stages() == []


def test_external_input_hashes_the_file(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    art = external_input(path)
    assert art.source == "external" and art.bytes == 3
    assert art.sha256 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    with pytest.raises(ArtifactError, match="does not exist"):
        external_input(tmp_path / "nope.bin")


def test_unwritable_run_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="not writable.*--out"):
        RunStore(blocker / "run").ensure_writable()


def test_a_run_folder_takes_one_run_at_a_time(tmp_path, capsys):
    import os

    from pipeline.cli import run_cli

    store = RunStore(tmp_path / "run")
    store.ensure_writable()
    with store.lock():
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()}\).*--out"), store.lock():
            pass
        assert run_cli(["run", "teacher", "--out", str(store.root)]) == 2
        assert "in use by another run" in capsys.readouterr().err
        assert not store.stages()
    with store.lock():  # released with its holder
        pass


def test_stale_reasons():
    inputs = [Artifact("x", "h")]
    m = Manifest("s", "ok", {"a": 1}, inputs, [], [], "v1")
    fp = m.fingerprint
    assert stale_reason(None, {}, "", "v1", "", fp) == "missing"
    assert stale_reason(m, {"a": 1}, m.inputs_hash, "v1", "", fp) == ""
    assert stale_reason(m, {"a": 2}, m.inputs_hash, "v1", "", "other") == "params_changed"
    assert stale_reason(m, {"a": 1}, m.inputs_hash, "v2", "", "other") == "code_changed"
    assert stale_reason(m, {"a": 1}, "changed", "v1", "", "other") == "inputs_changed"
    assert stale_reason(m, {"a": 1}, m.inputs_hash, "v1", "out.bin modified", fp).startswith("outputs_modified")
    failed = Manifest("s", "failed", {"a": 1}, inputs, [], [], "v1")
    assert stale_reason(failed, {"a": 1}, m.inputs_hash, "v1", "", failed.fingerprint) == "previous run failed"
