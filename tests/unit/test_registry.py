import pytest

from weighted_mtp.errors import UnknownComponentError
from weighted_mtp.registry import Registry


def test_registered_component_is_returned_and_listed():
    registry: Registry = Registry("widget", "weighted_mtp.errors")

    @registry.register("square")
    def square(x):
        return x * x

    assert registry.get("square") is square
    assert registry.names() == ["square"]
    assert "square" in registry and "cube" not in registry


def test_unknown_name_lists_registered_names_and_suggests_closest():
    registry: Registry = Registry("widget", "weighted_mtp.errors")
    registry.register("uniform")(object())
    registry.register("critic")(object())
    with pytest.raises(UnknownComponentError, match=r"unknown widget 'unifrom'; did you mean 'uniform'\? \(registered: critic, uniform\)"):
        registry.get("unifrom")


def test_same_name_twice_is_refused():
    registry: Registry = Registry("widget", "weighted_mtp.errors")
    registry.register("a")(1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a")(2)
