"""Typed updates of nested dataclasses: the machinery behind YAML files and ``--set``.

A configuration is a tree of dataclasses whose fields carry type annotations. An update is a
nested dict (a YAML file's sections, a parsed ``--set section.key=value``);
:func:`apply_updates` returns a copy of the tree with every value converted to its field's
annotated type, or fails with an :class:`InputError` that names the key, what was expected
and, for an unknown key, the valid keys at that level. Nothing here knows about training:
:mod:`lungcad.training.config` holds the schema and its range checks.

Example::

    updates = merge_updates(parse_override("optim.lr=1e-3"), parse_override("train.seed=7"))
    cfg = apply_updates(Config(), updates)  # "1e-3" (a YAML string) becomes the float 0.001
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from typing import Any, Literal

import yaml

from lungcad.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["apply_updates", "convert_value", "merge_updates", "parse_override"]

#: Strings that mean "no value" for an optional field (`--set train.init_from=none`).
_NONE_WORDS = {"none", "null", "~", ""}


def _type_name(tp: Any) -> str:
    """An annotation as a user reads it: ``'seg' | 'cls'``, ``float | null``, ``list[str]``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def convert_value(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to the annotated type ``tp`` or raise InputError.

    Conversions are the ones a YAML or command-line user means: an int where a float is
    expected, "1e-4" (which YAML reads as a string) as a float, a single string where a list
    is expected, a list where a tuple is expected. Nothing lossy is accepted (1.5 for an int,
    "yes please" for a bool).
    """

    def bad() -> InputError:
        return InputError(
            f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__}); "
            f"fix the value in the YAML file or the --set option",
            path=key,
        )

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)
        ):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert_value(value, arg, key)
            except InputError:
                continue
        raise bad()
    if origin is Literal:
        if value in args:
            return value
        raise InputError(
            f"expected one of {', '.join(repr(a) for a in args)}, got {value!r}", path=key
        )
    if origin is list or origin is tuple:
        items = [value] if isinstance(value, str | int | float) else value
        if not isinstance(items, list | tuple):
            raise bad()
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(convert_value(v, args[0], key) for v in items)
            if len(items) != len(args):
                raise bad()
            return tuple(convert_value(v, a, key) for v, a in zip(items, args, strict=True))
        return [convert_value(v, args[0], key) for v in items] if args else list(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise bad()
    if tp is Any:
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad()


def apply_updates(obj: Any, updates: dict[str, Any], prefix: str = "", strict: bool = True) -> Any:
    """A copy of dataclass ``obj`` with ``updates`` applied, each value converted to its type.

    Args:
        obj: a dataclass instance; fields holding dataclasses are updated recursively.
        updates: nested dict of new values (``{"optim": {"lr": 0.001}}``).
        prefix: the key of ``obj`` in the whole tree ("" at the top), for error messages.
        strict: unknown keys fail (True) or are skipped with a warning (False).

    Raises:
        InputError: an unknown key (the message lists the valid ones) or a value that does
            not convert to its field's type.
    """
    if not isinstance(updates, dict):
        raise InputError(
            f"expected a mapping of keys for section '{prefix or 'config'}', got {updates!r}",
            path=prefix or None,
        )
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    changes: dict[str, Any] = {}
    for raw_key, value in updates.items():
        key = str(raw_key)
        full = f"{prefix}.{key}" if prefix else key
        if key not in names and not strict:
            log.warning(
                "ignoring unknown config key %s (written by another lungcad version?)", full
            )
            continue
        if key not in names:
            where = f"section '{prefix}'" if prefix else "the top level"
            raise InputError(
                f"unknown config key; valid keys at {where}: {', '.join(names)}", path=full
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = apply_updates(current, value, full, strict)
        else:
            changes[key] = convert_value(value, hints[key], full)
    return dataclasses.replace(obj, **changes)


def parse_override(item: str) -> dict[str, Any]:
    """Turn ``"a.b=value"`` into ``{"a": {"b": value}}``, the value parsed as YAML.

    Raises:
        InputError: no ``=`` or an empty key part.
    """
    if "=" not in item:
        raise InputError(
            "expected key=value, e.g. optim.lr=0.001 or train.seed=7", path=f"--set {item}"
        )
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise InputError("empty key; expected section.key=value", path=f"--set {item}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML (e.g. an odd path): keep the text, the type check decides
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def merge_updates(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, section by section (``extra`` wins on a clash)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_updates(out[key], value)
        else:
            out[key] = value
    return out
