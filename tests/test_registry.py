import pytest

from pipeline.errors import ConfigError
from pipeline.registry import Registry


def test_register_with_and_without_name():
    reg: Registry = Registry("widget")

    @reg.register
    def alpha():
        return 1

    @reg.register(name="beta")
    def whatever():
        return 2

    assert reg.names() == ["alpha", "beta"]
    assert reg.get("beta") is whatever
    assert "alpha" in reg and len(reg) == 2


def test_duplicate_name_raises():
    reg: Registry = Registry("widget")
    reg.register(object(), name="x")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(object(), name="x")


def test_unknown_name_lists_choices():
    reg: Registry = Registry("widget")
    reg.register(object(), name="a")
    reg.register(object(), name="b")
    with pytest.raises(ConfigError, match=r"unknown widget 'c'; choose one of: a, b"):
        reg.get("c")
