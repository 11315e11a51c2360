"""The generic registry: names, aliases, one-line errors, option checks, descriptions."""
from dataclasses import dataclass

import pytest

from bioprop.registry import Registry, normalize_name


def make() -> Registry:
    reg: Registry = Registry("widget", allowed="allowed widgets", positional=1)

    @reg.register("big-one", aliases=("B1",), size="l")
    def big(n, *, width: int = 3, depth: int = 2):
        """A big widget.

        More text that is not the description."""
        return ("big", n, width, depth)

    @reg.register("plain", size="s")
    @dataclass
    class Plain:
        """A plain one."""
        colour: str = "red"

    reg.add("free", lambda *a, **k: (a, k), description="takes anything")
    return reg


def test_names_aliases_and_normalisation():
    reg = make()
    assert reg.names() == ["big_one", "plain", "free"]
    assert reg.names(size="s") == ["plain"]
    assert reg.resolve(" Big-One ") == "big_one" and reg.resolve("b1") == "big_one"
    assert "B1" in reg and "nope" not in reg and 3 not in reg
    assert list(reg) == ["big_one", "plain", "free"] and len(reg) == 3
    assert normalize_name(" A-b c") == "a_b_c"


def test_unknown_name_is_one_line_with_allowed_names():
    reg = make()
    with pytest.raises(ValueError) as err:
        reg.resolve("huge")
    assert str(err.value) == "unknown widget 'huge'; allowed widgets: big_one, plain, free, b1 (= big_one)"
    with pytest.raises(TypeError, match="widget must be a name"):
        reg.resolve(7)


def test_options_are_discovered_and_checked():
    reg = make()
    assert reg.options("b1") == {"width": 3, "depth": 2}
    assert reg.options("plain") == {"colour": "red"}
    assert reg.create("big_one", 5, width=9) == ("big", 5, 9, 2)
    assert reg.create("plain", colour="blue").colour == "blue"
    with pytest.raises(ValueError) as err:
        reg.create("big_one", 5, widht=1)
    assert str(err.value) == "widget 'big_one' has no option(s) 'widht'; allowed options: width, depth"
    assert reg.create("free", 1, anything=2) == ((1,), {"anything": 2})  # **kwargs: no check


def test_descriptions_and_duplicates():
    reg = make()
    assert reg.describe() == [("big_one", "A big widget."), ("plain", "A plain one."), ("free", "takes anything")]
    with pytest.raises(ValueError, match="widget name 'plain' is empty or already registered"):
        reg.add("Plain", object())
    with pytest.raises(ValueError, match="widget name 'b1' is empty or already registered"):
        reg.add("other", object(), aliases=("b1",))
