"""Spec files: YAML that remembers line numbers, and the field checks every spec loader shares.

Every problem is a `SpecError` (a `ValueError`) whose one-line message names the file, the line,
the field, what is wrong and how to fix it: `<file>, line <n>, field '<f>': problem; fix`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml


class SpecError(ValueError):
    """A spec file is malformed. One line: `<file>, line <n>, field '<f>': what is wrong; fix`."""


def spec_error(path: Any, line: int | None, field: str | None, problem: str, fix: str) -> SpecError:
    where = str(path)
    if line is not None:
        where += f", line {line}"
    if field is not None:
        where += f", field '{field}'"
    return SpecError(f"{where}: {problem}; {fix}")


class _LineDict(dict):
    """A YAML mapping that remembers where it and each of its keys started (1-based lines)."""

    line: int = 0
    key_lines: dict


class _LineList(list):
    """A YAML sequence that remembers where it and each of its items started (1-based lines)."""

    line: int = 0
    item_lines: list


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    loader.flatten_mapping(node)
    out = _LineDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            duplicate = key in out
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable mapping key {key!r}", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {out.key_lines[key]})", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = line
    return out


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _LineList:
    out = _LineList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def read_text(path: Path, what: str, default: Path) -> str:
    if not path.exists():
        hint = "pass an existing file" + ("" if path == default else f", or None for the built-in {default.name}")
        raise FileNotFoundError(f"{path}: {what} file not found; {hint}")
    if path.is_dir():
        raise SpecError(f"{path}: is a directory, expected a {what} file; pass the file's path")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None


def load_yaml(path: Path, what: str, default: Path) -> Any:
    text = read_text(path, what, default)
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = (e.problem or e.context or "invalid YAML").strip()
        raise spec_error(path, line, None, f"invalid YAML: {problem}", "fix the YAML syntax") from None
    except yaml.YAMLError as e:
        raise spec_error(path, None, None, f"invalid YAML: {e}", "fix the YAML syntax") from None


def line_of(container: Any, key: Any, fallback: int | None) -> int | None:
    if isinstance(container, _LineDict):
        return container.key_lines.get(key, container.line)
    if isinstance(container, _LineList) and isinstance(key, int) and 0 <= key < len(container.item_lines):
        return container.item_lines[key]
    return getattr(container, "line", None) or fallback


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping (quote a value that contains ': ')"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return f"a {type(value).__name__}"


def text_field(value: Any, path: Path, line: int | None, field: str, fix: str) -> str:
    if not isinstance(value, str) or not value.strip():
        got = "empty" if isinstance(value, str) else f"{_kind(value)} ({value!r})"[:160]
        raise spec_error(path, line, field, f"must be a non-empty string, got {got}", fix)
    return " ".join(value.split())


def text_list(value: Any, path: Path, line: int | None, field: str, fix: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise spec_error(path, line, field, f"must be a non-empty list of strings, got {value!r}"[:200], fix)
    return tuple(
        text_field(item, path, line_of(value, i, line), f"{field}[{i}]", fix) for i, item in enumerate(value)
    )


def check_keys(record: dict, allowed: Sequence[str], path: Path, line: int | None, what: str) -> None:
    for key in record:
        if key not in allowed:
            raise spec_error(
                path, line_of(record, key, line), str(key), f"unknown field in {what}",
                f"use only {', '.join(allowed)} (check the spelling)",
            )



__all__ = ["SpecError", "check_keys", "line_of", "load_yaml", "read_text", "spec_error", "text_field", "text_list"]
