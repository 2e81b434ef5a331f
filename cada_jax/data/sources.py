"""Prompt records from the sources a config names (`generate.sources`, `eval.sets`, `eval.utility`):
the built-in sets or any benchmark loader, each cut to its `limit` the same way on every run.

A source is `{name, split, path, limit}` (`cada_jax.config.DataSource`):

- `builtin`: the shipped harmful + benign + look-alike sets (`split` train or test); `limit` applies
  to each of the three sets and takes their categories in turn.
- any loader (`advbench`, `strongreject`, `rho_pairs`, ...): the loader's records (from `path`, or the
  copy an installed package ships), put in an order fixed by `seed` and each record's id (so the
  first N spread over the whole file, which is often grouped by topic), then cut to `limit`.

`window=1` takes the *next* `limit` records after the first `limit` (the RL stage's fresh requests
with `pipeline.rl_fresh`): the same order, so the two windows never share a record.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from cada_jax.data.records import PromptRecord

__all__ = ["source_name", "source_records", "normalize_prompt", "drop_overlap"]


def source_name(src: Any) -> str:
    """How reports name a source: `name` or `name:split`."""
    return f"{src.name}:{src.split}" if src.split else src.name


def _order_key(seed: int, rec: PromptRecord) -> str:
    return hashlib.sha256(f"{seed}\x00{rec.source}\x00{rec.id}".encode()).hexdigest()


def source_records(src: Any, *, default_split: str, seed: int = 0, window: int = 0, exclude: set[str] | None = None):
    """The records of one source (a `DataSource`): window 0 = the first `limit`, window 1 = the next
    `limit` (empty when `limit` is 0: the first window already holds every record).

    With `exclude` (normalised prompts, `normalize_prompt`): records whose prompt is in it are
    dropped *before* the limit is taken, and the result is `(records, dropped)`."""
    from cada_jax.data.builtin import builtin_records

    limit = int(src.limit)
    if window and not limit:
        return ([], []) if exclude is not None else []
    if src.name == "builtin":
        if src.path:
            raise ValueError(f"source builtin: the built-in sets ship with the package and take no path; drop path {src.path!r}")
        records = builtin_records(limit or None, src.split or default_split, offset=window * limit)
        return drop_overlap(records, exclude) if exclude is not None else records
    from cada_jax.data.loaders import available_loaders, load_benchmark

    if src.name not in available_loaders():
        raise ValueError(f"unknown data source {src.name!r}; use builtin or one of: {', '.join(available_loaders())}")
    records = load_benchmark(src.name, src.path or None, split=src.split or None)
    if not records:
        raise ValueError(f"source {source_name(src)} ({src.path or 'packaged copy'}) has no records; check its split and file")
    dropped: list[PromptRecord] = []
    if exclude is not None:
        records, dropped = drop_overlap(records, exclude)
    if limit:
        records = sorted(records, key=lambda r: _order_key(seed, r))[window * limit:(window + 1) * limit]
    return (records, dropped) if exclude is not None else records


_WORD = re.compile(r"[a-z0-9]+")


def normalize_prompt(text: str) -> str:
    """Lower-case words and digits only: two prompts that differ in case, spacing or punctuation
    normalise alike (how training and held-out sets are kept disjoint)."""
    return " ".join(_WORD.findall(text.lower()))


def drop_overlap(records: list[PromptRecord], seen: set[str]) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(`records` whose normalised prompt is not in `seen`, the dropped ones)."""
    kept, dropped = [], []
    for r in records:
        (dropped if normalize_prompt(r.prompt) in seen else kept).append(r)
    return kept, dropped
