"""Every figure names the processor and the kernel path it was measured on."""

from __future__ import annotations

import subprocess
import sys

import torch

from pipeline.artifacts import machine
from pipeline.artifacts.manifest import environment


def test_manifests_record_the_processor_and_its_kernel_path():
    env = environment()
    assert env["cpu"] == machine.cpu_model() and env["cpu"]
    assert set(env["cpu_isa"]) <= set(machine.ISA_FLAGS)
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_a_forced_kernel_path_is_recorded_and_used():
    code = (
        "import torch, json; from pipeline.artifacts.machine import cpu_record, describe_cpu; "
        "print(json.dumps(cpu_record())); print(describe_cpu(3))"
    )
    env = {"ATEN_CPU_CAPABILITY": "default", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    record, line = out.splitlines()
    assert '"torch_cpu_capability": "DEFAULT"' in record
    assert '"kernel_env": {"ATEN_CPU_CAPABILITY": "default"}' in record
    assert "3 thread(s)" in line and "forced by ATEN_CPU_CAPABILITY=default" in line


def test_isa_flags_come_from_cpuinfo(monkeypatch):
    monkeypatch.setattr(
        machine, "_cpuinfo", lambda: ("Some Xeon", frozenset({"avx2", "amx_tile", "sse2"}), "GenuineIntel")
    )
    assert machine.cpu_isa() == ["avx2", "amx_tile"]
    assert machine.describe_cpu().startswith("Some Xeon (avx2 amx_tile)")
