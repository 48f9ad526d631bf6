import pytest

from pipeline.config import Config, list_presets, load_config, parse_override
from pipeline.errors import ConfigError


def test_default_preset_loads():
    cfg = load_config("default")
    assert isinstance(cfg, Config)
    assert cfg.data.dataset == "synthetic"
    assert "default" in list_presets()


def test_override_parses_yaml_values():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=[1, 2]") == {"a": [1, 2]}
    assert parse_override("a.b=") == {"a": {"b": None}}
    cfg = load_config("default", None, ["student.optim.epochs=7", "student.optim.lr=1", "data.root=/x"])
    assert cfg.student.optim.epochs == 7
    assert cfg.student.optim.lr == 1.0 and isinstance(cfg.student.optim.lr, float)
    assert cfg.data.root == "/x"


@pytest.mark.parametrize(
    "override, message",
    [
        ("student.optim.epoch=3", "unknown config key 'student.optim.epoch'"),
        ("student.optim.epochs=three", "student.optim.epochs must be int"),
        ("student.optim.milestones=5", "must be a list"),
        ("nokey", "not of the form"),
        ("seed=true", "seed must be int"),
        ("student=[1,2]", r"^student must be a mapping, got \[1, 2\]$"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", None, [override])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; choose one of: .*default"):
        load_config("nope")


def test_config_file_merges_over_preset(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("student:\n  optim:\n    epochs: 3\n")
    cfg = load_config("default", path)
    assert cfg.student.optim.epochs == 3
    assert cfg.student.arch == load_config("default").student.arch
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a non-empty mapping"):
        load_config("default", path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config("default", tmp_path / "missing.yaml")
