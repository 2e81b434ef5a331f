"""The one registry behind losses, advantages, rewards, judges, loaders and attacks."""

import pytest

from cada_jax.registry import Registry


def test_register_get_names_and_errors():
    reg = Registry("widget", decorator="register_widget")

    @reg.register("b")
    def b():
        return "b"

    reg.register("a")(len)
    assert reg.names() == ["a", "b"] and reg.get("b") is b and "a" in reg
    reg.register("b")(b)  # the same function again: fine
    with pytest.raises(ValueError, match=r"register_widget: widget 'b' is already registered \(by .*\bb\); pick another name"):
        reg.register("b")(len)
    with pytest.raises(ValueError, match=r"unknown widget 'c'; available: a, b \(add one with @register_widget\)"):
        reg.get("c")
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("")
    with pytest.raises(TypeError, match=r"register_widget\('d'\) expects a callable"):
        reg.register("d")(3)
    reg.unregister("a")
    assert reg.names() == ["b"]


def test_error_class_wording_and_hint():
    class Missing(ValueError):
        pass

    reg = Registry("gadget", decorator="register_gadget", listed="registered gadgets", error=Missing, hint="see the docs")
    with pytest.raises(Missing, match=r"unknown gadget 'x'; registered gadgets: none \(see the docs\)"):
        reg.get("x")
