"""The project's own small prompt sets, shipped with the package (`cada_jax/data/builtin/`).

    harmful    requests the model should decline, 15 per hazard category (10 train / 5 test);
               worded as plain requests with no harmful content in them
    benign     everyday requests (60 train / 30 test)
    lookalike  benign requests that borrow the vocabulary of a hazard category ("kill a background
               job", "bath bomb"): over-refusal traps (60 train / 30 test); each names the category
               it resembles in `resembles`

Records: `{"id", "prompt", "category", "label"}` (+ `resembles` for look-alikes); `category` is a
hazard category for harmful prompts and `benign` otherwise; `label` is "harmful" or "benign". Train
and test prompts are disjoint, and none repeats a precedent's request.

The hazard categories are those of the shipped spec (cada_jax/cada/spec/categories.yaml). This
layer sits below the spec, so a file read here is checked for well-formed category names (lowercase
words joined by '_'), and `hazard_categories` narrows that to a given list;
tests/test_builtin_data.py checks the shipped files against the shipped spec's categories.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from cada_jax.data.records import PromptRecord
from cada_jax.files import jsonl_records

BUILTIN_DIR = Path(__file__).resolve().with_name("builtin")
BUILTIN_SETS: tuple[str, ...] = ("harmful", "benign", "lookalike")
SPLITS: tuple[str, ...] = ("train", "test")
LABELS: tuple[str, ...] = ("harmful", "benign")

BENIGN = "benign"  # the category of every benign record (as in the spec)
_CATEGORY_NAME = re.compile(r"[a-z][a-z0-9_]*")  # how categories.yaml names a hazard category
_REQUIRED = ("id", "prompt", "category", "label")
_OPTIONAL = ("resembles",)


class BuiltinDataError(ValueError):
    """A built-in prompt file is malformed: `<file>, line <n>, field '<f>': what is wrong; fix`."""


def builtin_path(name: str, split: str) -> Path:
    """Path of one built-in set's split; raises ValueError naming the valid choices."""
    if name not in BUILTIN_SETS:
        raise ValueError(f"unknown built-in prompt set {name!r}; use one of {', '.join(BUILTIN_SETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for built-in set {name!r}; use one of {', '.join(SPLITS)}")
    return BUILTIN_DIR / f"{name}_{split}.jsonl"


def _bad(path: Path, line: int, field: str | None, problem: str, fix: str) -> BuiltinDataError:
    where = f"{path}, line {line}" + (f", field '{field}'" if field else "")
    return BuiltinDataError(f"{where}: {problem}; {fix}")


def _expected_label(name: str) -> str:
    return "harmful" if name == "harmful" else "benign"


def _hazard_category(value: str, hazard_categories: Sequence[str] | None) -> bool:
    if hazard_categories is not None:
        return value in hazard_categories
    return value != BENIGN and _CATEGORY_NAME.fullmatch(value) is not None


def read_prompt_file(path: str | Path, *, expected_label: str | None = None,
                     hazard_categories: Sequence[str] | None = None) -> list[dict]:
    """Read and validate a prompt JSONL file in the built-in format (usable for your own files too).

    `hazard_categories`: the categories a harmful record (or a look-alike's `resembles`) may name,
    e.g. a spec's `categories.hazard`; None accepts any well-formed category name but `benign`."""
    allowed = (f"use one of {', '.join(hazard_categories)}" if hazard_categories is not None
               else "use a hazard category of the spec (lowercase words joined by '_', not 'benign')")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found; check the path")
    records: list[dict] = []
    seen: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        lineno = path.read_bytes()[: e.start].count(b"\n") + 1
        raise _bad(path, lineno, None, "not UTF-8 text", "save the file as UTF-8") from None
    for lineno, rec in jsonl_records(text, path, _bad):
        for key in rec:
            if key not in _REQUIRED + _OPTIONAL:
                raise _bad(path, lineno, key, "unknown field", f"use only {', '.join(_REQUIRED + _OPTIONAL)}")
        for key in _REQUIRED:
            if key not in rec:
                raise _bad(path, lineno, key, "missing", f"add \"{key}\" to the record")
            if not isinstance(rec[key], str) or not rec[key].strip():
                raise _bad(path, lineno, key, f"must be a non-empty string, got {rec[key]!r}"[:200],
                           f"give \"{key}\" a string value")
        if rec["id"] in seen:
            raise _bad(path, lineno, "id", f"duplicate id {rec['id']!r} (first on line {seen[rec['id']]})",
                       "give every record a unique id")
        seen[rec["id"]] = lineno
        label = rec["label"]
        if label not in LABELS:
            raise _bad(path, lineno, "label", f"unknown label {label!r}", f"use one of {', '.join(LABELS)}")
        if expected_label is not None and label != expected_label:
            raise _bad(path, lineno, "label", f"{label!r} in a file of {expected_label} prompts",
                       f"set it to {expected_label!r} or move the record to the right file")
        category = rec["category"]
        if label == "harmful" and not _hazard_category(category, hazard_categories):
            raise _bad(path, lineno, "category", f"harmful prompt with category {category!r}", allowed)
        if label == "benign" and category != BENIGN:
            raise _bad(path, lineno, "category", f"benign prompt with category {category!r}",
                       f"use {BENIGN!r} (put a look-alike's hazard category in 'resembles')")
        if "resembles" in rec and not (isinstance(rec["resembles"], str) and _hazard_category(rec["resembles"], hazard_categories)):
            raise _bad(path, lineno, "resembles", f"unknown hazard category {rec['resembles']!r}", allowed)
        records.append(dict(rec))
    if not records:
        raise _bad(path, 1, None, "no records", "add one JSON object per line")
    return records


def load_builtin(name: str, split: str) -> list[dict]:
    """One built-in prompt set's split as a list of fresh dicts (safe to mutate)."""
    path = builtin_path(name, split)
    return read_prompt_file(path, expected_label=_expected_label(name))


def builtin_mix(split: str) -> list[dict]:
    """harmful + benign + lookalike for one split, in that order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    out: list[dict] = []
    for name in BUILTIN_SETS:
        out.extend(load_builtin(name, split))
    return out


__all__ = ["BUILTIN_DIR", "BUILTIN_SETS", "BuiltinDataError", "LABELS", "SPLITS",
           "builtin_mix", "builtin_path", "load_builtin", "read_prompt_file", "round_robin"]


def round_robin(rows: list[dict], key: str) -> list[dict]:
    """Rows reordered to take one of each category in turn (file order within a category), so the
    first N cover as many categories as N allows; the built-in files are grouped by category."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get(key)), []).append(r)
    out: list[dict] = []
    queues = list(groups.values())
    depth = 0
    while len(out) < len(rows):
        out.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    return out


def builtin_records(limit: int | None, split: str, *, offset: int = 0) -> list[PromptRecord]:
    """The three built-in sets of `split` as `PromptRecord`s (harmful, benign, look-alike in turn).

    `limit` applies to each set and takes its categories in turn (`round_robin`); `offset` skips
    that many of each set first (the next window of requests). Look-alikes get the category
    `lookalike:<category they resemble>` and keep `resembles` in `meta`."""
    out = []
    for name in BUILTIN_SETS:
        rows = load_builtin(name, split)
        if limit is not None or offset:
            rows = round_robin(rows, "resembles" if name == "lookalike" else "category")
            rows = rows[offset:offset + limit] if limit is not None else rows[offset:]
        for r in rows:
            category = f"lookalike:{r['resembles']}" if name == "lookalike" else r["category"]
            meta = {"set": name}
            if "resembles" in r:
                meta["resembles"] = r["resembles"]
            out.append(PromptRecord(id=r["id"], prompt=r["prompt"], label=r["label"], category=category,
                                    source=f"builtin:{name}", meta=meta))
    return out
