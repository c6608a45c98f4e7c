import pytest

from fedsim.registry import Registry, UnknownNameError


def test_register_get_and_list_sorted():
    reg: Registry[int] = Registry("widget")
    reg.register("b")(2)
    reg.register("a")(1)
    assert reg.get("a") == 1 and reg.get("b") == 2
    assert reg.names() == ["a", "b"] and "a" in reg and list(reg) == ["a", "b"]


def test_duplicate_is_an_error():
    reg: Registry[int] = Registry("widget")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(2)


def test_unknown_name_lists_choices():
    reg: Registry[int] = Registry("widget")
    reg.register("x")(1)
    reg.register("y")(2)
    with pytest.raises(UnknownNameError) as err:
        reg.get("z")
    assert str(err.value) == "unknown widget 'z'; valid choices: x, y"
    assert isinstance(err.value, ValueError)
