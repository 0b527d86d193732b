"""The generic parser under student.config, on a toy schema: it must not know what TrainConfig's fields mean."""

from dataclasses import dataclass
from typing import Literal

import pytest

from student.typed_config import ConfigError, help_lines, iter_fields, merge, opt, parse_override, section


@dataclass
class Inner:
    """the inner section"""

    mode: Literal["a", "b"] = opt("a", "which mode")
    sizes: list[int] = opt([1, 2], "a list of sizes")


@dataclass
class Outer:
    count: int = opt(3, "how many")
    rate: float | None = opt(None, "a rate or null")
    inner: Inner = section(Inner)


def test_merge_sets_nested_fields_and_coerces_to_the_annotation():
    cfg = merge(Outer(), {"count": 5, "rate": "1e-4", "inner": {"mode": "b", "sizes": 7}})
    assert (cfg.count, cfg.rate, cfg.inner.mode, cfg.inner.sizes) == (5, 1e-4, "b", [7])
    assert merge(Outer(), parse_override("inner.sizes=[4, 5]")).inner.sizes == [4, 5]
    assert Outer().inner.sizes is not Outer().inner.sizes  # list defaults are copied, not shared


@pytest.mark.parametrize("values, message", [
    ({"cout": 1}, "unknown config key cout"),
    ({"inner": {"mode": "c"}}, "inner.mode must be one of a, b"),
    ({"count": True}, "count must be an integer"),
    ({"count": 1.5}, "count must be an integer"),
    ({"rate": "nan"}, "rate must be a finite number"),
    ({"inner": 3}, "inner is a section"),
    ({"inner": {"sizes": ["x"]}}, r"inner.sizes\[0\] must be an integer"),
])
def test_bad_values_are_refused_naming_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        merge(Outer(), values)


def test_fields_and_help_lines_list_every_leaf_in_order():
    assert [k for k, _, _, _ in iter_fields(Outer)] == ["count", "rate", "inner.mode", "inner.sizes"]
    lines = help_lines(Outer)
    assert lines[2] == "  inner.mode (a|b, default a): which mode" and "default [1, 2]" in lines[3]
