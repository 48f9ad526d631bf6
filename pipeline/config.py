"""The experiment: typed defaults, YAML presets and files, and ``key=value`` overrides.

A config is resolved in this order: the dataclass defaults, the preset, the ``--config`` file, then
command-line overrides. Unknown keys and wrong types are errors naming the key, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError


@dataclass
class SyntheticConfig:
    """The built-in dataset, generated in memory from ``seed`` (see :mod:`pipeline.data.synthetic`)."""

    train_size: int = 2560
    test_size: int = 512
    seed: int = 0


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    root: str | None = None
    num_classes: int | None = None  # None: the dataset's own class count
    image_size: int | None = None  # None: the dataset's native size
    batch_size: int = 64
    eval_batch_size: int = 256
    workers: int | None = None  # loader processes; None: 0 for the in-memory synthetic set, else auto_workers()
    prefetch_factor: int = 4  # batches each worker keeps ready (with workers > 0)
    val_fraction: float = 0.1  # held-out part of the training split, for tuning; never the test set
    recipe: str = "auto"  # auto: the dataset's own | cifar: 32 px recipe for a folder of small images | imagenet
    cache: str = "auto"  # folders with recipe=cifar: auto (decode once into memory when small) | always | never
    train_subset: int | None = None  # use only N seeded images of the training split (val cut from them); None: all
    verify_checksums: bool = True  # refuse dataset files whose md5 differs from the official release
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self):
        if self.workers is None:
            self.workers = 0 if self.dataset == "synthetic" else auto_workers()


def auto_workers() -> int:
    """Decoding and augmenting on every usable core but one (at most 8) keeps a GPU fed without
    starving the main process; DDP launchers should divide this by the processes per machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


@dataclass
class OptimConfig:
    epochs: int = 240
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    lr_decay: float = 0.1
    schedule: str = "step"  # step | cosine


@dataclass
class TeacherConfig:
    arch: str = "resnet32x4"
    checkpoint: str | None = None  # import instead of training
    source: str = "auto"  # auto: import `checkpoint` if given, else train | import: a checkpoint is required | train
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class StudentConfig:
    arch: str = "resnet8x4"
    method: str = "kd"
    method_args: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class TrainingConfig:
    """How the training stages run: scale-out, speed, resume and logging (see README "Training at scale").

    Only ``amp`` and ``sync_bn`` change the trained weights beyond float noise, so only they enter the
    stage fingerprints; the rest (like the device and the number of processes) are execution details.
    """

    amp: str = "none"  # none | bf16 | fp16 (fp16 uses a GradScaler; both need a GPU to pay off)
    channels_last: bool = False
    compile: bool = False  # torch.compile the student and the teacher
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA only)
    cudnn_benchmark: bool | None = None  # None: on unless ``deterministic``
    deterministic: bool = False  # deterministic GPU kernels (slower); CPU training is deterministic anyway
    checkpoint_every: int = 1000  # also save resume state every N steps (0: only at the end of each epoch)
    find_unused_parameters: bool = False  # DDP: for methods whose modules skip some steps
    tensorboard: bool = True  # event files in <run>/tensorboard/<stage>/
    log_every: int = 20  # steps between TensorBoard loss points


@dataclass
class VerifyConfig:
    samples: int = 512  # size of the fixed verification set (taken from the test split)


@dataclass
class ExportConfig:
    checkpoint: str | None = None  # export this student instead of the run's fused one
    opset: int = 18
    dynamo: bool = True
    precisions: list[str] = field(default_factory=lambda: ["fp32", "fp16", "int8"])  # fp32 is always made
    golden_samples: int = 8
    parity_samples: int = 64
    eval_samples: int | None = None  # images of the test split for the fp16/int8 gates; None: all of it
    calibration_samples: int = 512  # training-split images for INT8 calibration and the fp16 guard
    calibration_method: str = "percentile"  # percentile | minmax | entropy (ONNX Runtime calibrators)
    calibration_cache: str | None = None  # folder of keyed calibration caches; None: <run>/.cache/calibration
    int8_target: str = "tensorrt"  # tensorrt: symmetric Q/DQ TensorRT builds; cpu: ONNX Runtime CPU (U8S8)
    fp16_guard: bool = True  # keep nodes whose activations leave the fp16-safe range in fp32
    fp16_safe_max: float = 16384.0  # |activation| above this on calibration data keeps the node in fp32


@dataclass
class EngineConfig:
    precision: str = "fp32"  # which exported ONNX to build: fp32 | fp16 | int8
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mib: int = 1024
    timing_cache: str | None = None  # None: <run>/.cache/tensorrt/timing.cache


@dataclass
class Config:
    name: str = "default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    expected: dict[str, Any] = field(default_factory=dict)  # reference results (e.g. the paper's table)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def expected_top1(self, row: str | None = None) -> float | None:
        """A reference figure from ``expected.top1`` (a table row -> top-1 %): ``row``, or by default the
        row named by ``expected.method``, the one this config's student method should reproduce."""
        table = self.expected.get("top1")
        row = row or self.expected.get("method")
        value = table.get(row) if isinstance(table, dict) and row else None
        return float(value) if isinstance(value, int | float) else None


def list_presets() -> list[str]:
    folder = resources.files("pipeline") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_data(name: str) -> dict:
    path = resources.files("pipeline") / "presets" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
    return _read_yaml(path.read_text(), f"preset {name}") or {}


def load_config(
    preset: str | None = "default",
    file: str | Path | None = None,
    overrides: list[str] = (),
    log: Callable[[str], None] | None = None,
) -> Config:
    """Resolve a config; ``log`` receives notes such as method options dropped by a method switch."""
    layers: list[dict] = []
    if preset:
        layers.append(preset_data(preset))
    if file is not None:
        path = Path(file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        content = _read_yaml(text, str(path)) or {}
        if not isinstance(content, dict):
            raise ConfigError(f"config file {path} must hold a mapping of options")
        layers.append(content)
    data: dict = {}
    written_for: dict[str, str] = {}  # method_args key -> the method in effect where the preset or file set it
    for layer in layers:
        data = _merge(data, layer)
        method = _student(data).get("method", StudentConfig.method)
        written_for |= {key: method for key in _student(layer).get("method_args") or {}}
    explicit: set[str] = set()
    for item in overrides:
        override = parse_override(item)
        explicit |= set(_student(override).get("method_args") or {})
        data = _merge(data, override)
    cfg = from_dict(Config, data)
    foreign = {k for k in cfg.student.method_args if k not in explicit and written_for.get(k) != cfg.student.method}
    if foreign:
        _drop_foreign_method_args(cfg.student, foreign, log)
    return cfg


def _student(data: dict) -> dict:
    student = data.get("student") if isinstance(data, dict) else None
    return student if isinstance(student, dict) else {}


def _drop_foreign_method_args(student: StudentConfig, candidates: set[str], log: Callable[[str], None] | None) -> None:
    """Drop ``method_args`` a preset or file wrote for another method, when the chosen method lacks them.

    A preset tunes the method it names (the default sets KDiffusion's warm-up), so switching to ``kd`` must
    not fail on those options; options given as overrides are the user's own and are kept (and checked).
    """
    from pipeline.distill import method_options

    try:
        accepted = method_options(student.method)
    except ConfigError:
        return  # an unknown method is reported, with the valid names, when the run is validated
    dropped = sorted(k for k in candidates if k not in accepted)
    if dropped:
        student.method_args = {k: v for k, v in student.method_args.items() if k not in dropped}
        if log:
            log(f"note: method {student.method!r} has no option {', '.join(dropped)} (set for another method); ignored")


def parse_override(item: str) -> dict:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}``, the value parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    value = _read_yaml(raw, f"override {item!r}") if raw.strip() else None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def from_dict(cls: type, data: dict | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {where + unknown[0]!r}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {name: _coerce(hints[name], value, f"{where}{name}") for name, value in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {hint}")


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and value:
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(text: str, where: str) -> Any:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None
    return data
