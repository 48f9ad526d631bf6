"""The whole pipeline on a reduced default: every stage ok, reruns skip, tampering is refused."""

import json

import pytest

from pipeline.artifacts.store import RunStore
from pipeline.cli import run_cli
from stages import stage_order

pytestmark = [pytest.mark.xdist_group("e2e"), pytest.mark.slow, pytest.mark.accuracy]  # one shared run of every stage
ORDER = stage_order()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tests.conftest import TINY

    out = tmp_path_factory.mktemp("e2e") / "run"
    # INT8's accuracy gate on 64 test images of a one-epoch model is a coin toss: it is tested elsewhere.
    args = [a for item in (*TINY, "export.precisions=[fp32,fp16]") for a in ("--set", item)]
    assert run_cli(["run", "all", "--out", str(out), *args]) == 0
    return out, args


def _completed(out) -> list[str]:
    """Every stage but an engine stage skipped because TensorRT or a GPU is missing here."""
    return [s for s in ORDER if not (s == "engine" and RunStore(out).manifest(s).status == "skipped")]


def test_every_stage_ok_with_passing_checks(run_dir):
    out, _ = run_dir
    store = RunStore(out)
    engine = store.manifest("engine")
    if engine.status == "skipped":
        from exports.trt_engine import unavailable_reason

        assert engine.reason and engine.reason == unavailable_reason()
    for stage in _completed(out):
        manifest = store.manifest(stage)
        assert manifest is not None, stage
        assert manifest.status == "ok", (stage, manifest.reason)
        assert all(manifest.checks), [c.describe() for c in manifest.checks if not c]
        assert manifest.outputs and all(len(a.sha256) == 64 for a in manifest.outputs)
        assert manifest.environment["torch"]
    verify = store.manifest("verify")
    assert {c.name for c in verify.checks} >= {"logits_max_abs", "logits_rel_fro", "top1_agreement"}
    train_inputs = {a.source for a in store.manifest("train").inputs}
    assert train_inputs == {"teacher"}
    # a normal run leaves no resume state or staging behind (a skipped engine included; issue 13)
    assert not list(out.glob(".scratch/*")) and not list(out.glob(".staging/*"))


def test_second_run_skips_every_stage(run_dir, capsys):
    out, args = run_dir
    done = _completed(out)
    before = {s: (out / s / "manifest.json").read_text() for s in done}
    assert run_cli(["run", "all", "--out", str(out), *args]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("up to date") == len(done)
    assert {s: (out / s / "manifest.json").read_text() for s in done} == before


def test_inspect_json(run_dir, capsys):
    out, _ = run_dir
    assert run_cli(["inspect", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == set(ORDER)
    assert data["verify"]["status"] == "ok"


def test_inspect_text_shows_status_checks_hashes_and_tampering(run_dir, capsys):
    out, _ = run_dir
    store = RunStore(out)
    assert run_cli(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for stage in _completed(out):
        m = store.manifest(stage)
        line = next(line for line in text.splitlines() if line.startswith(f"{stage}: ok"))  # a reason may follow
        assert line.endswith(f"  fingerprint {m.fingerprint[:12]}  digest {m.digest[:12]}"), line
    assert "PASSED | logits_max_abs" in text and "PROBLEM" not in text
    sha = store.manifest("train").output("student.safetensors").sha256
    assert f"out student.safetensors  sha256 {sha[:16]}" in text

    report = out / "verify" / "report.json"
    original = report.read_bytes()
    try:
        report.write_bytes(original + b" ")
        assert run_cli(["inspect", str(out)]) == 2
        captured = capsys.readouterr()
        assert "PROBLEM: " in captured.out and "report.json is modified since the stage wrote it" in captured.out
        assert captured.err.startswith("error: ") and "report.json is modified" in captured.err
    finally:
        report.write_bytes(original)


def test_tampered_student_checkpoint_is_refused(run_dir, capsys):
    out, args = run_dir
    path = out / "train" / "student.safetensors"
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    fuse_manifest = (out / "fuse" / "manifest.json").read_text()
    try:
        code = run_cli(["run", "fuse", "--out", str(out), *args])
        err = capsys.readouterr().err
        assert code == 2
        assert "student.safetensors is modified since stage 'train' wrote it" in err
        assert "Traceback" not in err
        assert (out / "fuse" / "manifest.json").read_text() == fuse_manifest
    finally:
        path.write_bytes(original)


def test_export_only_path_on_an_outside_checkpoint(run_dir, tmp_path):
    out, args = run_dir
    outside = tmp_path / "mine.safetensors"
    outside.write_bytes((out / "train" / "student.safetensors").read_bytes())
    export_out = tmp_path / "export_only"
    assert run_cli(["run", "export", "--checkpoint", str(outside), "--out", str(export_out), *args]) == 0
    manifest = RunStore(export_out).manifest("export")
    assert manifest.status == "ok" and all(manifest.checks)
    assert [a.source for a in manifest.inputs] == ["external"]
    assert (export_out / "export" / "model.onnx").is_file()


def test_export_only_path_on_weights_from_another_codebase(run_dir, tmp_path, capsys):
    """A plain state dict (no pipeline metadata) is read as the configured student on the configured data."""
    import torch
    from safetensors.torch import load_file

    out, args = run_dir
    foreign = tmp_path / "student.pth"
    torch.save({"model": load_file(str(out / "train" / "student.safetensors")), "epoch": 1}, foreign)
    export_out = tmp_path / "foreign"
    assert run_cli(["run", "export", "--checkpoint", str(foreign), "--out", str(export_out), *args]) == 0
    assert "has no pipeline metadata: loading it as a resnet20 with 4 classes" in capsys.readouterr().err
    manifest = RunStore(export_out).manifest("export")
    assert manifest.status == "ok" and all(manifest.checks)
    assert manifest.params["assumed_arch"] == "resnet20"

    wrong = [*args, "--set", "data.num_classes=5"]
    assert run_cli(["run", "export", "--checkpoint", str(foreign), "--out", str(tmp_path / "wrong"), *wrong]) == 2
    err = capsys.readouterr().err
    assert (
        "has 4 outputs" in err and "but the configured data has 5 classes;" in err and "--set student.arch=NAME" in err
    )


def test_several_stages_run_in_pipeline_order(run_dir, capsys):
    out, args = run_dir
    assert run_cli(["run", "verify", "fuse", "--force", "--out", str(out), *args]) == 0
    err = capsys.readouterr().err
    assert "[teacher]" not in err and "[train]" not in err and "[export]" not in err
    assert -1 < err.index("[fuse] running") < err.index("[verify] running")
    assert RunStore(out).manifest("verify").status == "ok"
