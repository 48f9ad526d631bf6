"""One inference contract for every backend: Polygraphy's runner, names to arrays.

A runner is cheap to build and does its work in :meth:`BaseRunner.activate` (load the model, open the
session); :meth:`BaseRunner.infer` maps ``{input name: array}`` to ``{output name: array}``;
:meth:`BaseRunner.deactivate` releases the session. Used as a context manager it is released on exit,
even on an error. Subclasses implement only ``_activate``, ``_infer`` and ``_deactivate``; the public
methods own the state checks and the input validation, so every backend behaves the same.

    with OnnxrtRunner("model.onnx") as runner:
        logits = runner.infer({"input": batch})["logits"]

Part of the edge runtime: numpy and, when activated, ONNX Runtime only. The TensorRT runner lives in
``exports.trt_engine`` and follows the same contract.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np

from .deps import require
from .errors import ModelFileError, ProviderError, RunnerStateError

# ONNX Runtime's exceptions for a file it cannot load (they have no common base class but RuntimeError)
_ORT_LOAD_ERRORS = ("Fail", "InvalidProtobuf", "InvalidGraph", "NoSuchFile", "InvalidArgument", "NotImplemented")


class BaseRunner:
    """The contract; see the module docstring. ``inference_time`` is the seconds the last ``infer`` took."""

    def __init__(self, name: str):
        self.name = name
        self.is_active = False
        self.inference_time: float | None = None
        self.input_names: tuple[str, ...] = ()
        self.output_names: tuple[str, ...] = ()

    def __enter__(self) -> BaseRunner:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        if self.is_active:
            raise RunnerStateError(f"runner {self.name} is already active")
        self._activate()
        self.is_active = True

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.is_active:
            raise RunnerStateError(f"call activate() on runner {self.name} (or use it in a with block) before infer()")
        missing = sorted(set(self.input_names) - set(feed))
        unknown = sorted(set(feed) - set(self.input_names))
        if missing or unknown:
            raise ValueError(
                f"runner {self.name} takes inputs {list(self.input_names)}; missing {missing}, unknown {unknown}"
            )
        start = time.perf_counter()
        outputs = self._infer(feed)
        self.inference_time = time.perf_counter() - start
        return outputs

    def deactivate(self) -> None:
        """Release the session; a no-op on a runner that is not active."""
        if self.is_active:
            self.is_active = False
            self._deactivate()

    def __del__(self) -> None:
        if getattr(self, "is_active", False):
            warnings.warn(f"runner {self.name} was never deactivated; use it in a with block", ResourceWarning, 2)

    def _activate(self) -> None:
        """Load the model; set ``input_names`` and ``output_names``."""
        raise NotImplementedError

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _deactivate(self) -> None:
        raise NotImplementedError


def infer_array(runner: BaseRunner, batch: np.ndarray, max_batch: int | None = None) -> np.ndarray:
    """The first output for ``batch`` fed to the first input, in chunks of at most ``max_batch`` samples:
    the single-input, single-output shape of a classifier.

    A chunk the runtime cannot find memory for is run again in halves, down to one sample: a 224 px
    transformer's activations at the evaluation batch outgrow a small machine (timm's CoaT on 20 GB)."""
    step = max_batch or max(len(batch), 1)
    name, out = runner.input_names[0], runner.output_names[0]
    chunks, start = [], 0
    while start < len(batch):
        try:
            chunks.append(runner.infer({name: batch[start : start + step]})[out])
        except Exception as exc:
            if step == 1 or not out_of_memory(exc):
                raise
            step = (min(step, len(batch) - start) + 1) // 2
            continue
        start += step
    return np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a runtime that could not allocate (ONNX Runtime's arena raises a plain ``Fail``)."""
    text = str(exc)
    return isinstance(exc, MemoryError) or "Failed to allocate memory" in text or "bad_alloc" in text


OPTIMIZATION_LEVELS = {
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "disabled": "ORT_DISABLE_ALL",
}
# The level a precision's model gets on the CPU where it is not "all": ONNX Runtime's layout optimizations (level
# "all" over "extended") crash the process while building the session of torchvision's ViT-B in fp16 (SIGSEGV,
# onnxruntime 1.32 on a Xeon with AMX); the checks judge the graph's numbers, which these levels do not change.
CPU_OPTIMIZATION = {"fp16": "extended"}


def cpu_optimization(precision: str, int8_target: str = "") -> str:
    """The ONNX Runtime level at which a model's numbers are those of its graph on the CPU.

    A TensorRT-target INT8 model runs unfused: from level "basic" up, ONNX Runtime's CPU fuses its Q/DQ nodes
    into integer kernels whose results can depart far from the graph as written, which is what TensorRT computes
    (a Fashion-MNIST student, DKD: top-1 76.6 % unfused, 40.0 % fused; fp32 76.8 %; onnxruntime 1.32, AMD EPYC).
    A cpu-target model is judged fused, as it is deployed. ``int8_target`` is the model's metadata field.
    """
    if precision == "int8" and int8_target == "tensorrt":
        return "disabled"
    return CPU_OPTIMIZATION.get(precision, "all")


def default_threads() -> int | None:
    """ONNX Runtime's intra-op thread count for this process: the CPUs it may run on, where that is fewer than
    the machine has (``taskset``, a container's cpuset, one CPU per job of the support matrix); else None,
    ONNX Runtime's own default.

    Left to its default, ONNX Runtime sizes its pool by the machine's cores and pins each pool thread to one of
    them, outside the process's CPU set: under ``taskset -c 0`` on a 2-core machine a session ran a thread
    pinned to CPU 1 (onnxruntime 1.32), where the support matrix ran another export. A count given explicitly
    leaves the threads on the process's CPUs.
    """
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        return None
    return allowed if allowed < (os.cpu_count() or allowed) else None


def session_options(optimization: str = "all", threads: int | None = None, prepack: bool = True):
    """ONNX Runtime session options at ``optimization`` with ``threads`` (default: :func:`default_threads`).

    ``prepack=False`` keeps the CPU kernels from re-laying out constant weights, which changes their sums'
    order: a model whose constant Q/DQ was folded then computes exactly what its file does.
    """
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[optimization])
    threads = threads or default_threads()
    if threads:
        options.intra_op_num_threads = threads
    return options


class OnnxrtRunner(BaseRunner):
    """An ONNX Runtime session on exactly ``provider``.

    ONNX Runtime would otherwise fall back to the CPU quietly; here an unavailable provider, or a session
    that does not use it, is a :class:`ProviderError`. A file ONNX Runtime cannot load is a
    :class:`ModelFileError`. ``model``, where given, is run in place of the file's bytes: the same model
    prepared in memory (:func:`exports.constant_qdq.fold_constant_qdq`); ``path`` still names it.
    ``prepack``: see :func:`session_options`.
    """

    def __init__(
        self,
        path: str | Path,
        provider: str = "CPUExecutionProvider",
        threads: int | None = None,
        optimization: str = "all",
        model: bytes | None = None,
        prepack: bool = True,
    ):
        super().__init__(f"onnxrt:{Path(path).name}")
        if optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, got {optimization!r}")
        self.path = Path(path)
        self.provider = provider
        self.threads = threads
        self.optimization = optimization
        self.model = model
        self.prepack = prepack
        self.session = None

    def metadata(self) -> dict[str, str]:
        """The model's ``metadata_props`` (where the pipeline writes its deployment metadata)."""
        if self.session is None:
            raise RunnerStateError(f"activate runner {self.name} before reading its metadata")
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def _activate(self) -> None:
        ort = require("onnxruntime")
        available = ort.get_available_providers()
        if self.provider not in available:
            raise ProviderError(
                f"ONNX Runtime provider {self.provider} is not available; available: {', '.join(available)}"
            )
        if self.model is None and not self.path.is_file():
            raise ModelFileError.not_a_file(self.path)
        options = session_options(self.optimization, self.threads, self.prepack)
        state = require("onnxruntime.capi.onnxruntime_pybind11_state")
        load_errors = tuple(getattr(state, name) for name in _ORT_LOAD_ERRORS if hasattr(state, name))
        try:
            source = str(self.path) if self.model is None else self.model
            session = ort.InferenceSession(source, sess_options=options, providers=[self.provider])
        except load_errors as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ModelFileError(f"{self.path} is not a loadable ONNX model ({first})") from None
        used = session.get_providers()
        if not used or used[0] != self.provider:
            raise ProviderError(f"ONNX Runtime asked for {self.provider} but the session uses {used}")
        self.session = session
        self.input_names = tuple(i.name for i in session.get_inputs())
        self.output_names = tuple(o.name for o in session.get_outputs())

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(list(self.output_names), feed)))

    def _deactivate(self) -> None:
        self.session = None  # the last reference: ONNX Runtime frees the session and its arena here


def run_onnx(path: str | Path, batch: np.ndarray, provider: str = "CPUExecutionProvider") -> np.ndarray:
    """One call: the first output of the ONNX model at ``path`` for ``batch``, the session released after."""
    with OnnxrtRunner(path, provider) as runner:
        return infer_array(runner, batch)
