"""The automatic CPU speed choice (``training.channels_last=auto``, ``training.amp=auto``), without timing anything.

The processor is faked through :mod:`pipeline.artifacts.machine`'s vendor and ISA flags, so every case runs on
any machine: bf16 only where the processor computes it faster than fp32 (AMX, AMD's AVX512-BF16), channels_last
on a CPU, nothing CPU-only on CUDA, and the resolved precision in the stage's recorded parameters (so another
processor is other weights).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.artifacts import machine
from pipeline.artifacts.manifest import fingerprint
from pipeline.cli import run_cli
from pipeline.config import OptimConfig, TrainingConfig, load_config
from pipeline.errors import ConfigError
from pipeline.training import fit, make_loader
from pipeline.training.speed import check_training, describe, memory_format, resolve
from stages import get_stage
from stages.support.kit import training_params
from tests.conftest import TINY
from tests.trainkit import DATA, Scripted, TinyNet, tiny_data

CPU = torch.device("cpu")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu_speed.py"
# (vendor, ISA flags) of the processors the policy tells apart
AVX2 = ("GenuineIntel", ["avx2"])
AVX512 = ("GenuineIntel", ["avx2", "avx512f"])  # AVX-512 without its bf16 extension: oneDNN would emulate bf16
COOPER_LAKE = ("GenuineIntel", ["avx2", "avx512f", "avx512_bf16"])  # Intel's AVX512-BF16 without AMX
ZEN4 = ("AuthenticAMD", ["avx2", "avx512f", "avx512_bf16"])
SAPPHIRE_RAPIDS = ("GenuineIntel", ["avx2", "avx512f", "avx512_bf16", "amx_tile"])


@pytest.fixture
def processor(monkeypatch):
    """Fake this machine's vendor and ISA flags: ``processor(ZEN4)``."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)

    def fake(cpu: tuple[str, list[str]]) -> None:
        vendor, flags = cpu
        monkeypatch.setattr(machine, "cpu_isa", lambda: list(flags))
        monkeypatch.setattr(machine, "cpu_vendor", lambda: vendor)

    return fake


AUTO = TrainingConfig(amp="auto", channels_last="auto")


@pytest.mark.parametrize(
    "flags, amp, why",
    [(AVX2, "none", "no native bf16"), (AVX512, "none", "no native bf16"), (ZEN4, "bf16", "avx512_bf16"),
     (SAPPHIRE_RAPIDS, "bf16", "amx_tile"),
     (COOPER_LAKE, "none", "avx512_bf16 without AMX: not faster than fp32 on GenuineIntel")],
)  # fmt: skip
def test_auto_on_a_cpu_is_channels_last_and_bf16_only_where_it_beats_fp32(processor, flags, amp, why):
    processor(flags)
    resolved = resolve(AUTO, CPU)
    assert (resolved.channels_last, resolved.amp) == (True, amp)
    assert memory_format(resolved) == torch.channels_last
    assert describe(AUTO, CPU) == f"speed: channels_last (auto), {'fp32' if amp == 'none' else 'bf16 autocast'} " + (
        f"(amp=auto: {why})"
    )


def test_a_kernel_path_forced_below_bf16_has_no_native_bf16(processor, monkeypatch):
    processor(SAPPHIRE_RAPIDS)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert resolve(AUTO, CPU).amp == "none"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert resolve(AUTO, CPU).amp == "bf16" and describe(AUTO, CPU).endswith("(amp=auto: amx_tile)")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # AMX off: Intel's AVX512-BF16 path, measured slower
    assert resolve(AUTO, CPU).amp == "none"
    assert describe(AUTO, CPU).endswith("(amp=auto: avx512_bf16 without AMX: not faster than fp32 on GenuineIntel)")


@pytest.mark.parametrize("flags", [AVX2, SAPPHIRE_RAPIDS])
def test_auto_on_cuda_keeps_the_gpu_settings_as_they_were(processor, flags):
    processor(flags)  # the host's bf16 says nothing about the GPU's
    resolved = resolve(AUTO, torch.device("cuda"))
    assert (resolved.channels_last, resolved.amp) == (False, "none")
    assert resolved == resolve(TrainingConfig(), "cuda:1")


def test_explicit_settings_are_kept_whatever_the_processor(processor):
    processor(SAPPHIRE_RAPIDS)
    explicit = TrainingConfig(amp="none", channels_last=False, teacher_graph=False)
    assert resolve(explicit, CPU) == explicit
    processor(AVX2)
    assert resolve(TrainingConfig(amp="bf16", channels_last=True), CPU).amp == "bf16"
    cfg = load_config("default", None, ["training.amp=none", "training.channels_last=false"])
    assert (cfg.training.amp, cfg.training.channels_last) == ("none", False)


def test_the_default_run_is_channels_last_on_a_cpu_and_bf16_only_where_it_beats_fp32(processor):
    """The default preset asks for ``amp=auto`` (its teacher trains about 2x faster in bf16 on AMX); the typed
    default stays fp32, so a config of one's own changes no weights by processor (docs/bench-cpu-speed.md)."""
    assert TrainingConfig().amp == "none"
    default = load_config("default", None, [])
    assert (default.training.channels_last, default.training.amp) == ("auto", "auto")
    for flags, amp in ((SAPPHIRE_RAPIDS, "bf16"), (ZEN4, "bf16"), (COOPER_LAKE, "none"), (AVX2, "none")):
        processor(flags)
        resolved = resolve(default.training, CPU)
        assert (resolved.channels_last, resolved.amp) == (True, amp)


@pytest.mark.parametrize(
    "options, message",
    [({"amp": "fastest"}, "training.amp must be one of none, bf16, fp16, auto"),
     ({"channels_last": "yes please"}, "training.channels_last must be true, false or auto")],
)  # fmt: skip
def test_unknown_speed_words_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        check_training(TrainingConfig(**options), CPU)


def test_the_resolved_precision_is_in_the_fingerprint_and_channels_last_is_not(processor):
    cfg = load_config("default", None, [*TINY, "device=cpu", "training.amp=auto"])
    teacher = get_stage("teacher")
    processor(AVX512)
    without = teacher.params(cfg)
    assert training_params(cfg)["amp"] == "none" and get_stage("train").params(cfg)["training"]["amp"] == "none"
    explicit = load_config("default", None, [*TINY, "device=cpu", "training.amp=none"])
    assert teacher.params(explicit) == without  # auto that means none is the same weights as none
    processor(ZEN4)
    native = teacher.params(cfg)
    assert native["training"]["amp"] == "bf16" and get_stage("train").params(cfg)["training"]["amp"] == "bf16"
    assert fingerprint("teacher", native, [], "code") != fingerprint("teacher", without, [], "code")
    # channels_last changes float rounding only, like another kernel path: not a fingerprint of its own
    contiguous = load_config("default", None, [*TINY, "device=cpu", "training.amp=auto", "training.channels_last=no"])
    assert teacher.params(contiguous) == native


def _fit(training: TrainingConfig, lines: list[str]) -> Scripted:
    torch.manual_seed(0)
    distiller = Scripted(TinyNet())
    loader = make_loader(tiny_data().dataset("train", augment=True), DATA, train=True)
    fit(distiller, loader, None, OptimConfig(epochs=1, milestones=[]), CPU, log=lines.append, training=training)
    return distiller


@pytest.mark.parametrize("flags, logits", [(AVX512, torch.float32), (ZEN4, torch.bfloat16)])
def test_fit_trains_with_what_auto_resolves_to_and_says_so_once(processor, flags, logits):
    processor(flags)
    lines: list[str] = []
    distiller = _fit(AUTO, lines)
    assert distiller.dtypes["logits"] == logits  # autocast ran (or not): the choice is not only logged
    assert distiller.student.conv.weight.is_contiguous(memory_format=torch.channels_last)
    speed = [line for line in lines if "speed:" in line]
    assert speed == [f"train: {describe(AUTO, CPU)}"]


def test_fit_with_explicit_settings_logs_no_speed_line(processor):
    processor(ZEN4)
    lines: list[str] = []
    distiller = _fit(TrainingConfig(amp="none", channels_last=False), lines)
    assert distiller.dtypes["logits"] == torch.float32
    assert distiller.student.conv.weight.is_contiguous()
    assert not [line for line in lines if "speed:" in line]


@pytest.mark.slow  # two teacher trainings: about 3 s on 2 CPU cores
def test_a_stage_trained_on_another_processor_runs_again(processor, tmp_path, capsys):
    """The teacher stage records what ``amp=auto`` became; on a processor where it becomes something else, the
    stage is stale (other weights), and its manifest says how it was trained."""
    out = tmp_path / "run"
    sets = [a for item in [*TINY, "training.amp=auto"] for a in ("--set", item)]
    processor(AVX512)
    assert run_cli(["run", "teacher", "--device", "cpu", "--out", str(out), *sets]) == 0
    first = json.loads((out / "teacher" / "manifest.json").read_text())
    assert first["params"]["training"]["amp"] == "none"
    assert first["metrics"]["training_speed"] == "speed: channels_last (auto), fp32 (amp=auto: no native bf16)"
    assert "teacher: speed: channels_last (auto), fp32 (amp=auto: no native bf16)" in _printed(capsys)
    assert run_cli(["run", "teacher", "--device", "cpu", "--out", str(out), *sets]) == 0
    assert "[teacher] up to date" in _printed(capsys)
    processor(ZEN4)
    assert run_cli(["run", "teacher", "--device", "cpu", "--out", str(out), *sets]) == 0
    assert "[teacher] running (params_changed" in _printed(capsys)
    again = json.loads((out / "teacher" / "manifest.json").read_text())
    assert again["params"]["training"]["amp"] == "bf16"
    assert again["metrics"]["training_speed"] == "speed: channels_last (auto), bf16 autocast (amp=auto: avx512_bf16)"


def _printed(capsys) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cpu_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_skips_bf16_without_native_bf16_and_names_the_defaults():
    bench = _bench()
    assert bench.skip_reason("channels_last+bf16", None).startswith("no native bf16")
    assert bench.skip_reason("channels_last+bf16", "avx512_bf16") == ""
    assert bench.skip_reason("channels_last", None) == ""
    assert bench.default_setting("amx_tile") == bench.default_setting(None) == "channels_last+graph"
    assert bench.default_setting("amx_tile", amp_auto=True) == "channels_last+bf16"
    assert bench.default_setting(None, amp_auto=True) == "channels_last+graph"
    for name, settings in bench.SETTINGS.items():  # the settings the loop really takes
        check_training(TrainingConfig(**settings), CPU)
        # each cell says whether the teacher is a graph; only the default's is, as auto makes it on a CPU in fp32
        assert settings["teacher_graph"] == (name == "channels_last+graph")
    assert resolve(TrainingConfig(), CPU) == resolve(TrainingConfig(**bench.SETTINGS["channels_last+graph"]), CPU)


@pytest.mark.slow  # a subprocess training six tiny cells: about 10 s on 2 CPU cores
def test_the_benchmark_runs_end_to_end_at_tiny_settings(tmp_path):
    out = tmp_path / "speed.md"
    command = [
        sys.executable, str(BENCH), "--methods", "kd,kdiffusion", "--teacher", "resnet20", "--student", "resnet20",
        "--batch", "8", "--steps", "2", "--warmup", "0", "--threads", "1",
        "--settings", "peer,before,channels_last,channels_last+graph,channels_last+bf16", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}  # no native bf16, whatever the CPU
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    assert table == done.stdout.strip() + "\n" and "--batch 8 --steps 2" in table
    for method in ("kd", "kdiffusion"):
        for setting in (
            "peer",
            "before (default before)",
            "channels_last",
            "channels_last+graph (default now; with training.amp=auto)",
        ):
            assert f"| {method} | 1 | {setting} | " in table
        assert f"| {method} | 1 | channels_last+bf16 | skipped: no native bf16" in table
    assert "- KD, 1 thread(s), batch 8: default now (channels_last+graph) / peer = " in table
    runs = json.loads(out.with_suffix(".json").read_text())
    assert len(runs) == 8 and all(r["images_per_s"][0] > 0 for r in runs)


def test_the_default_run_benchmark_pairs_arms_by_seed():
    spec = importlib.util.spec_from_file_location("bench_default_run", BENCH.with_name("bench_default_run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(arm, seed, teacher_s, train_s, teacher, student):
        stages = {"teacher": teacher_s, "train": train_s, "export": 5.0}
        return {"arm": arm, "seed": seed, "total": teacher_s + train_s + 5.0, "stages": stages,
                "top1": {"teacher": teacher, "train": student}, "speed": ""}  # fmt: skip

    default = [run("default", 0, 60, 40, 90.0, 85.0), run("default", 1, 62, 38, 91.0, 84.5)]
    baseline = [run("baseline", 0, 90, 60, 90.5, 85.0), run("baseline", 1, 88, 62, 90.0, 85.5)]
    lines = module.summary(default, baseline)
    assert "**0.67x** for the training stages" in lines[0] and "0.68x for the whole run" in lines[0]
    assert lines[1].endswith("-0.50, +1.00") and lines[2].endswith("+0.00, -1.00")
    rows = module.table("arm", default + baseline)
    assert len(rows) == 6 and rows[2].startswith("| default | 0 | 105.0 | 60.0 | 40.0 | 5.0 | 90.00 | 85.00 |")
    assert rows[5].startswith("| baseline | 1 | 155.0 |")


@pytest.mark.slow  # a subprocess that imports torch and traces one step: about 15 s on 2 CPU cores
def test_a_compile_the_machine_cannot_build_is_one_line_with_its_fix(tmp_path):
    """Inductor builds its CPU kernels with a C++ compiler on the first step; without one the user gets the
    reason and the setting to change, exit 2, not torch's traceback."""
    sets = [a for item in [*TINY, "training.compile=true"] for a in ("--set", item)]
    command = [sys.executable, "-m", "pipeline", "run", "teacher", "--device", "cpu", "--out", str(tmp_path / "run")]
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),  # nothing compiled earlier to fall back on
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run([*command, *sets], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "torch.compile could not build its kernels (training.compile=true)" in error[0]
    assert "no-such-compiler" in error[0] and error[0].endswith("or set training.compile=false")
