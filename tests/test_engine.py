"""The TensorRT engine's plain-Python parts (profile, sidecar, preflight, build script) on any machine,
and the parts that need TensorRT and a GPU (build, run) where they exist."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest

from exports.metadata import DeployMeta
from exports.trt_commands import EngineTarget, build_script, polygraphy_checks, trtexec_command
from exports.trt_engine import (
    BatchProfile,
    EngineMismatchError,
    EngineSidecar,
    Platform,
    preflight,
    sidecar_path,
    unavailable_reason,
)
from pipeline.errors import ConfigError
from stages.engine import cuda_index, golden_checks

PROFILE = BatchProfile(1, 8, 32, 32)
BUILT = Platform("10.13.0.35", "NVIDIA Jetson AGX Orin", "8.7")
META = DeployMeta(arch="mobile_half", num_classes=3, input_size=32, mean=[0.5] * 3, std=[0.2] * 3, resize=32, crop=32)


def sidecar(**changes) -> EngineSidecar:
    fields = {
        "engine_sha256": "a" * 64,
        "onnx_sha256": "b" * 64,
        "precision": "fp16",
        "platform": BUILT,
        "profile": PROFILE,
        "workspace_mib": 1024,
        "meta": META.to_props(),
    }
    return EngineSidecar(**{**fields, **changes})


def test_profile_shapes_and_validation():
    assert PROFILE.shapes == ((1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))
    assert PROFILE.accepts(32) and not PROFILE.accepts(33)
    assert PROFILE.chunks(70) == [(0, 32), (32, 64), (64, 70)]
    assert PROFILE.chunks(0) == []
    for bad in ((0, 1, 1), (4, 2, 8), (1, 9, 8)):
        with pytest.raises(ConfigError, match="1 <= min_batch <= opt_batch <= max_batch"):
            BatchProfile(*bad, 32)


def test_sidecar_round_trip_and_errors(tmp_path):
    engine = tmp_path / "model.fp16.engine"
    assert sidecar_path(engine).name == "model.fp16.engine.json"
    sidecar().save(sidecar_path(engine))
    loaded = EngineSidecar.load(sidecar_path(engine))
    assert loaded == sidecar()
    assert loaded.deploy_meta == META
    with pytest.raises(EngineMismatchError, match="is missing: an engine needs the sidecar"):
        EngineSidecar.load(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(EngineMismatchError, match="not a readable engine sidecar"):
        EngineSidecar.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text('{"schema": 0}')
    with pytest.raises(EngineMismatchError, match="schema 0"):
        EngineSidecar.load(tmp_path / "old.json")


def test_preflight_accepts_the_same_platform():
    assert preflight(sidecar(), BUILT, "a" * 64) == []
    # a later build number of the same release is the same TensorRT
    assert preflight(sidecar(), Platform("10.13.0.99", BUILT.gpu, "8.7")) == []


def test_preflight_warns_for_another_gpu_of_the_same_architecture():
    warnings = preflight(sidecar(), Platform(BUILT.tensorrt, "NVIDIA Jetson Orin NX", "8.7"))
    assert warnings and "tuned on NVIDIA Jetson AGX Orin" in warnings[0]


@pytest.mark.parametrize(
    "here, message",
    [
        (Platform("11.3.0.1", BUILT.gpu, "8.7"), "built with TensorRT 10.13.0.35, this machine has TensorRT 11.3.0.1"),
        (Platform("10.14.1.2", BUILT.gpu, "8.7"), "this machine has TensorRT 10.14.1.2"),
        (Platform(BUILT.tensorrt, "NVIDIA H100", "9.0"), "built for compute capability 8.7 (NVIDIA Jetson AGX Orin)"),
    ],
)
def test_preflight_refuses_and_explains_a_mismatch(here, message):
    with pytest.raises(EngineMismatchError, match="cannot run this engine") as info:
        preflight(sidecar(), here)
    assert message in str(info.value)
    assert "Rebuild it on this machine" in str(info.value)


def test_preflight_refuses_an_engine_that_is_not_its_sidecars():
    with pytest.raises(EngineMismatchError, match="does not match its sidecar"):
        preflight(sidecar(), BUILT, "c" * 64)


def test_trtexec_commands_for_tensorrt_10_and_11():
    target = EngineTarget("int8", "model.int8.onnx")
    t10 = trtexec_command(target, PROFILE, 2048, 10)
    t11 = trtexec_command(target, PROFILE, 2048, 11)
    assert "--stronglyTyped" in t10 and "--stronglyTyped" not in t11
    for args in (t10, t11):
        assert "--onnx=model.int8.onnx" in args and "--saveEngine=model.int8.engine" in args
        assert "--minShapes=input:1x3x32x32" in args and "--optShapes=input:8x3x32x32" in args
        assert "--maxShapes=input:32x3x32x32" in args and "--memPoolSize=workspace:2048M" in args
        assert not {"--fp16", "--int8", "--best"} & set(args)  # precision lives in the ONNX


def test_engine_gates_follow_the_onnx_rows():
    exact = {"max_abs": 1e-4, "min_cosine": 1.0, "top1_agreement": 1.0}
    assert all(golden_checks("fp32", exact)) and all(golden_checks("fp16", exact)) and all(golden_checks("int8", exact))
    assert not all(golden_checks("fp32", {**exact, "max_abs": 2e-3}))
    assert not all(golden_checks("fp16", {**exact, "min_cosine": 0.99}))
    assert not all(golden_checks("int8", {**exact, "top1_agreement": 0.875}))
    assert [cuda_index(d) for d in ("auto", "cuda", "cuda:1", "cpu")] == [0, 0, 1, None]


FAKE_TRTEXEC = """#!/usr/bin/env bash
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{version}] [b12] # trtexec $*"
echo "trtexec $*" >> "$LOG"
[ "$#" -eq 0 ] && exit 1
exit 0
"""
FAKE_POLYGRAPHY = """#!/usr/bin/env bash
echo "polygraphy $*" >> "$LOG"
"""


def _install(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize("version, major", [("101300", 10), ("110300", 11)])
def test_build_script_runs_the_commands_for_the_installed_tensorrt(tmp_path, version, major):
    """The script under bash, with stand-ins for trtexec and polygraphy that record their arguments."""
    targets = [EngineTarget("fp32", "model.onnx"), EngineTarget("fp16", "model.fp16.onnx")]
    script = tmp_path / "export" / "build_engine.sh"
    script.parent.mkdir()
    script.write_text(build_script(targets, PROFILE, 512))
    script.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _install(bin_dir, "trtexec", FAKE_TRTEXEC.replace("{version}", version))
    _install(bin_dir, "polygraphy", FAKE_POLYGRAPHY)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LOG": str(log)}
    done = subprocess.run([str(script), "fp16"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    calls = [line for line in log.read_text().splitlines() if line != "trtexec "]
    expected_build = "trtexec " + " ".join(trtexec_command(targets[1], PROFILE, 512, major)[1:])
    assert calls[0] == expected_build
    assert calls[1:] == ["polygraphy " + " ".join(c[1:]) for c in polygraphy_checks("fp16")]

    done = subprocess.run([str(script), "int8"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "this export has: fp32 fp16" in done.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_build_script_says_what_it_needs(tmp_path):
    script = tmp_path / "build_engine.sh"
    script.write_text(build_script([EngineTarget("fp32", "model.onnx")], PROFILE, 512))
    script.chmod(0o755)
    done = subprocess.run(
        [str(script)], capture_output=True, text=True, env={**os.environ, "TRTEXEC": "no-such-trtexec"}
    )
    assert done.returncode == 2 and "trtexec not found" in done.stderr
    _install(tmp_path, "quiet-trtexec", "#!/usr/bin/env bash\nexit 1\n")  # prints no version banner
    env = {**os.environ, "TRTEXEC": str(tmp_path / "quiet-trtexec")}
    done = subprocess.run([str(script)], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "set TRT_MAJOR=10 or 11" in done.stderr


def test_unavailable_reason_names_what_is_missing():
    reason = unavailable_reason()
    try:
        import tensorrt  # noqa: F401
        import torch

        has_all = torch.cuda.is_available()
    except Exception:
        has_all = False
    assert (reason == "") == has_all
    if not has_all:
        assert "TensorRT" in reason or "CUDA" in reason


def _need_tensorrt():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.mark.tensorrt
def test_build_and_run_a_real_engine(tmp_path):
    """Build an fp32 engine from a small ONNX with the TensorRT API and compare it with ONNX Runtime."""
    _need_tensorrt()
    import torch

    from exports.onnx_export import export_onnx
    from exports.runners import infer_array, run_onnx
    from exports.trt_engine import TrtRunner, build_engine, current_platform, write_engine

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    model(torch.zeros(1, 3, 32, 32))
    onnx_path = export_onnx(model.eval(), tmp_path / "m.onnx", 32, 18, True, META)
    profile = BatchProfile(2, 4, 8, 32)
    cache = tmp_path / "timing.cache"
    plan = build_engine(onnx_path, profile, 256, cache)
    assert cache.is_file() and plan[:4] != b"{"  # a plain TensorRT plan, no private header
    engine = tmp_path / "m.fp32.engine"
    write_engine(plan, engine, onnx_path, "fp32", profile, 256, META, current_platform())
    images = np.random.default_rng(0).standard_normal((11, 3, 32, 32)).astype(np.float32)
    with TrtRunner(engine) as runner:
        assert runner.input_names == ("input",) and runner.output_names == ("logits",)
        out = runner.infer({"input": images})["logits"]  # chunks of 8 and 3
        single = infer_array(runner, images[:1])  # below min_batch: zero-padded to 2
    assert not runner.is_active and runner.context is None and runner.engine is None  # released on exit
    expected = run_onnx(onnx_path, images)
    assert np.abs(out - expected).max() <= 1e-3
    assert np.abs(single - expected[:1]).max() <= 1e-3


@pytest.mark.gpu
def test_onnxruntime_cuda_provider_is_really_used(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("ONNX Runtime has no CUDA provider here (install onnxruntime-gpu on a CUDA machine)")
    import torch

    from exports.onnx_export import export_onnx
    from exports.runners import OnnxrtRunner

    path = export_onnx(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)), tmp_path / "m.onnx", 2, 18, False
    )
    with OnnxrtRunner(path, "CUDAExecutionProvider") as runner:
        assert runner.session.get_providers()[0] == "CUDAExecutionProvider"


def test_the_engine_int8_accuracy_gate_is_skipped_where_fp32_is_near_chance(tmp_path):
    """The export stage's rule for the INT8 drop (exports.precisions.int8_gate) holds for the engine's too: a
    drop against an fp32 top-1 near chance is noise, recorded as skipped with the reason, never passed."""
    import json
    from types import SimpleNamespace

    from pipeline.config import Config
    from stages.engine import EngineStage

    cfg = Config()  # the synthetic set: 20 classes, class_00 ... class_19
    names = [f"class_{i:02d}" for i in range(20)]
    meta = DeployMeta("timm:lcnet_035", 20, 32, [0.5] * 3, [0.25] * 3, 32, 32, class_names=names)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"gates": {"int8": {"fp32_top1": 5.27}}}))
    result = EngineStage._accuracy(SimpleNamespace(cfg=cfg), "int8", None, meta, report)
    assert result.checks == [] and result.metrics == {"int8_gate": "skipped"}
    assert result.notes == [
        "int8 accuracy gate skipped: fp32 top-1 5.27% is within 5 points of chance (5.00% for 20 classes)"
    ]
