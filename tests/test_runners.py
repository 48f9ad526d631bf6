"""The runner contract (exports.runners): activate / infer names to arrays / deactivate, one behaviour for
every backend, sessions released on exit; and the Classifier that stands on it releases its session."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exports.errors import ModelFileError, RunnerStateError
from exports.metadata import DeployMeta
from exports.onnx_export import export_onnx
from exports.runners import BaseRunner, OnnxrtRunner, infer_array, run_onnx
from exports.runtime import Classifier

ROOT = Path(__file__).resolve().parents[1]
META = DeployMeta("affine", 3, 8, [0.5] * 3, [0.25] * 3, 8, 8, class_names=["a", "b", "c"])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).eval()
    path = export_onnx(net, tmp_path_factory.mktemp("runners") / "m.onnx", 8, 18, False, META)
    return net, path


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 3, 8, 8)).astype(np.float32)


def test_onnxrt_runner_maps_names_to_arrays_and_releases_its_session(model):
    net, path = model
    images = _images(5)
    with torch.no_grad():
        expected = net(torch.from_numpy(images)).numpy()
    runner = OnnxrtRunner(path)
    assert not runner.is_active and runner.session is None  # building is cheap: nothing loaded yet
    with runner:
        assert runner.is_active and runner.input_names == ("input",) and runner.output_names == ("logits",)
        outputs = runner.infer({"input": images})
        assert set(outputs) == {"logits"}
        np.testing.assert_allclose(outputs["logits"], expected, atol=1e-5)
        assert runner.inference_time is not None and runner.inference_time >= 0
        np.testing.assert_allclose(infer_array(runner, images, max_batch=2), expected, atol=1e-5)  # 2 + 2 + 1
    assert not runner.is_active and runner.session is None
    np.testing.assert_allclose(run_onnx(path, images), expected, atol=1e-5)


def test_the_contract_refuses_misuse(model):
    _, path = model
    runner = OnnxrtRunner(path)
    with pytest.raises(RunnerStateError, match="before infer"):
        runner.infer({"input": _images(1)})
    with runner:
        with pytest.raises(RunnerStateError, match="already active"):
            runner.activate()
        with pytest.raises(ValueError, match=r"takes inputs \['input'\]; missing \['input'\], unknown \['x'\]"):
            runner.infer({"x": _images(1)})
    runner.deactivate()  # a second deactivate is a no-op


def test_a_session_is_released_when_the_block_fails(model):
    _, path = model
    runner = OnnxrtRunner(path)
    with pytest.raises(KeyError), runner:
        raise KeyError("app error")
    assert not runner.is_active and runner.session is None


def test_files_onnx_runtime_cannot_load_are_model_file_errors(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        OnnxrtRunner(tmp_path / "none.onnx").activate()
    with pytest.raises(ModelFileError, match="is not a regular file"):
        OnnxrtRunner(tmp_path).activate()
    (tmp_path / "junk.onnx").write_text("not a model")
    runner = OnnxrtRunner(tmp_path / "junk.onnx")
    with pytest.raises(ModelFileError, match="is not a loadable ONNX model"):
        runner.activate()
    assert not runner.is_active


class Doubler(BaseRunner):
    """A backend written against the contract alone: only the three hooks."""

    def __init__(self):
        super().__init__("doubler")
        self.calls: list[str] = []

    def _activate(self):
        self.calls.append("activate")
        self.input_names, self.output_names = ("x",), ("y",)

    def _infer(self, feed):
        return {"y": feed["x"] * 2}

    def _deactivate(self):
        self.calls.append("deactivate")


def test_a_subclass_gets_the_whole_contract_from_three_hooks():
    runner = Doubler()
    with runner as active:
        assert active is runner
        np.testing.assert_array_equal(infer_array(runner, np.arange(5.0), max_batch=2), np.arange(5.0) * 2)
    assert runner.calls == ["activate", "deactivate"]


def test_a_runner_left_active_warns_when_collected():
    runner = Doubler()
    runner.activate()
    with pytest.warns(ResourceWarning, match="never deactivated"):
        del runner
        gc.collect()


def test_classifier_releases_its_session(model):
    _, path = model
    with Classifier.load(path) as classifier:
        runner = classifier.runner
        assert runner.is_active and classifier.logits(_images(2)).shape == (2, 3)
    assert not runner.is_active and runner.session is None
    classifier = Classifier.load(path)
    runner = classifier.runner
    del classifier  # an app that never calls close(): collecting the classifier releases the session
    gc.collect()
    assert not runner.is_active and runner.session is None


class SmallArena(Doubler):
    """A runtime that cannot allocate for more than ``limit`` samples at once, as ONNX Runtime's arena says it."""

    def __init__(self, limit: int, message: str = "Failed to allocate memory for requested buffer of size 1"):
        super().__init__()
        self.limit, self.message, self.sizes = limit, message, []

    def _infer(self, feed):
        self.sizes.append(len(feed["x"]))
        if len(feed["x"]) > self.limit:
            raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : {self.message}")
        return super()._infer(feed)


def test_a_chunk_without_memory_runs_again_in_halves_in_order():
    with SmallArena(limit=3) as runner:
        out = infer_array(runner, np.arange(10.0), max_batch=8)
    np.testing.assert_array_equal(out, np.arange(10.0) * 2)
    assert runner.sizes[:3] == [8, 4, 2] and max(runner.sizes[3:]) <= 2
    with SmallArena(limit=0) as runner, pytest.raises(RuntimeError, match="Failed to allocate"):
        infer_array(runner, np.arange(4.0))  # not even one sample fits: the runtime's error
    assert runner.sizes == [4, 2, 1]
    with SmallArena(limit=1, message="Invalid rank for input") as runner, pytest.raises(RuntimeError, match="rank"):
        infer_array(runner, np.arange(4.0))  # any other error is not retried
    assert runner.sizes == [4]


def test_fp16_models_get_onnx_runtimes_extended_level_on_the_cpu(model):
    """ONNX Runtime's layout optimizations crashed the export (SIGSEGV while building the session of
    torchvision's ViT-B in fp16): fp16 sessions on the CPU are built at the extended level, the rest at all."""
    import onnxruntime as ort

    from exports.latency import onnx_latency
    from exports.runners import cpu_optimization

    _, path = model
    assert cpu_optimization("fp16") == "extended"
    assert cpu_optimization("fp32") == cpu_optimization("int8") == "all"
    assert cpu_optimization("int8", "cpu") == "all"
    assert cpu_optimization("int8", "tensorrt") == "disabled"
    for level, expected in (("extended", "ORT_ENABLE_EXTENDED"), ("all", "ORT_ENABLE_ALL")):
        with OnnxrtRunner(path, optimization=level) as runner:
            used = runner.session.get_session_options().graph_optimization_level
            assert used == getattr(ort.GraphOptimizationLevel, expected)
            assert infer_array(runner, _images(2)).shape[0] == 2
    with pytest.raises(ValueError, match="optimization must be one of"):
        OnnxrtRunner(path, optimization="fastest")
    assert onnx_latency(path, 8, runs=2, warmup=1, optimization="extended")["optimization"] == "extended"


ALLOWED_CPUS = """
import os, sys
import numpy as np
from exports.calibration import collect_ranges
from exports.runners import OnnxrtRunner, default_threads, infer_array

def threads_cpus():  # every thread of this process and the CPUs it may run on
    return {t: open(f"/proc/self/task/{t}/status").read().split("Cpus_allowed_list:")[1].split()[0]
            for t in os.listdir("/proc/self/task")}

images = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
with OnnxrtRunner(sys.argv[1]) as runner:
    infer_array(runner, images)
    assert runner.session.get_session_options().intra_op_num_threads == default_threads() == 1
    seen = threads_cpus()
collect_ranges(sys.argv[1], images, "minmax", ["MatMul", "Gemm"], "affine", "input")
seen.update(threads_cpus())
print(sorted(set(seen.values())))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_onnx_runtime_threads_stay_on_the_cpus_the_process_may_use(model):
    """Left to its default, ONNX Runtime pinned a pool thread to CPU 1 of a process held to CPU 0 (the support
    matrix runs one export per CPU): sessions of a restricted process, the calibrator's too, size their pool by
    the CPUs it may use, so no thread of theirs runs elsewhere."""
    cpu = min(os.sched_getaffinity(0))
    proc = subprocess.run(
        [sys.executable, "-c", ALLOWED_CPUS, str(model[1])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [f"['{cpu}']"]
