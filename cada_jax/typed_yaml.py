"""Typed trees of frozen dataclasses from YAML: the generic machinery behind `cada_jax.config`.

A tree is a frozen dataclass whose fields are values or nested dataclasses, each field built with
`doc_field` (default + one-line doc). `build` turns a nested dict into the tree, checking every value
against its field's type (bool, int, float, str, ``Literal[...]``, ``X | None``, ``tuple[X, ...]``,
nested sections) and naming the file or override, the dotted key and the closest valid key on an
error; `dotted_set` and `parse_override` apply ``key=value`` overrides; `to_dict` and `describe`
walk a tree back out. Nothing here knows the project's sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any, Literal

import yaml

__all__ = ["ConfigError", "doc_field", "field_types", "check", "all_keys", "build", "dotted_set", "parse_override", "plain",
           "to_dict", "read_yaml", "describe"]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file or override, the key and the fix."""


def doc_field(default: Any, doc: str):
    """A dataclass field with a default and a one-line doc."""
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def field_types(cls) -> dict:
    """{field name: resolved type} of dataclass `cls`."""
    return typing.get_type_hints(cls, include_extras=False)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + (" or null" if len(inner) < len(args) else "")
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def all_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of `cls` (sections and leaves)."""
    out = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        out.append(key)
        tp = field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += all_keys(tp, key + ".")
    return out


def _suggest(key: str, cls) -> str:
    keys = all_keys(cls)
    leaf = key.rsplit(".", 1)[-1]
    close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != key][:1]  # right name, wrong section
    if not close:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:
        leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
        near = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.6)
        close = [leaves[near[0]]] if near else []
    return f" (did you mean '{close[0]}'?)" if close else f" (valid top-level keys: {', '.join(f.name for f in dataclasses.fields(cls))})"


def _coerce(value: Any, tp, key: str, where: str, root):
    def bad():
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        return ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {type(value).__name__} {shown}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return build(tp, value, key + ".", where, root)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[0]):
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {value!r}{hint}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, where, root)
            except ConfigError as e:
                errors.append(e)
        raise bad()
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", where, root) for i, v in enumerate(value))
        if len(args) != len(value):
            raise bad()
        return tuple(_coerce(v, a, f"{key}[{i}]", where, root) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads '1e-5' (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise bad()
        if not math.isfinite(number):
            raise ConfigError(f"{where}: {key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise bad()
    raise ConfigError(f"{key}: field type {tp!r} is not supported by the config loader")


def build(cls, data: dict, prefix: str, where: str, root=None):
    """An instance of dataclass `cls` from a nested dict, every value checked against its field's
    type; errors name `where` and the dotted key (unknown keys are suggested from `root`)."""
    root = root or cls
    hints = field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = prefix + str(k)
        if k not in names:
            raise ConfigError(f"{where}: unknown key '{key}'{_suggest(key, root)}")
        kwargs[k] = _coerce(v, hints[k], key, where, root)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def dotted_set(root, tree: dict, key: str, value: Any, where: str) -> None:
    """Set dotted `key` in the nested dict `tree` of dataclass `root`, checking the path exists."""
    parts = key.split(".")
    cls = root
    node = tree
    for i, p in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if p not in names:
            raise ConfigError(f"{where}: unknown key '{key}'{_suggest(key, root)}")
        tp = field_types(cls)[p]
        if i == len(parts) - 1:
            node[p] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{where}: '{'.'.join(parts[:i + 1])}' is a value, not a section; use '{'.'.join(parts[:i + 1])}=VALUE'")
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[:i + 1])}: expected a mapping, got {type(child).__name__}")
        node, cls = child, tp


def parse_override(item: str) -> tuple[str, Any]:
    """(dotted key, YAML value) of a ``key=value`` override."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: use KEY=VALUE with a dotted key, e.g. optim.lr=1e-5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: the key is empty; use KEY=VALUE, e.g. optim.lr=1e-5")
    if raw.strip() == "":
        return key, ""
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: the value is not a YAML scalar or list; quote it") from None


def plain(x):
    """A dataclass tree as nested dicts/lists of plain YAML/JSON types."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def to_dict(cfg) -> dict:
    """Nested dict of plain YAML/JSON types (tuples become lists)."""
    return plain(cfg)


def read_yaml(path: str):
    """The YAML document of file `path`; a missing file or bad syntax is a one-line ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file")
    with open(path) as f:
        text = f.read()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{at}; fix the syntax") from None


def describe(cls, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every leaf field of the dataclass tree `cls`."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = field_types(cls)[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((key, _type_name(tp), plain(default), f.metadata.get("doc", "")))
    return rows
