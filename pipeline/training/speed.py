"""Speed settings for training: mixed precision, memory format, compilation, cuDNN, determinism.

Each option is checked against the device before any time is spent, so an impossible combination
(fp16 on a CPU, SyncBatchNorm without CUDA) is a one-line :class:`ConfigError` rather than a crash
an hour in. Mixed precision autocasts the distiller's forward pass only; a loss that needs fp32
(the KDiffusion chain) opens ``torch.autocast(device_type, enabled=False)`` around itself.

``training.channels_last`` and ``training.amp`` accept ``auto``, decided by :func:`resolve` from the device
and, on a CPU, the processor (docs/bench-cpu-speed.md):

- ``channels_last=auto`` (the default) is true on a CPU: oneDNN's convolutions run NHWC without reordering
  every activation, and the weights differ from contiguous training by float rounding only (like another
  kernel path), so it is not in the fingerprints. On CUDA it stays false, as before.
- ``amp=auto`` is bf16 on a CPU where bf16 arithmetic beats fp32 (AMX, or AVX512-BF16 on AMD:
  :func:`pipeline.artifacts.machine.fast_bf16`), none on any other CPU (emulated bf16 is slower than fp32, and
  Intel's AVX512-BF16 without AMX was no faster) and none on CUDA (as before).
  bf16 changes the weights beyond float noise, so ``auto`` enters the fingerprints as what it became: the
  same config on another processor is other weights. ``TrainingConfig`` keeps ``none``, and the presets choose:
  bf16 pays for a teacher at two threads, not for a MobileNetV2-half student at one (docs/bench-cpu-speed.md).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from pipeline.artifacts import machine
from pipeline.config import TrainingConfig
from pipeline.errors import ConfigError, PipelineError, clipped

AUTO = "auto"
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# training.optimizer_impl -> SGD's keyword: one kernel per parameter and op (for_loop), one per op over
# all parameters (foreach), or one fused kernel (fused); auto leaves the choice to torch (foreach on CUDA).
OPTIMIZER_IMPLS = {"auto": {}, "for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


@dataclasses.dataclass(frozen=True)
class AutoSpeed:
    """What ``auto`` stands for on one kind of device (and, for a CPU, this processor)."""

    channels_last: bool
    amp: str
    why: str  # the amp choice's reason: the native-bf16 flag, or what rules bf16 out


def auto_speed(device_type: str) -> AutoSpeed:
    if device_type != "cpu":
        return AutoSpeed(channels_last=False, amp="none", why=f"{device_type}: set GPU precision explicitly")
    fast, native = machine.fast_bf16(), machine.native_bf16()
    slow = f"{native} without AMX: not faster than fp32 on {machine.cpu_vendor() or 'this processor'}"
    why = fast or (slow if native else "no native bf16")
    return AutoSpeed(channels_last=True, amp="bf16" if fast else "none", why=why)


def resolve(cfg: TrainingConfig, device: torch.device | str) -> TrainingConfig:
    """``cfg`` with each ``auto`` replaced by its value on ``device``'s kind (and this processor, for a CPU)."""
    auto = auto_speed(torch.device(device).type)
    amp = auto.amp if cfg.amp == AUTO else cfg.amp
    return dataclasses.replace(
        cfg,
        channels_last=auto.channels_last if cfg.channels_last == AUTO else cfg.channels_last,
        amp=amp,
        teacher_graph=(
            torch.device(device).type == "cpu" and amp == "none" and not cfg.compile
            if cfg.teacher_graph == AUTO
            else cfg.teacher_graph
        ),
    )


def describe(cfg: TrainingConfig, device: torch.device | str) -> str:
    """One line for the log and the manifest, e.g. ``speed: channels_last, bf16 autocast (avx512_bf16)``."""
    resolved, auto = resolve(cfg, device), auto_speed(torch.device(device).type)
    layout = "channels_last" if resolved.channels_last else "contiguous"
    precision = "fp32" if resolved.amp == "none" else f"{resolved.amp} autocast"
    if cfg.amp == AUTO:
        precision += f" (amp=auto: {auto.why})"
    return f"speed: {layout}{' (auto)' if cfg.channels_last == AUTO else ''}, {precision}"


def check_training(cfg: TrainingConfig, device: torch.device) -> None:
    if cfg.amp not in (*AMP_DTYPES, AUTO):
        raise ConfigError(f"training.amp must be one of {', '.join(AMP_DTYPES)}, {AUTO}, got {cfg.amp!r}")
    if not isinstance(cfg.channels_last, bool) and cfg.channels_last != AUTO:
        raise ConfigError(f"training.channels_last must be true, false or {AUTO}, got {cfg.channels_last!r}")
    if not isinstance(cfg.teacher_graph, bool) and cfg.teacher_graph != AUTO:
        raise ConfigError(f"training.teacher_graph must be true, false or {AUTO}, got {cfg.teacher_graph!r}")
    if cfg.teacher_graph is True and (device.type != "cpu" or resolve(cfg, device).amp != "none" or cfg.compile):
        raise ConfigError(
            "training.teacher_graph=true runs the teacher as a oneDNN graph in fp32: it needs a CPU, training.amp="
            "none and training.compile=false; use training.teacher_graph=auto to have it only where it applies"
        )
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ConfigError(
            "training.amp=fp16 needs a CUDA device (fp16 training needs a GradScaler and GPU kernels); "
            "on a CPU use training.amp=bf16 or none"
        )
    if cfg.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{torch.cuda.get_device_name(device)} has no bf16 support; use training.amp=fp16")
    if cfg.sync_bn and device.type != "cuda":
        raise ConfigError(
            "training.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel); "
            "set training.sync_bn=false on CPU"
        )
    if cfg.deterministic and cfg.cudnn_benchmark:
        raise ConfigError("training.deterministic=true conflicts with training.cudnn_benchmark=true; drop one")
    if cfg.checkpoint_every < 0:
        raise ConfigError(
            f"training.checkpoint_every must be >= 0 (0: at the end of each epoch only), got {cfg.checkpoint_every}"
        )
    if cfg.log_every < 1:
        raise ConfigError(f"training.log_every must be >= 1, got {cfg.log_every}")
    if cfg.val_every < 1:
        raise ConfigError(f"training.val_every must be >= 1 (1: after every epoch), got {cfg.val_every}")
    if cfg.optimizer_impl not in OPTIMIZER_IMPLS:
        raise ConfigError(
            f"training.optimizer_impl must be one of {', '.join(OPTIMIZER_IMPLS)}, got {cfg.optimizer_impl!r}"
        )
    if cfg.cuda_graphs and device.type != "cuda":
        raise ConfigError(
            f"training.cuda_graphs needs a CUDA device (CUDA graphs replay GPU kernels), not {device.type}; "
            "set training.cuda_graphs=false"
        )
    if cfg.cuda_graphs and cfg.compile:
        raise ConfigError("training.cuda_graphs compiles the whole step already; drop training.compile")


@contextmanager
def backend_flags(cfg: TrainingConfig, device: torch.device) -> Iterator[None]:
    """cuDNN autotuning and deterministic kernels for the duration of training (restored afterwards)."""
    cudnn = torch.backends.cudnn
    saved = (cudnn.benchmark, cudnn.deterministic)
    algorithms = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if device.type == "cuda":
        cudnn.benchmark = (not cfg.deterministic) if cfg.cudnn_benchmark is None else cfg.cudnn_benchmark
        cudnn.deterministic = cfg.deterministic
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    if cfg.deterministic:  # an op without a deterministic kernel warns, naming itself, instead of failing the run
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = saved
        torch.use_deterministic_algorithms(algorithms[0], warn_only=algorithms[1])


def autocast(cfg: TrainingConfig, device: torch.device) -> AbstractContextManager:
    dtype = AMP_DTYPES[cfg.amp]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(cfg: TrainingConfig, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (a disabled scaler, which passes calls through, otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")


def memory_format(cfg: TrainingConfig) -> torch.memory_format:
    """The layout of a :func:`resolve`-d config (``auto`` must be decided first)."""
    if cfg.channels_last == AUTO:
        raise ValueError("training.channels_last=auto: resolve(cfg, device) first")
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def convert_sync_batchnorm(module: nn.Module) -> dict[str, nn.Module]:
    """Swap every BatchNorm in ``module`` for SyncBatchNorm in place; returns the originals by path.

    The replacements share the originals' parameters and buffers, and :func:`restore_batchnorm` puts
    the originals back, so the trained model keeps its architecture (fusion looks for BatchNorm2d).
    """
    originals = {
        name: child
        for name, child in module.named_modules()
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm)
    }
    for name, child in originals.items():
        module.set_submodule(name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return originals


def restore_batchnorm(module: nn.Module, originals: dict[str, nn.Module]) -> None:
    for name, original in originals.items():
        synced = module.get_submodule(name)
        original.load_state_dict(synced.state_dict())
        original.train(synced.training)
        module.set_submodule(name, original)


def graphed(model: nn.Module) -> nn.Module:
    """``model`` (the distiller, or DDP around it) compiled with ``mode="reduce-overhead"``: its forward and
    backward kernels are captured as CUDA graphs and replayed, one launch per graph instead of one per op.

    The parameters stay those of ``model``, so the optimizer, the state dict and resume are unaffected. The
    caller marks each step's start (``torch.compiler.cudagraph_mark_step_begin``) and consumes a step's
    outputs before the next one overwrites them.
    """
    return torch.compile(model, mode="reduce-overhead")


def compile_models(*models: nn.Module | None) -> None:
    """``torch.compile`` in place: state_dict keys stay the same, so checkpoints and resume are unaffected."""
    for model in models:
        if model is not None:
            model.compile()


class CompileError(PipelineError):
    """torch.compile could not build its kernels on this machine: a setting it cannot honour, not a bug."""


def compile_error(exc: BaseException, cfg: TrainingConfig) -> CompileError | None:
    """``exc`` as one line with its fix when torch.compile's backend failed, else None.

    Compilation is lazy: Inductor builds its kernels on the first step, so a machine without a working C++
    compiler (Inductor's CPU kernels, Triton's launcher on CUDA) fails there, not when the option is read.
    """
    from torch._dynamo.exc import BackendCompilerFailed

    if not isinstance(exc, BackendCompilerFailed):
        return None
    option = "training.cuda_graphs" if cfg.cuda_graphs else "training.compile"
    cause = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return CompileError(
        f"torch.compile could not build its kernels ({option}=true): {clipped(cause)}; install a C++ compiler "
        f"(e.g. apt-get install g++) or set {option}=false"
    )
