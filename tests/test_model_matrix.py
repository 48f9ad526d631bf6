"""The support matrix (benchmarks/model_matrix.py, issue 25): family derivation, the smallest-variant choice, and a
sample of the matrix run end to end (every model ends with a verdict, none in a traceback)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "model_matrix.py"

# small, fast models of ten families (each a few seconds to export), timm and torchvision
SAMPLE = [
    "timm:resnet10t",  # resnet
    "timm:mobilenetv2_035",  # efficientnet
    "timm:lcnet_035",  # mobilenetv3
    "timm:regnetx_002",  # regnet
    "timm:mobileone_s0",  # byobnet (re-parameterized)
    "timm:repghostnet_050",  # repghost (re-parameterized)
    "timm:starnet_s050",  # starnet
    "timm:dla46_c",  # dla
    "torchvision:squeezenet1_1",
    "torchvision:shufflenet_v2_x0_5",
]


def load_matrix():
    spec = importlib.util.spec_from_file_location("model_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_family_derivation():
    mm = load_matrix()
    assert mm.timm_family("resnet10t") == "resnet"
    assert mm.timm_family("resnet10t.a1_in1k") == "resnet"  # a pretrained tag is not part of the family
    assert mm.timm_family("mobilenetv2_035") == "efficientnet"  # the module it is registered in, not its name
    assert mm.timm_family("lcnet_035") == "mobilenetv3"
    assert mm.timm_family("vit_tiny_patch16_224") == "vision_transformer"
    assert mm.torchvision_family("resnet18") == "torchvision.resnet"
    assert mm.torchvision_family("mobilenet_v3_small") == "torchvision.mobilenetv3"
    families = mm.group_families(["resnet18", "resnet10t", "lcnet_035", "mobilenetv3_small_050"])
    assert families == {"resnet": ["resnet18", "resnet10t"], "mobilenetv3": ["lcnet_035", "mobilenetv3_small_050"]}


def test_smallest_variant_choice():
    mm = load_matrix()
    assert mm.smallest({"big": 50, "small": 3, "mid": 10}) == "small"
    assert mm.smallest({"b": 3, "a": 3}) == "a"  # a tie goes to the name first in order
    assert mm.smallest({"test_tiny": 1, "real": 7}) == "real"  # timm's test_* models only when nothing else counts
    assert mm.smallest({"test_tiny": 1, "broken": None}) == "test_tiny"
    assert mm.smallest({"broken": None}) is None  # nothing the meta device could build
    import timm

    counts = {
        n: mm.count_parameters(lambda n=n: timm.create_model(n, num_classes=20))
        for n in ("resnet50", "resnet18", "resnet10t")
    }
    assert mm.smallest(counts) == "resnet10t"
    real = sum(p.numel() for p in timm.create_model("resnet10t", num_classes=20).parameters())
    assert counts["resnet10t"] == real  # counted on the meta device, the same as built
    assert mm.count_parameters(lambda: (_ for _ in ()).throw(RuntimeError("no meta"))) is None


def test_classify_exit_status():
    mm = load_matrix()
    assert mm.classify(0, "") == "pass"
    assert mm.classify(1, "error: stage 'export' failed its checks") == "gate"
    assert mm.classify(2, "error: export: the fp16 conversion of timm:x failed: ...") == "error"
    assert mm.classify(2, "Traceback (most recent call last):\n  ...\nValueError: x") == "traceback"
    assert mm.classify(-11, "") == "traceback"  # a crash: a bug
    assert mm.classify(-9, "") == "killed"  # the kernel's out-of-memory killer: the machine's limit
    assert mm.classify(None, "") == "timeout"
    assert mm.precision_of("onnx_fp16_min_cosine") == "fp16" and mm.precision_of("int8_qdq_tensorrt") == "int8"
    assert mm.precision_of("batch_consistency") == "fp32"
    stderr = 'Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\nValueError: Too many bins\n'
    assert mm.traceback_line(1, stderr) == "ValueError: Too many bins"
    assert mm.traceback_line(-9, "[export] wrote model.onnx\n").startswith("killed by SIGKILL")
    assert mm.error_line("[export] running\nerror: export: x failed: y\n") == "error: export: x failed: y"


def test_an_int8_drop_not_judged_at_chance_is_shown_as_such(tmp_path):
    """Random weights put fp32 at chance, where the INT8 drop gate is skipped (exports.precisions.int8_gate):
    the matrix cell says so instead of a bare pass."""
    mm = load_matrix()
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    reason = "int8 accuracy gate skipped: fp32 top-1 5.27% is within 5 points of chance (5.00% for 20 classes), ..."
    checks = [{"name": "onnx_int8_top1_agreement", "passed": True}, {"name": "onnx_fp16_min_cosine", "passed": True}]
    manifest = {"status": "ok", "checks": checks, "metrics": {"int8_gate": "skipped"}, "reason": f"{reason}; x"}
    (export / "manifest.json").write_text(json.dumps(manifest))
    found = mm.read_export(tmp_path)
    assert found["int8_not_judged"] == reason
    result = {"status": "pass", "attempts": [found]}
    assert mm.verdict_cell(result, "int8", ["fp32", "fp16", "int8"]) == "pass (accuracy drop not judged)"
    assert mm.verdict_cell(result, "fp16", ["fp32", "fp16", "int8"]) == "pass"


def test_each_child_runs_on_one_cpu_with_one_thread(tmp_path, monkeypatch):
    """``--jobs 2`` on two cores: each export on a CPU of its own, ONNX Runtime's thread pool included."""
    mm = load_matrix()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = sorted(os.sched_getaffinity(0))[-1]
    probe = "import os; print(sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'])"
    with open(tmp_path / "log", "w") as log:
        rc, out, _, _ = mm.run_child([sys.executable, "-c", probe], 60, log, cpu)
    assert rc == 0 and out.split() == [f"[{cpu}]", "1"]
    # the matrix's own settings size the samples and skip a timing the matrix does not show, never a gate
    assert all(
        item.split("=")[0]
        in {
            "data.synthetic.train_size",
            "data.synthetic.test_size",
            "export.eval_samples",
            "export.calibration_samples",
            "export.parity_samples",
            "export.cpu_int8_latency",
            "export.latency_runs",
            "export.latency_warmup",
        }
        for item in mm.MATRIX_SETS
    )


def test_the_checkpoint_worker_serves_models_and_is_replaced_when_it_fails(tmp_path):
    """One process per job writes the checkpoints (torch and timm imported once); an unknown model is its one-line
    refusal, after which the next model gets a fresh worker, and a dead worker is a killed child, not a hang."""
    mm = load_matrix()
    worker = mm.CheckpointWorker()
    with open(tmp_path / "log", "w") as log:
        try:
            rc, out, _, _ = worker.make("torchvision:squeezenet1_1", 32, tmp_path / "a.safetensors", 120, log)
            first = worker.proc.pid
            assert rc == 0 and json.loads(out)["params"] > 0 and (tmp_path / "a.safetensors").is_file()
            rc, _, _, _ = worker.make("timm:resnet10t", 32, tmp_path / "b.safetensors", 120, log)
            assert rc == 0 and worker.proc.pid == first  # the same process, imports paid once
            rc, _, err, _ = worker.make("timm:no_such_model", 32, tmp_path / "c.safetensors", 120, log)
            assert rc == 2 and err.startswith("error:") and mm.classify(rc, err) == "error" and worker.proc is None
            rc, _, _, _ = worker.make("timm:resnet10t", 32, tmp_path / "d.safetensors", 120, log)
            os.kill(worker.proc.pid, 9)
            rc, _, err, _ = worker.make("timm:resnet10t", 32, tmp_path / "e.safetensors", 120, log)
            assert rc == -9 and mm.classify(rc, err) == "killed" and worker.proc is None
        finally:
            worker.close()


def test_the_export_zygote_forks_each_export_as_a_fresh_process_would_run_it(tmp_path):
    """Exports forked from one process with the libraries imported: the output, exit status and one-line errors
    of ``python -m pipeline``, a timeout kills the export (not a hang) and the next export gets a new zygote, and the
    zygote holds one thread when it forks."""
    mm = load_matrix()
    zygote = mm.ExportZygote()
    cli = [sys.executable, "-m", "pipeline"]
    with open(tmp_path / "log", "w") as log:
        try:
            rc, out, err, _ = zygote.run([*cli, "presets"], 120, log)
            assert rc == 0 and "fmnist-teacher-resnet20" in out, err
            first = zygote.proc.pid
            assert len(os.listdir(f"/proc/{first}/task")) == 1  # no thread to lose across a fork
            rc, _, err, _ = zygote.run([*cli, "run", "export", "--checkpoint", str(tmp_path / "none.pt")], 120, log)
            assert rc == 2 and mm.classify(rc, err) == "error" and err.strip().startswith("error:"), err
            assert "\n" not in err.strip() and zygote.proc.pid == first  # the same zygote, imports paid once
            run = [*cli, "run", "all", "--out", str(tmp_path / "run"), "--set", "teacher.optim.epochs=50"]
            tic = time.monotonic()
            rc, _, _, _ = zygote.run(run, 5, log)
            assert rc is None and mm.classify(rc, "") == "timeout" and time.monotonic() - tic < 60
            assert zygote.proc is None  # ended with its export; the next export starts a new one
            rc, out, _, _ = zygote.run([*cli, "presets"], 120, log)
            assert rc == 0 and zygote.proc.pid != first
        finally:
            zygote.close()
    with pytest.raises(ValueError, match="python -m pipeline only"):
        zygote.run([sys.executable, "-c", "pass"], 10, None)


@pytest.mark.slow
def test_matrix_sample_has_verdicts_and_no_traceback(tmp_path):
    """Ten fast families through the script, two at a time, with small sample counts: about 70 s on 2 idle cores."""
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--out",
        str(tmp_path),
        "--models",
        ",".join(SAMPLE),
        "--jobs",
        "2",
        "--size",
        "32",
        "--timeout",
        "240",
        "--set",
        "export.calibration_samples=16",
        "--set",
        "export.parity_samples=8",
        "--set",
        "export.eval_samples=32",
        "--set",
        "export.golden_samples=2",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = json.loads((tmp_path / "results.json").read_text())
    results = state["results"]
    assert sorted(results) == sorted(SAMPLE)
    assert len(state["machines"]) == 1 and "thread" in state["machines"][0]  # the CPU behind every figure
    for key, r in results.items():
        assert r["status"] in ("pass", "gate", "error"), f"{key}: {r['status']}: {r['error']}"
        if r["status"] == "pass":
            verdicts = r["attempts"][-1]["verdicts"]
            assert set(verdicts) == {"fp32", "fp16", "int8"}, key
            assert all(not v["failed"] for v in verdicts.values()), key
            assert set(r["attempts"][-1]["latency_ms"]) == {"fp32", "fp16", "int8"}, key
        else:
            assert r["error"].startswith("error:") and "\n" not in r["error"], f"{key}: {r['error']!r}"
    doc = (tmp_path / "model-matrix.md").read_text()
    assert f"**{len(SAMPLE)} of {len(SAMPLE)} models**" in doc
    assert f"- machine: {state['machines'][0]}" in doc
    # the wall clock beside the subprocess time: what "fits in an hour" is judged by
    assert "min of wall clock (catalogue included)" in doc
    assert state["wall_s"] > max(a["export_s"] for r in results.values() for a in r["attempts"])
    for key in SAMPLE:
        assert f"`{key.split(':', 1)[1]}`" in doc

    wall_s = state["wall_s"]

    # the distillation path of three of them, at the sizes their exports took: a CNN is branched, trained, fused
    # and verified; squeezenet (no BatchNorm) is refused in one line
    distilled = ["timm:resnet10t", "timm:mobileone_s0", "torchvision:squeezenet1_1"]
    cmd = [sys.executable, str(SCRIPT), "--distill", "--out", str(tmp_path), "--models", ",".join(distilled)]
    proc = subprocess.run(
        [*cmd, "--jobs", "2", "--timeout", "240"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = json.loads((tmp_path / "results.json").read_text())
    assert sorted(state["results"]) == sorted(SAMPLE)  # the export results are kept beside
    assert state["distill_wall_s"] > 0 and state["wall_s"] == wall_s  # each path keeps its own clock
    distill = state["distill"]
    assert sorted(distill) == sorted(distilled)
    for key in distilled:
        r = distill[key]
        assert r["size"] == results[key]["size"] and len(r["attempts"]) == 1, key
        if key.startswith("timm:"):
            assert r["status"] == "pass", f"{key}: {r['error']}"
            # verify passed (its gate scales with the logits: random-weight MobileOne's reach 1e12)
            assert r["attempts"][0]["fused_blocks"] >= 1 and r["attempts"][0]["failed"] == [], key
        else:
            assert r["status"] == "error" and "nothing to branch" in r["error"] and "\n" not in r["error"]
    doc = (tmp_path / "model-matrix.md").read_text()
    assert "## Distillation path" in doc and f"**{len(distilled)} of {len(SAMPLE)} models**" in doc
    assert f"**{len(SAMPLE)} of {len(SAMPLE)} models**" in doc  # the export matrix still in the doc


def test_a_student_with_fewer_sites_is_distilled_with_as_many_layers(tmp_path, monkeypatch):
    """The refusal names the sites the model has; the matrix runs it again with that many layers, at the same size,
    and a student with none is not retried at another size (BatchNorm does not come with more pixels)."""
    matrix = load_matrix()
    calls = []

    def fake_child(cmd, timeout, log, cpu):
        calls.append(cmd)
        arch = cmd[cmd.index("--set") + 1]
        if "layers=2" in " ".join(cmd):
            return 0, "", "", 1.0
        sites = 2 if "fastvit" in arch else 0
        return 2, "", f"error: student X declares {sites} re-parameterization sites; KDiffusion with layers=3", 1.0

    monkeypatch.setattr(matrix, "run_child", fake_child)
    row = {"key": "timm:fastvit_t8", "sizes": [64, 256]}
    r = matrix.run_distill(row, tmp_path, 60, [])
    assert r["status"] == "pass" and [a["size"] for a in r["attempts"]] == [64, 64]
    assert r["attempts"][-1]["layers"] == 2 and "student.method_args.layers=2" in calls[-1]
    assert "with 3 layers: error" in matrix.result_cell(r)
    calls.clear()
    r = matrix.run_distill({"key": "timm:vit_tiny_patch16_224", "sizes": [64, 224]}, tmp_path, 60, [])
    assert r["status"] == "error" and len(calls) == 1 and "declares 0" in r["error"]
