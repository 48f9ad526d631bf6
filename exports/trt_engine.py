"""TensorRT engines: build from a precision-specific ONNX, describe, preflight and run them.

Written against the TensorRT Python API of 10.x and 11.x: a strongly typed network (the flag is
required on 10.x and ignored on 11.x, where every network is strongly typed), one optimization
profile over the batch dimension, a persistent timing cache, and ``build_serialized_network``. The
plan file holds exactly TensorRT's serialized bytes, so ``trtexec --loadEngine`` and Polygraphy load
it; what the pipeline knows about it lives in a JSON sidecar beside it.

An engine only runs under the TensorRT version and on the GPU architecture it was built for, so
:func:`preflight` compares the sidecar with the running machine before anything is deserialized and
says how to fix a mismatch. The profile, sidecar and preflight logic are plain Python; building and
running need ``tensorrt`` and a CUDA GPU (buffers are torch CUDA tensors).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from exports.deps import is_installed, require
from exports.metadata import INPUT_NAME, OUTPUT_NAME, DeployMeta
from exports.runners import BaseRunner
from pipeline.artifacts.atomic import atomic_write_bytes
from pipeline.artifacts.hashing import sha256_bytes, sha256_file
from pipeline.errors import ConfigError, PipelineError

SIDECAR_SCHEMA = 1


class EngineMismatchError(PipelineError):
    """An engine built for another TensorRT version or GPU, or one that does not match its sidecar."""


class EngineBuildError(PipelineError):
    """TensorRT could not parse the ONNX or build the engine."""

    exit_code = 1


@dataclass(frozen=True)
class BatchProfile:
    """The optimization profile: the batch sizes the engine accepts, and the one it is tuned for."""

    min_batch: int
    opt_batch: int
    max_batch: int
    input_size: int
    channels: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(
                "engine batch sizes must satisfy 1 <= min_batch <= opt_batch <= max_batch, got "
                f"{self.min_batch}, {self.opt_batch}, {self.max_batch}"
            )
        if self.input_size < 1:
            raise ConfigError(f"input size must be positive, got {self.input_size}")

    def shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.channels, self.input_size, self.input_size)

    @property
    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return self.shape(self.min_batch), self.shape(self.opt_batch), self.shape(self.max_batch)

    def accepts(self, batch: int) -> bool:
        return self.min_batch <= batch <= self.max_batch

    def chunks(self, total: int) -> list[tuple[int, int]]:
        """``(start, stop)`` slices of at most ``max_batch`` samples; a slice shorter than ``min_batch``
        is zero-padded by the runner (samples are independent, so padding never changes results)."""
        return [(start, min(start + self.max_batch, total)) for start in range(0, total, self.max_batch)]


@dataclass(frozen=True)
class Platform:
    """What an engine is bound to."""

    tensorrt: str
    gpu: str
    compute_capability: str

    @property
    def tensorrt_release(self) -> str:
        """major.minor.patch: engines are not portable across TensorRT releases."""
        return ".".join(self.tensorrt.split(".")[:3])


@dataclass
class EngineSidecar:
    """The JSON written beside every plan file."""

    engine_sha256: str
    onnx_sha256: str
    precision: str
    platform: Platform
    profile: BatchProfile
    workspace_mib: int
    meta: dict = field(default_factory=dict)  # the model's DeployMeta, so an app needs only these two files
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    schema: int = SIDECAR_SCHEMA

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EngineSidecar:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise EngineMismatchError(
                f"{path} is missing: an engine needs the sidecar written when it was built "
                "(TensorRT version, GPU, profile, model metadata); rebuild the engine"
            ) from None
        except (OSError, ValueError) as exc:
            raise EngineMismatchError(f"{path} is not a readable engine sidecar ({exc})") from None
        if data.get("schema") != SIDECAR_SCHEMA:
            raise EngineMismatchError(f"{path} has sidecar schema {data.get('schema')!r}, expected {SIDECAR_SCHEMA}")
        try:
            data["platform"] = Platform(**data["platform"])
            data["profile"] = BatchProfile(**data["profile"])
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise EngineMismatchError(f"{path} is a malformed engine sidecar ({exc})") from None

    @property
    def deploy_meta(self) -> DeployMeta:
        return DeployMeta.from_props(self.meta, "engine sidecar")


def sidecar_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def preflight(sidecar: EngineSidecar, current: Platform, engine_sha256: str | None = None) -> list[str]:
    """Refuse an engine this machine cannot run, before deserializing it; returns warnings.

    TensorRT ties a plan to its release and to the GPU's compute capability (no version or hardware
    compatibility mode is used here). A different GPU model of the same compute capability runs the
    engine, but with kernels tuned for the other GPU: that is a warning.
    """
    problems = []
    if engine_sha256 is not None and engine_sha256 != sidecar.engine_sha256:
        problems.append("the engine file does not match its sidecar (sha256 differs): it was replaced or modified")
    built, here = sidecar.platform, current
    if built.tensorrt_release != here.tensorrt_release:
        problems.append(f"it was built with TensorRT {built.tensorrt}, this machine has TensorRT {here.tensorrt}")
    if built.compute_capability != here.compute_capability:
        problems.append(
            f"it was built for compute capability {built.compute_capability} ({built.gpu}), "
            f"this GPU is {here.gpu} with compute capability {here.compute_capability}"
        )
    if problems:
        raise EngineMismatchError(
            "cannot run this engine: "
            + "; ".join(problems)
            + ". Rebuild it on this machine from the exported ONNX with build_engine.sh "
            "(or `python -m pipeline run engine`)"
        )
    if built.gpu != here.gpu:
        return [f"engine was tuned on {built.gpu}; running on {here.gpu} (same compute capability) may be slower"]
    return []


def unavailable_reason() -> str:
    """Why TensorRT engines cannot be built or run here ('' when they can)."""
    if not is_installed("tensorrt"):
        return "TensorRT is not installed (pip install 'kdiffusion-pipeline[tensorrt]')"
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # the public wheels are stubs that fail at import when the vendor download failed
        return f"TensorRT is installed but cannot be imported ({type(exc).__name__}: {exc})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is available (torch.cuda.is_available() is False)"
    return ""


def current_platform(device: int = 0) -> Platform:
    trt = require("tensorrt")
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return Platform(trt.__version__, torch.cuda.get_device_name(device), f"{major}.{minor}")


def _network_flags(trt) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(
    onnx_path: str | Path,
    profile: BatchProfile,
    workspace_mib: int,
    timing_cache: str | Path | None = None,
    input_name: str = INPUT_NAME,
) -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build a serialized plan.

    The timing cache is read when present and written back (merged) after the build, so rebuilding
    on the same GPU skips kernel timing.
    """
    trt = require("tensorrt")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    optimization = builder.create_optimization_profile()
    optimization.set_shape(input_name, *profile.shapes)
    config.add_optimization_profile(optimization)
    cache_path = Path(timing_cache) if timing_cache else None
    previous = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(previous)
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # a cache from another GPU or release
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path}; see its log above")
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def write_engine(
    plan: bytes,
    engine_path: str | Path,
    onnx_path: str | Path,
    precision: str,
    profile: BatchProfile,
    workspace_mib: int,
    meta: DeployMeta,
    platform: Platform,
) -> EngineSidecar:
    """Write the plain plan and its sidecar."""
    engine_path = Path(engine_path)
    engine_path.write_bytes(plan)
    sidecar = EngineSidecar(
        engine_sha256=sha256_bytes(plan),
        onnx_sha256=sha256_file(onnx_path),
        precision=precision,
        platform=platform,
        profile=profile,
        workspace_mib=workspace_mib,
        meta=meta.to_props(),
        input_name=meta.input_name,
        output_name=meta.output_name,
    )
    sidecar.save(sidecar_path(engine_path))
    return sidecar


class TrtRunner(BaseRunner):
    """Runs a plan file on the current CUDA device, after the preflight (the runner contract of
    :mod:`exports.runners`).

    Buffers are torch CUDA tensors; inputs are split into chunks the profile accepts, and a chunk
    shorter than ``min_batch`` is zero-padded. ``warnings`` holds what the preflight noticed.
    """

    def __init__(self, engine_path: str | Path, device: int = 0):
        super().__init__(f"trt:{Path(engine_path).name}")
        self.engine_path = Path(engine_path)
        self.sidecar = EngineSidecar.load(sidecar_path(self.engine_path))
        self.device = device
        self.warnings: list[str] = []
        self.engine = self.context = self.stream = None

    def _activate(self) -> None:
        trt = require("tensorrt")
        import torch

        plan = self.engine_path.read_bytes()
        self.warnings = preflight(self.sidecar, current_platform(self.device), sha256_bytes(plan))
        torch.cuda.set_device(self.device)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineMismatchError(f"TensorRT could not deserialize {self.engine_path}; rebuild the engine")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self.input_names, self.output_names = (self.sidecar.input_name,), (self.sidecar.output_name,)

    def _deactivate(self) -> None:
        self.context = self.engine = self.stream = None  # execution context before engine: TensorRT's order

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = feed[self.sidecar.input_name]
        outs = [self._run(images[start:stop]) for start, stop in self.sidecar.profile.chunks(len(images))]
        return {self.sidecar.output_name: np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)}

    def _run(self, batch: np.ndarray) -> np.ndarray:
        trt = require("tensorrt")
        import torch

        name_in, name_out = self.sidecar.input_name, self.sidecar.output_name
        device = torch.device("cuda", self.device)
        count = len(batch)
        padded = max(count, self.sidecar.profile.min_batch)
        x = torch.zeros((padded, *batch.shape[1:]), dtype=torch.float32, device=device)
        x[:count] = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
        if not self.context.set_input_shape(name_in, tuple(x.shape)):
            raise EngineMismatchError(f"the engine does not accept input shape {tuple(x.shape)}")
        out_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(name_out))
        y = torch.empty(tuple(self.context.get_tensor_shape(name_out)), dtype=out_dtype, device=device)
        self.context.set_tensor_address(name_in, x.data_ptr())
        self.context.set_tensor_address(name_out, y.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(device))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise EngineBuildError("TensorRT execute_async_v3 failed; see its log above")
        self.stream.synchronize()
        return y[:count].float().cpu().numpy()


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
    if dtype not in table:
        raise EngineBuildError(f"unexpected engine output type {dtype}; expected float32 or float16 logits")
    return table[dtype]
