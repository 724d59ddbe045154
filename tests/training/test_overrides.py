"""Typed updates of nested dataclasses (lungcad.training.overrides), on a toy schema."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from lungcad.errors import InputError
from lungcad.training.overrides import (
    apply_updates,
    convert_value,
    merge_updates,
    parse_override,
)


@dataclass
class Inner:
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"
    path: str | None = None
    sizes: tuple[int, int] = (1, 2)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    names: list[str] = field(default_factory=list)
    count: int = 3


def test_values_convert_as_a_user_means_them() -> None:
    assert convert_value("1e-4", float, "k") == 1e-4  # YAML reads 1e-4 as a string
    assert convert_value(2, float, "k") == 2.0 and isinstance(convert_value(2, float, "k"), float)
    assert convert_value(4.0, int, "k") == 4
    assert convert_value("x.csv", list[str], "k") == ["x.csv"]
    assert convert_value([3, 4], tuple[int, int], "k") == (3, 4)
    assert convert_value("none", str | None, "k") is None
    for value, tp in ((1.5, int), ("yes", bool), (True, int), ([1, 2, 3], tuple[int, int])):
        with pytest.raises(InputError, match="^k: expected"):
            convert_value(value, tp, "k")


def test_apply_updates_recurses_and_names_bad_keys() -> None:
    out = apply_updates(Outer(), {"inner": {"rate": "0.5", "mode": "b"}, "names": "one"})
    assert out == Outer(inner=Inner(rate=0.5, mode="b"), names=["one"])
    with pytest.raises(InputError, match=r"^inner\.mode: expected one of 'a', 'b', got 'c'"):
        apply_updates(Outer(), {"inner": {"mode": "c"}})
    with pytest.raises(InputError, match=r"inner\.rat: unknown config key; valid keys at "):
        apply_updates(Outer(), {"inner": {"rat": 1}})
    assert apply_updates(Outer(), {"gone": 1, "count": 5}, strict=False) == Outer(count=5)


def test_parse_and_merge_overrides() -> None:
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    assert parse_override("a=") == {"a": ""}
    merged = merge_updates(parse_override("s.x=1"), parse_override("s.y=2"))
    assert merge_updates(merged, {"s": {"x": 3}}) == {"s": {"x": 3, "y": 2}}
    for bad in ("novalue", "a..b=1", "=1"):
        with pytest.raises(InputError):
            parse_override(bad)
