"""The experiment: typed defaults, YAML presets and files, and ``key=value`` overrides.

A config is resolved in this order: the dataclass defaults, the preset, the ``--config`` file, then
command-line overrides. Unknown keys and wrong types are errors naming the key, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipeline.artifacts import machine
from pipeline.errors import ConfigError, short_path
from pipeline.precision_order import PRECISION_ORDER, REFERENCE_PRECISION


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
    split_seed: int | None = None  # seeds the val split and train_subset; None: the run's seed
    verify_checksums: bool = True  # refuse dataset files whose md5 differs from the official release
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self):
        if self.workers is None:
            self.workers = 0 if self.dataset == "synthetic" else auto_workers()


def auto_workers() -> int:
    """Decoding and augmenting on every usable core but one (at most 8) keeps a GPU fed without
    starving the main process; DDP launchers should divide this by the processes per machine."""
    return max(1, min(8, machine.usable_cpus() - 1))


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
    """How the training stages run: scale-out, speed, resume and logging (see docs/training.md).

    Only ``amp``, ``sync_bn`` and ``device_data`` (other augmentation draws) change the trained weights
    beyond float noise, so only they enter the stage fingerprints; the rest (like the device and the number
    of processes) are execution details. ``auto`` (see :func:`pipeline.training.speed.resolve`) is decided by
    the run's device and processor, and ``amp=auto`` enters the fingerprints as what it became.
    """

    # none | bf16 | fp16 (GradScaler; CUDA only) | auto: bf16 on a CPU where it beats fp32 (AMX, AVX512-BF16 on AMD)
    amp: str = "none"
    channels_last: bool | str = "auto"  # true | false | auto: true on a CPU, false (as before) on a GPU
    compile: bool = False  # torch.compile the student and the teacher
    # true | false | auto: the teacher of KD and DKD (logits only) as a graph optimized for inference; auto: on a
    # CPU in fp32 without compile (pipeline.models.inference_graph)
    teacher_graph: bool | str = "auto"
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA only)
    cudnn_benchmark: bool | None = None  # None: on unless ``deterministic``
    deterministic: bool = False  # deterministic GPU kernels (slower); CPU training is deterministic anyway
    checkpoint_every: int = 1000  # also save resume state every N steps (0: only at the end of each epoch)
    find_unused_parameters: bool = False  # DDP: for methods whose modules skip some steps
    tensorboard: bool = True  # event files in <run>/tensorboard/<stage>/
    log_every: int = 20  # steps between TensorBoard loss points
    test_each_epoch: bool = True  # score the test split after every student epoch (for `compare --best`)
    val_every: int = 1  # score the val split every N epochs and after the last (the plateau check reads each one)
    # GPU step overhead (docs/bench-training.md, "Step overhead"); all off by default:
    device_data: bool = False  # training split on the device, crop/flip/normalize there (synthetic, cifar100)
    defer_metrics: bool = False  # read losses (and check them for NaN) every log_every steps, not every step
    optimizer_impl: str = "auto"  # SGD kernels: auto (torch's choice) | for_loop | foreach | fused
    cuda_graphs: bool = False  # CUDA only: torch.compile(mode="reduce-overhead") of the distiller's step


@dataclass
class VerifyConfig:
    samples: int = 512  # size of the fixed verification set (taken from the test split)


@dataclass
class ExportConfig:
    checkpoint: str | None = None  # export this student instead of the run's fused one
    opset: int = 18
    dynamo: bool = True
    precisions: list[str] = field(default_factory=lambda: list(PRECISION_ORDER))  # the reference is always made
    golden_samples: int = 8
    parity_samples: int = 64
    eval_samples: int | None = None  # images of the test split for the fp16/int8 gates; None: all of it
    calibration_samples: int = 512  # training-split images for INT8 calibration and the fp16 guard
    calibration_method: str = "percentile"  # percentile | minmax | entropy (ONNX Runtime calibrators)
    calibration_cache: str | None = None  # folder of keyed calibration caches; None: <run>/.cache/calibration
    int8_target: str = "tensorrt"  # tensorrt: symmetric Q/DQ TensorRT builds; cpu: ONNX Runtime CPU (U8S8)
    fp16_guard: bool = True  # keep nodes whose activations leave the fp16-safe range in fp32
    fp16_safe_max: float = 16384.0  # |activation| above this on calibration data keeps the node in fp32
    # without CUDA, also time a cpu-target INT8 model (not kept) beside a TensorRT-target one, which ORT runs unfused
    cpu_int8_latency: bool = True
    latency_runs: int = 20  # timed ONNX Runtime passes per model (batch 1; the report gives median and p90)
    latency_warmup: int = 3  # untimed passes before them


@dataclass
class EngineConfig:
    precision: str = REFERENCE_PRECISION  # which exported ONNX to build: fp32 | fp16 | int8
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


def check_preset_name(name: str, what: str = "--preset") -> None:
    """An empty name is a mistake, not a request for the default preset (``--preset "$PRESET"`` unset)."""
    if not name.strip():
        raise ConfigError(f"{what} is empty; give a name that `presets` lists, or leave it out")


def preset_text(name: str) -> str:
    """A preset's YAML as shipped, comments (what it is for, how long it takes) included."""
    # Looked up by name, never joined onto a path: `--preset ../../x` must not read a file outside the presets.
    check_preset_name(name)
    if name not in list_presets():
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise ConfigError(f"unknown preset {shown!r}; choose one of: {', '.join(list_presets())}")
    return (resources.files("pipeline") / "presets" / f"{name}.yaml").read_text()


def preset_data(name: str) -> dict:
    return _read_yaml(preset_text(name), f"preset {name}") or {}


def load_config(
    preset: str | None = "default",
    file: str | Path | None = None,
    overrides: list[str] = (),
    log: Callable[[str], None] | None = None,
) -> Config:
    """Resolve a config; ``log`` receives notes such as method options dropped by a method switch."""
    layers = [layer for _, layer in _layers(preset, file)]
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
    check_paths(cfg)
    foreign = {k for k in cfg.student.method_args if k not in explicit and written_for.get(k) != cfg.student.method}
    if foreign:
        _drop_foreign_method_args(cfg.student, foreign, log)
    return cfg


def _layers(preset: str | None, file: str | Path | None) -> list[tuple[str, dict]]:
    """The preset's and the file's options, each with the name :func:`value_origins` gives it."""
    layers: list[tuple[str, dict]] = []
    if preset is not None:
        layers.append((f"preset {preset}", preset_data(preset)))
    if file is not None:
        path = Path(file)
        content = _read_yaml(read_config_text(path), str(path))
        if not isinstance(content, dict) or not content:
            raise ConfigError(f"config file {path} must hold a non-empty mapping of options")
        layers.append((f"--config {path}", content))
    return layers


def value_origins(
    cfg: Config,
    preset: str | None,
    file: str | Path | None,
    overrides: list[str] = (),
    labels: list[str] | None = None,
) -> dict[str, str]:
    """Where each value of ``cfg`` (resolved from these arguments) came from, by dotted key: ``default``,
    ``preset NAME``, ``--config PATH``, or the override's label (``--set``, or the option that wrote it).

    The last layer that wrote a key, or a section above it as a whole (a list, an empty mapping), wins, as
    in :func:`load_config`; a list is one value.
    """
    layers = _layers(preset, file)
    layers += [(label, parse_override(item)) for item, label in zip(overrides, labels or ["--set"] * len(overrides))]
    written = [(label, set(_leaves(layer))) for label, layer in layers]
    origins = {}
    for key in _leaves(cfg.to_dict()):
        above = {".".join(key.split(".")[:i]) for i in range(1, key.count(".") + 2)}
        origins[key] = next((label for label, keys in reversed(written) if keys & above), "default")
    return origins


def leaf_items(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{dotted key: value}``; a non-empty mapping is a section, anything else a value."""
    items: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            items.update(leaf_items(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def _leaves(data: dict, prefix: str = "") -> list[str]:
    return list(leaf_items(data, prefix))


def annotated_yaml(data: dict, origins: dict[str, str], prefix: str = "") -> list[str]:
    """``data`` as block YAML, each value followed by ``# where it came from``: still YAML, and read at a glance."""
    rows = _annotated_rows(data, origins, prefix, "")
    width = min(48, max((len(text) for text, origin in rows if origin is not None), default=0))
    return [text if origin is None else f"{text.ljust(width)}  # {origin}" for text, origin in rows]


def _annotated_rows(data: dict, origins: dict[str, str], prefix: str, indent: str) -> list[tuple[str, str | None]]:
    rows: list[tuple[str, str | None]] = []
    for key, value in data.items():
        name = _flow(key)
        if isinstance(value, dict) and value:
            rows.append((f"{indent}{name}:", None))
            rows += _annotated_rows(value, origins, f"{prefix}{key}.", indent + "  ")
        else:
            rows.append((f"{indent}{name}: {_flow(value)}", origins.get(f"{prefix}{key}", "default")))
    return rows


def _flow(value: Any) -> str:
    """One value as one line of YAML (flow style, quoted where needed)."""
    return yaml.safe_dump([value], default_flow_style=True, width=1 << 20).strip()[1:-1]


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
        if value is None or value == {}:
            # A null or empty section would silently fall back to the built-in defaults (a 240-epoch recipe).
            raise ConfigError(f"{key} is {'null' if value is None else 'empty'}; give its settings or leave it out")
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
        value = _finite_float(value, key)
    if hint in (int, float, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            if hint is float and not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            if hint is int and abs(value) > MAX_INT:
                raise ConfigError(f"{key} is out of range (at most {MAX_INT} in magnitude), got {_short(value)}")
            return value
        raise ConfigError(f"{key} must be {hint.__name__}, got {_short(value)}")
    raise ConfigError(f"{key}: unsupported type {hint}")


def _finite_float(value: int, key: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ConfigError(f"{key} is out of range, got {_short(value)}") from None


def _short(value: Any) -> str:
    """``repr`` cut to a readable length: an error about a 5,000-digit number is still one short line."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and value:
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


MAX_INT = 2**63 - 1  # every integer setting must fit the int64 that torch and numpy hold it in
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; this bounds what a hostile file can make the parser do
MAX_DEPTH = 32  # nesting of mappings and lists
MAX_VALUES = 100_000  # values once YAML aliases are expanded (a "billion laughs" file expands to 10**9)
_MAX_PATH = 4096
_MAX_NAME = 255


class _LimitExceeded(Exception):
    """A YAML document deeper or larger than any config needs."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only), refusing documents nested deeper than :data:`MAX_DEPTH` while
    they are composed, before the recursion could exhaust the stack."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _LimitExceeded(f"is nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_config_text(path: Path) -> str:
    """A config file's text: at most :data:`MAX_CONFIG_BYTES` of UTF-8."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {short_path(path)}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB; is it a config?")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def _read_yaml(text: str, where: str) -> Any:
    """Plain YAML data with string keys, bounded in size, depth and alias expansion."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{_short(where)} is larger than {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        data = yaml.load(text, Loader=_BoundedLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{_short(where)} is not valid YAML: {' '.join(str(exc).split())}") from None
    except _LimitExceeded as exc:
        raise ConfigError(f"{_short(where)} {exc}") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer longer than Python's 4300-digit limit
        raise ConfigError(f"{_short(where)} holds a value YAML cannot convert ({str(exc)[:80]})") from None
    _check_plain(data, _short(where))
    return data


def _check_plain(data: Any, where: str) -> None:
    """Option names are strings, and aliases expand to a bounded amount of data (they are shared, not copied,
    until the config is merged and hashed, where a billion-laughs file would exhaust memory)."""
    budget = MAX_VALUES

    def walk(node: Any, depth: int) -> None:
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise ConfigError(f"{where} expands to more than {MAX_VALUES} values (YAML aliases?); refusing it")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where} is nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    raise ConfigError(f"{where} has the key {_short(key)}; option names must be strings")
                walk(value, depth + 1)
        elif isinstance(node, list):
            for value in node:
                walk(value, depth + 1)

    walk(data, 0)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def check_paths(cfg: Config) -> None:
    """A run name is one plain folder name, and a path setting is either unset or a usable path.

    The name becomes ``runs/<name>``, so an absolute name or one with ``..`` would write a run anywhere; an
    empty path is refused instead of read as "not given" (``--teacher-checkpoint ''`` must not train a teacher).
    """
    if not _NAME.fullmatch(cfg.name) or len(cfg.name) > _MAX_NAME:
        raise ConfigError(
            f"name {_short(cfg.name)} must be a plain folder name (letters, digits, '.', '_', '+', '-'; "
            "no '/' or '..'); choose where the run goes with --out"
        )
    for key, value in (
        ("data.root", cfg.data.root),
        ("teacher.checkpoint", cfg.teacher.checkpoint),
        ("export.checkpoint", cfg.export.checkpoint),
        ("export.calibration_cache", cfg.export.calibration_cache),
        ("engine.timing_cache", cfg.engine.timing_cache),
    ):
        if value is not None:
            check_path(value, key)


def check_path(value: str, what: str, text: bool = False) -> None:
    """Refuse an empty path, a NUL byte, or a path the operating system would call too long; with ``text``, one
    that is not UTF-8 (a run folder's path is written as text: TensorBoard's event files, the logs)."""
    if not value.strip():
        raise ConfigError(f"{what} is empty; give a path or leave it out")
    if "\0" in value:
        raise ConfigError(f"{what} contains a NUL byte")
    if text and not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ConfigError(
                f"{what} {value!a} is not valid UTF-8, which the run's logs and TensorBoard need; choose a UTF-8 name"
            ) from None
    if len(value.encode(errors="surrogateescape")) > _MAX_PATH or any(
        len(part.encode(errors="surrogateescape")) > _MAX_NAME for part in Path(value).parts
    ):
        raise ConfigError(f"{what} is too long for a file path: {short_path(value)}")
