"""``run --dry-run``: the resolved configuration and, per stage, whether it would run and why; nothing is written."""

from __future__ import annotations

import yaml

from pipeline.cli import run_cli
from pipeline.cli.runner import UP_TO_DATE
from pipeline.config import load_config
from stages import stage_order
from tests.conftest import TINY

SETS = [a for item in TINY for a in ("--set", item)]
MISSING = "missing: no previous run in this folder"


def _plan(out: str) -> dict[str, str]:
    lines = [line[4:].split(None, 1) for line in out.splitlines() if line.startswith("#   ")]
    return {name: what for name, what in lines}


def test_dry_run_prints_the_config_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["run", "--dry-run", "--out", str(out), *SETS]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed) == load_config("default", None, TINY).to_dict()
    assert printed.startswith("# resolved configuration: the defaults < preset default < --set and options\n")
    assert _plan(printed) == {name: f"runs ({MISSING})" for name in stage_order()}
    assert not out.exists()


def test_dry_run_gives_the_runners_reasons(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["run", "teacher", "--out", str(out), *SETS]) == 0
    manifest = (out / "teacher" / "manifest.json").read_bytes()
    capsys.readouterr()
    assert run_cli(["run", "teacher", "train", "fuse", "--dry-run", "--out", str(out), *SETS]) == 0
    assert _plan(capsys.readouterr().out) == {
        "teacher": UP_TO_DATE,
        "train": f"runs ({MISSING})",
        "fuse": f"runs ({MISSING})",
    }
    lr = ["--set", "teacher.optim.lr=0.2"]
    assert run_cli(["run", "teacher", "train", "--dry-run", "--out", str(out), *SETS, *lr]) == 0
    old_lr = load_config("default", None, TINY).teacher.optim.lr
    assert _plan(capsys.readouterr().out) == {
        "teacher": f"runs (params_changed: optim.lr: {old_lr} -> 0.2)",  # which of its settings changed
        "train": f"runs ({MISSING})",
    }
    assert run_cli(["run", "teacher", "--dry-run", "--force", "--out", str(out), *SETS]) == 0
    assert _plan(capsys.readouterr().out) == {"teacher": "runs (forced: --force)"}
    assert (out / "teacher" / "manifest.json").read_bytes() == manifest
    assert not (out / "train").exists()


def test_dry_run_fails_where_the_run_would(tmp_path, capsys):
    """A missing upstream the run reads but does not make is the same one-line error, before anything runs."""
    assert run_cli(["run", "fuse", "--dry-run", "--out", str(tmp_path / "run")]) == 2
    assert "stage 'train' has no artifacts" in capsys.readouterr().err


def test_a_config_file_is_laid_on_the_defaults_not_on_the_default_preset(tmp_path, capsys):
    """A config file is a whole experiment: without --preset it does not inherit the default preset's small
    synthetic run; `--preset default --config FILE` layers the file on that preset on purpose."""
    from pipeline.config import Config

    path = tmp_path / "exp.yaml"
    path.write_text("name: mine\nstudent: {method: kd}\n")
    out = ["--out", str(tmp_path / "run")]
    assert run_cli(["run", "--dry-run", "--config", str(path), *out]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"# resolved configuration: the defaults < --config {path}\n")
    assert yaml.safe_load(printed)["teacher"]["arch"] == Config().teacher.arch
    assert run_cli(["run", "--dry-run", "--preset", "default", "--config", str(path), *out]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"# resolved configuration: the defaults < preset default < --config {path}\n")
    assert yaml.safe_load(printed)["teacher"]["arch"] == load_config("default").teacher.arch


def _origins(printed: str) -> dict[str, str]:
    """``{dotted key: origin}`` from the dry run's ``key: value  # origin`` lines."""
    origins, path = {}, []
    for line in printed.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        key, _, rest = line.strip().partition(":")
        path[depth:] = [key]
        if "  # " in rest:
            origins[".".join(path)] = rest.rsplit("  # ", 1)[1]
    return origins


def _keys(data: dict, prefix: str = "") -> list[str]:
    return [
        key
        for name, value in data.items()
        for key in (_keys(value, f"{prefix}{name}.") if isinstance(value, dict) and value else [prefix + name])
    ]


def test_dry_run_names_where_each_value_came_from(tmp_path, capsys):
    """One value from each layer: the typed defaults, the preset, the config file, --set and a shortcut option;
    the listing is still the resolved configuration as YAML, and the run folder is not made."""
    path = tmp_path / "exp.yaml"
    path.write_text("student:\n  optim: {lr: 0.02}\n")
    out = tmp_path / "run"
    args = ["--preset", "default", "--config", str(path), "--set", "data.image_size=16", "--seed", "3"]
    assert run_cli(["run", "all", "--dry-run", "--out", str(out), *args]) == 0
    printed = capsys.readouterr().out
    origins = _origins(printed)
    assert origins["training.amp"] == "preset default"
    assert origins["training.compile"] == "default"
    assert origins["teacher.arch"] == "preset default"
    assert origins["student.optim.lr"] == f"--config {path}"
    assert origins["data.image_size"] == "--set"
    assert origins["seed"] == "--seed"
    resolved = load_config("default", path, ["data.image_size=16", "seed=3"])
    assert yaml.safe_load(printed) == resolved.to_dict()
    assert set(origins) == set(_keys(resolved.to_dict()))  # every value has its origin
    assert not out.exists()


def test_a_changed_setting_is_named_even_when_added_or_dropped():
    from pipeline.cli.runner import _changes

    old, new = {"optim": {"lr": 0.1, "warmup": 1}, "seed": 0}, {"optim": {"lr": 0.2, "nesterov": True}, "seed": 0}
    assert _changes(old, new) == [
        "optim.lr: 0.1 -> 0.2",
        "optim.nesterov: (absent) -> true",
        "optim.warmup: 1 -> (absent)",
    ]
