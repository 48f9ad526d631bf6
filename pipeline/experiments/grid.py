"""Expanding a sweep: presets or a config, x methods, x seeds, x ``--set`` axes, into run folders.

Each cell is an ordinary ``python -m pipeline run all`` into ``<sweep>/cells/<name>``. A teacher that
several cells need is trained once, as its own run (``<sweep>/teachers/<key>``, the ``teacher``
stage only), and every cell imports that file with ``--teacher-checkpoint``: the cell's teacher stage
hashes it into its fingerprint, so cells share the teacher by hash, never by copy. The grid is kept
in ``<sweep>/sweep.json``, which ``compare`` and ``report`` read.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.artifacts.atomic import atomic_write_text
from pipeline.artifacts.hashing import sha256_json
from pipeline.config import Config, load_config
from pipeline.errors import ConfigError
from pipeline.stage_files import TEACHER_CHECKPOINT

SWEEP_FILE = "sweep.json"
CELLS = "cells"
TEACHERS = "teachers"
TEACHER_FILE = f"teacher/{TEACHER_CHECKPOINT}"  # inside a teacher run: the teacher stage's checkpoint
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclass(frozen=True)
class TeacherRun:
    """A teacher trained once for every cell whose teacher settings hash to ``key``."""

    key: str
    args: tuple[str, ...]  # `python -m pipeline` arguments, without --out

    def folder(self, root: Path) -> Path:
        return root / TEACHERS / self.key

    def checkpoint(self, root: Path) -> Path:
        return self.folder(root) / TEACHER_FILE


@dataclass(frozen=True)
class Cell:
    """One run of the grid: where it goes, how it is started, and the labels that place it in a table."""

    name: str
    args: tuple[str, ...]  # `python -m pipeline` arguments, without --out
    labels: dict = field(default_factory=dict, hash=False)  # preset, method, seed and the --set axis values
    teacher: str | None = None  # key of the TeacherRun it imports; None: it imports the user's checkpoint

    def folder(self, root: Path) -> Path:
        return root / CELLS / self.name


@dataclass
class Sweep:
    root: Path
    cells: list[Cell]
    teachers: list[TeacherRun]

    def teacher(self, key: str) -> TeacherRun:
        return next(t for t in self.teachers if t.key == key)

    def to_dict(self) -> dict:
        return {
            "version": 1,
            "teachers": [{"key": t.key, "folder": f"{TEACHERS}/{t.key}", "args": list(t.args)} for t in self.teachers],
            "cells": [
                {
                    "name": c.name,
                    "folder": f"{CELLS}/{c.name}",
                    "args": list(c.args),
                    "labels": c.labels,
                    "teacher": c.teacher,
                }
                for c in self.cells
            ],
        }

    def write(self) -> Path:
        """Record the grid; a rerun with more cells (another seed) adds to the cells already recorded."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / SWEEP_FILE
        if path.is_file():
            old = read_sweep(self.root)
            names = {c.name for c in self.cells}
            keys = {t.key for t in self.teachers}
            merged = Sweep(
                self.root,
                [c for c in old.cells if c.name not in names] + self.cells,
                [t for t in old.teachers if t.key not in keys] + self.teachers,
            )
        else:
            merged = self
        return atomic_write_text(path, json.dumps(merged.to_dict(), indent=2) + "\n")


def read_sweep(root: str | Path) -> Sweep:
    root = Path(root)
    path = root / SWEEP_FILE
    try:
        data = json.loads(path.read_text())
        teachers = [TeacherRun(_folder_name(t["key"]), _strings(t["args"])) for t in _records(data, "teachers")]
        keys = {t.key for t in teachers}
        cells = []
        for c in _records(data, "cells"):
            labels, teacher = c.get("labels", {}), c.get("teacher")
            if not isinstance(labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str | int | float | bool) for k, v in labels.items()
            ):
                raise ValueError(f"the labels of cell {c.get('name')!r} are not a mapping of names to values")
            if teacher is not None and teacher not in keys:
                raise ValueError(f"cell {c.get('name')!r} names a teacher the record does not list")
            cells.append(Cell(_folder_name(c["name"]), _strings(c["args"]), labels, teacher))
        return Sweep(root, cells, teachers)
    except FileNotFoundError:
        raise ConfigError(f"{root} is not a sweep folder (no {SWEEP_FILE})") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a readable sweep record ({exc})") from None


def _records(data: object, key: str) -> list[dict]:
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ValueError(f"{key!r} is not a list of records")
    return items


def _strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{value!r} is not a list of arguments")
    return tuple(value)


def _folder_name(name: object) -> str:
    """The names become folders: an edited record must not point a reader or a rerun outside the sweep."""
    if not isinstance(name, str) or _UNSAFE.search(name) or name in ("", ".", ".."):
        raise ValueError(f"{name!r} is not a plain folder name")
    return name


def is_sweep(path: str | Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def split_values(raw: str) -> list[str]:
    """``a,b,[1,2]`` -> ``['a', 'b', '[1,2]']``: commas outside brackets, braces and quotes separate values."""
    values, depth, quote, current = [], 0, "", ""
    for char in raw:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += char
    values.append(current)
    return values


def parse_axes(sets: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Split ``--set`` items into fixed overrides and axes (``key=v1,v2``: one cell per value)."""
    fixed, axes = [], []
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value (or key.sub=v1,v2 for an axis)")
        values = split_values(raw)
        if len(values) > 1:
            if any(not v.strip() for v in values):
                raise ConfigError(f"axis {item!r} has an empty value")
            axes.append((key.strip(), values))
        else:
            fixed.append(item)
    return fixed, axes


def split_list(items: tuple[str, ...] | list[str]) -> list[str]:
    """Options given several times or as comma lists (``--method kd,dkd --method vanilla``), in order, once each."""
    out: list[str] = []
    for item in items:
        for value in item.split(","):
            value = value.strip()
            if value and value not in out:
                out.append(value)
    return out


def teacher_key(cfg: Config) -> str:
    """Everything that can change a trained teacher (wider than the teacher stage's params is safe:
    at worst two cells train two equal teachers)."""
    data = dataclasses.asdict(cfg.data)
    for key in ("workers", "prefetch_factor", "eval_batch_size"):
        data.pop(key)
    teacher = dataclasses.asdict(cfg.teacher)
    teacher.pop("checkpoint")
    teacher.pop("source")
    return sha256_json(
        {"teacher": teacher, "data": data, "training": dataclasses.asdict(cfg.training), "seed": cfg.seed}
    )[:12]


def expand_grid(
    root: str | Path,
    presets: list[str],
    config: Path | None,
    methods: list[str],
    seeds: list[int],
    sets: list[str],
    teacher_seed: int | None = None,
    check: Callable[[Config], None] | None = None,
) -> Sweep:
    """The sweep's cells and the teachers they share; every cell's config is resolved (and so checked) here,
    and given to ``check`` (the runner's validation), so that a bad value stops the sweep before any task starts."""
    from pipeline.distill.catalog import method_names

    root = Path(root)
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}; choose from: {', '.join(method_names())}")
    fixed, axes = parse_axes(sets)
    config = config.resolve() if config else None
    cells: list[Cell] = []
    teachers: dict[str, TeacherRun] = {}
    for preset in presets or [None if config else "default"]:
        source = ["--preset", preset] if preset else []
        source += ["--config", str(config)] if config else []
        label = preset or (config.stem if config else "default")

        def resolve(overrides: list[str], preset=preset) -> Config:
            return load_config(preset or ("default" if config is None else None), config, overrides)

        for combo in itertools.product(*[[(key, v) for v in values] for key, values in axes]):
            cell_sets = fixed + [f"{key}={value}" for key, value in combo]
            set_args = [a for s in cell_sets for a in ("--set", s)]
            base = resolve(cell_sets)
            # One teacher for every method and seed of this combination: trained with --teacher-seed, else the
            # first seed of the grid, else the config's seed.
            tseed = teacher_seed if teacher_seed is not None else seeds[0] if seeds else base.seed
            # Seed-major: a sweep cut short has every method's first seeds, not every seed of the first methods.
            for seed in seeds or [base.seed]:
                for method in methods or [base.student.method]:
                    cfg = resolve([*cell_sets, f"student.method={method}", f"seed={seed}"])
                    if check is not None:
                        check(cfg)
                    args = [*source, *set_args, "--method", method, "--seed", str(seed)]
                    key = None
                    if cfg.teacher.source == "import" and not cfg.teacher.checkpoint:
                        raise ConfigError(
                            f"{label!r} imports its {cfg.teacher.arch} teacher: pass --teacher-checkpoint FILE, "
                            "or train it once for every cell with --set teacher.source=train"
                        )
                    if not cfg.teacher.checkpoint:
                        teacher_cfg = resolve([*cell_sets, f"seed={tseed}"])
                        if check is not None:
                            check(teacher_cfg)
                        key = teacher_key(teacher_cfg)
                        targs = ("run", "teacher", *source, *set_args, "--seed", str(tseed))
                        teachers.setdefault(key, TeacherRun(key, targs))
                        args += ["--teacher-checkpoint", str(teachers[key].checkpoint(root).resolve())]
                        args += ["--set", "teacher.source=import"]
                    name = "-".join([label, method, f"seed{seed}", *(_safe(f"{k}={v}") for k, v in combo)])
                    labels = {"preset": label, "method": method, "seed": seed, **{k: v for k, v in combo}}
                    cells.append(Cell(name, ("run", "all", *args), labels, key))
    names = [c.name for c in cells]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"the grid names two cells {duplicates[0]!r}; give each axis distinct values")
    return Sweep(root, cells, list(teachers.values()))


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text)[:80]
