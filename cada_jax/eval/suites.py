"""What an evaluation asks: prompt suites (the built-in sets, every benchmark loader) and the
(record, attack, variant) items built from them, each with the chat messages the model sees.

`cada_jax.eval.runner.evaluate` samples and judges these items; `cada_jax.eval.summary` scores them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Sequence

from cada_jax.cada.prompts import VARIANTS, build_messages
from cada_jax.cada.spec import Spec
from cada_jax.data.attacks import apply_attack, available_attacks, get_attack
from cada_jax.data.records import PromptRecord

__all__ = ["EvalItem", "available_suites", "build_items", "check_attacks", "check_records", "check_variant", "load_suite",
           "load_utility"]


def available_suites() -> list[str]:
    """`builtin` plus every benchmark loader name (`cada_jax.data.loaders.available_loaders`)."""
    from cada_jax.data.loaders import available_loaders

    return ["builtin"] + available_loaders()


def load_suite(name: str, path: str | Path | None = None, *, limit: int | None = None,
               split: str | None = None) -> list[PromptRecord]:
    """Records of a suite by name.

    `builtin`: the built-in harmful + benign + lookalike sets (split `test` unless `split` says
    `train`); `limit` applies to each of the three sets, so a small limit still covers all three,
    and takes the categories in turn (one prompt of each category, then a second of each, ...).
    Any loader name (`strongreject`, `xstest`, `gsm8k`, ...): `load_benchmark(name, path, limit, split)`;
    without `path` the loader tries the hub copy and says which file to pass when that fails.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    if name == "builtin":
        if path is not None:
            raise ValueError("suite 'builtin' ships with the package and takes no --data; drop --data or name a loader suite")
        from cada_jax.data.builtin import builtin_records

        return builtin_records(limit, split or "test")
    from cada_jax.data.loaders import available_loaders, load_benchmark

    if name not in available_loaders():
        raise ValueError(f"unknown suite {name!r}; available: {', '.join(available_suites())}")
    records = load_benchmark(name, path, limit=limit, split=split)
    if not records:
        raise ValueError(f"suite {name!r} ({path or 'hub copy'}) has no records" + (f" in split {split!r}" if split else "")
                         + "; check the file and --split")
    return records


def load_utility(spec: str, *, limit: int | None = None) -> list[PromptRecord]:
    """Utility records from `NAME=PATH` (e.g. `gsm8k=test.jsonl`, `mmlu=abstract_algebra_test.csv`)
    or a bare `NAME` (hub copy). Only loaders that yield utility records are accepted."""
    name, _, path = spec.partition("=")
    name, path = name.strip(), path.strip() or None
    if name not in ("gsm8k", "mmlu"):
        raise ValueError(f"--utility {spec!r}: utility sets are gsm8k or mmlu; write NAME=PATH, e.g. gsm8k=test.jsonl")
    records = load_suite(name, path, limit=limit)
    bad = [r.id for r in records if r.label != "utility"]
    if bad:
        raise ValueError(f"--utility {spec!r}: record {bad[0]!r} is not a utility record; pass a gsm8k or mmlu file")
    return records


# ---------------------------------------------------------------------------------------------
# Items: (record, attack) pairs with their chat messages
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One prompt sent to the model: record `record_index` under `attack`, as chat `messages`."""

    record_index: int
    record: PromptRecord
    attack: str
    attacked_prompt: str
    messages: list


def check_attacks(attacks: Iterable[str]) -> tuple[str, ...]:
    if isinstance(attacks, str):
        attacks = (attacks,)
    attacks = tuple(attacks)
    if not attacks:
        raise ValueError(f"no attacks given; pass at least 'none' (available: {', '.join(available_attacks())})")
    seen = set()
    for a in attacks:
        get_attack(a)  # raises "unknown attack ...; available: ..."
        if a in seen:
            raise ValueError(f"attack {a!r} is listed twice; list each attack once")
        seen.add(a)
    return attacks


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown prompt variant {variant!r}; use one of {', '.join(VARIANTS)}")
    return variant


def check_records(records: Sequence[PromptRecord]) -> list[PromptRecord]:
    records = list(records)
    if not records:
        raise ValueError("no records to evaluate; load a suite or a prompt file with at least one prompt")
    for i, r in enumerate(records):
        if not isinstance(r, PromptRecord):
            raise TypeError(f"records[{i}] is {type(r).__name__}; pass cada_jax.data.records.PromptRecord objects")
        if not r.prompt.strip():
            raise ValueError(f"record {r.id!r} ({r.source or 'records'}): empty prompt; fill it in or drop the record")
        if r.label == "utility" and not r.answer:
            raise ValueError(f"record {r.id!r} ({r.source or 'records'}): utility record without a gold answer; add 'answer'")
    return records


def build_items(records: Sequence[PromptRecord], *, variant: str = "none", attacks: Sequence[str] = ("none",),
                spec: Spec | None = None, attack_benign: bool = False, k: int = 3) -> list[EvalItem]:
    """Every (record, attack) pair with its chat messages, attack-major then record order.

    Harmful records get every attack; benign and utility records get only `none` unless
    `attack_benign` (then they get every attack too).
    """
    check_variant(variant)
    attacks = check_attacks(attacks)
    records = check_records(records)
    items: list[EvalItem] = []
    for attack in attacks:
        for i, r in enumerate(records):
            if r.label != "harmful" and not attack_benign:
                if attack != "none" and "none" in attacks:
                    continue
                if "none" not in attacks and attack != attacks[0]:
                    continue
                use = "none"
            else:
                use = attack
            attacked = apply_attack(use, r.prompt)
            messages = build_messages(attacked, variant, spec=spec, k=k)
            items.append(EvalItem(i, r, use, attacked, messages))
    return items
