"""Typed dataclass trees from YAML mappings and dotted ``key=value`` overrides: the parser under
``student.config``, knowing nothing of what the fields mean.

Contract: ``merge(obj, mapping)`` sets the fields of a dataclass tree in place from a nested mapping, each
value checked and coerced to its annotation (``bool``, ``int``, finite ``float``, ``str``, ``Literal``
choices, ``list[...]``, ``dict``, unions, nested dataclasses); an unknown key, an ill-typed value or a
mode outside its choices raises a ``ConfigError`` whose one-line message names the dotted key. Fields carry
one line of help in their metadata (``opt``/``section``), which ``iter_fields`` and ``help_lines`` list.

Why our own parser and not OmegaConf structured configs: OmegaConf is not a dependency (one more package
to pin), it has no ``typing.Literal`` support (modes would become Enums that YAML files spell differently),
and its errors are multi-line. What we need (merge a mapping into typed dataclasses, coerce scalars, name
the key) is the ~120 lines of ``coerce``/``merge`` below.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any, Literal

import yaml

from sharding.cli import UserError


class ConfigError(UserError, ValueError):
    """A configuration key or value is wrong; the message names the key (or file)."""


def opt(default: Any, help: str) -> Any:
    """A configuration field with its one line of help (shown by ``python -m student.train --help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def section(cls: type) -> Any:
    """A nested section of fields; its help line is the first line of the class docstring."""
    return field(default_factory=cls, metadata={"help": (cls.__doc__ or "").strip().split("\n")[0]})


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert one YAML value to the annotated type, naming the key on failure."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return merge(tp(), value, key + ".")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool):
            raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return coerce(key, value, arg)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]  # the first alternative's complaint: "a finite number", not "null", for float | None
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key} must be null, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} at {key}")


def merge(obj: Any, values: dict, prefix: str = "") -> Any:
    """Set the fields of the dataclass tree ``obj`` from the nested mapping ``values``; returns ``obj``."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in values.items():
        if k not in names:
            raise ConfigError(f"unknown config key {prefix}{k!s}; known keys here: {', '.join(sorted(names))}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"{prefix}{k} is a section; set its keys, e.g. {prefix}{k}.<key>=value")
            merge(current, v, f"{prefix}{k}.")
        else:
            setattr(obj, k, coerce(prefix + k, v, hints[k]))
    return obj


def parse_override(arg: str) -> dict:
    """``a.b.c=value`` -> nested dict; the value is read as YAML (numbers, booleans, lists)."""
    if "=" not in arg:
        raise ConfigError(f"override {arg!r} must look like key=value (e.g. optim.steps=20)")
    key, raw = arg.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: cannot read {raw!r} as a YAML value ({yaml_problem(err)})") from err
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(err, "problem", None) or err).split("\n")[0]


def iter_fields(cls: type, prefix: str = ""):
    """(dotted key, type, default, help) of every leaf field, in declaration order."""
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, tp, getattr(default, f.name), f.metadata.get("help", "")


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def help_lines(cls: type) -> list[str]:
    """One line per leaf field of ``cls``: dotted key, type, default and help."""
    lines = []
    for key, tp, default, help in iter_fields(cls):
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  {key} ({type_name(tp)}, default {shown or repr(default)}): {help}")
    return lines
