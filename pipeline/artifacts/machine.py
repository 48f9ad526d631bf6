"""The processor a figure was measured on: model, the vector extensions that pick PyTorch's and oneDNN's CPU
kernels, and the kernel path in use. The same seed gives results that differ in the last bits between AVX2,
AVX-512 and AMX kernels, and training turns that into points of accuracy, so every figure names them."""

from __future__ import annotations

import functools
import os
import platform
import sys

from pipeline.errors import ConfigError

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")  # the ones that change which kernels run
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")  # set to force a kernel path
BF16_FLAGS = ("amx_tile", "avx512_bf16")  # bf16 matrix arithmetic in hardware: AMX tiles, then AVX512-BF16


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str], str]:
    model, flags, vendor = "", frozenset(), ""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:  # not Linux: the platform module's name is all there is
        pass
    return model or platform.processor() or platform.machine(), flags, vendor


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_vendor() -> str:
    """``GenuineIntel``, ``AuthenticAMD``, ... ("" where /proc/cpuinfo is unreadable)."""
    return _cpuinfo()[2]


def cpu_isa() -> list[str]:
    """Which of :data:`ISA_FLAGS` the processor has (empty where /proc/cpuinfo is unreadable)."""
    return [f for f in ISA_FLAGS if f in _cpuinfo()[1]]


def native_bf16() -> str | None:
    """The flag of :data:`BF16_FLAGS` that gives this processor bf16 arithmetic in hardware, or ``None``.

    Without one, oneDNN emulates bf16 with fp32 instructions and conversions, usually slower than fp32 itself. A
    kernel path forced below bf16 (``ONEDNN_MAX_CPU_ISA=AVX2``, ``AVX512_CORE``) counts as none, and one forced to
    ``AVX512_CORE_BF16`` on a processor with AMX as ``avx512_bf16``.
    """
    forced = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    isa = cpu_isa()
    if forced not in ("", "ALL", "DEFAULT"):
        if not any(level in forced for level in ("BF16", "FP16", "AMX")):
            return None
        if "AMX" not in forced:  # AVX512_CORE_BF16 or _FP16: the AVX512-BF16 path, AMX turned off
            isa = [flag for flag in isa if flag != "amx_tile"]
    return next((flag for flag in BF16_FLAGS if flag in isa), None)


def fast_bf16() -> str | None:
    """The :func:`native_bf16` flag where training in bf16 beats fp32: AMX, or AVX512-BF16 on AMD (ResNet-20 trained
    about 1.8x faster on a Zen 4 EPYC). ``None`` elsewhere, Intel's AVX512-BF16 without AMX included: there a bf16
    distillation step ran at 0.71-0.76x of fp32 (a Xeon with AMX turned off, docs/bench-default-run.md)."""
    flag = native_bf16()
    return None if flag == "avx512_bf16" and cpu_vendor() != "AuthenticAMD" else flag


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity set (``taskset``, a container's cpuset), which can be far
    fewer than the machine's count; more torch threads than these slow training many times over."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def check_threads(threads: int | None, option: str) -> None:
    """Refuse more threads than :func:`usable_cpus`: each step then waits on descheduled threads (a tiny teacher
    stage took 397 s at 1,000 threads on 2 CPUs, against 0.3 s)."""
    if threads is not None and threads > (usable := usable_cpus()):
        raise ConfigError(
            f"{option} {threads} is more than the {usable} CPU(s) this process may use, which slows torch down many "
            f"times over; use {option} {usable} or fewer"
        )


def cpu_record() -> dict:
    """For manifests: model, ISA flags, PyTorch's kernel path (when torch is loaded) and any forced path."""
    record: dict = {"cpu": cpu_model(), "cpu_isa": cpu_isa()}
    if "torch" in sys.modules:
        import torch

        record["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    forced = {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}
    if forced:
        record["kernel_env"] = forced
    return record


def describe_cpu(threads: int | None = None) -> str:
    """One line for a benchmark table or a test report header."""
    record = cpu_record()
    text = f"{record['cpu']} ({' '.join(record['cpu_isa']) or 'no AVX2'})"
    if threads is not None:
        text += f", {threads} thread(s)"
    if "torch_cpu_capability" in record:
        text += f", torch kernels {record['torch_cpu_capability']}"
    if "kernel_env" in record:
        text += " forced by " + " ".join(f"{k}={v}" for k, v in record["kernel_env"].items())
    return text
