"""Hazard categories and the keyword categoriser behind `guess_category`, read from categories.yaml.

A spec directory's `categories.yaml` names the hazard categories (in tie-break order) with their
keywords, the benign cues, the intent cues and co-occurrence rules; see the shipped
`cada_jax/cada/spec/categories.yaml` for the layout and the keyword syntax. `benign` is the one
built-in category: it is the other side of the line every precedent and request falls on.

`Categories.guess(request)` scores each hazard category by its keyword hits (phrases and words
marked `!` count 2, others 1, each keyword once), adds co-occurrence bonuses, and compares the best
hazard score plus the intent score with the benign-cue score: the benign reading wins ties,
since alarming words in a technical, creative or protective context are the over-refusal trap the
look-alike cases exist for. Ties between hazard categories go to the earlier one in the file.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any, Sequence

from cada_jax.cada.specfile import check_keys, line_of, load_yaml, spec_error, text_field

BENIGN = "benign"
INTENT = "intent"  # the key of the intent score in `Categories.scores`
SHIPPED_CATEGORIES = Path(__file__).resolve().with_name("spec") / "categories.yaml"

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def words(text: str) -> list[str]:
    """Lowercase words of `text` (letters and digits; everything else splits)."""
    return _WORD.findall(text.lower())


@dataclasses.dataclass(frozen=True)
class CoOccurrence:
    """A keyword of every group in one request adds `bonus` to `category`."""

    category: str
    bonus: float
    groups: tuple[tuple[str, ...], ...]


_Compiled = tuple[tuple[tuple[str, ...], bool, float], ...]


def _compile(keywords: Sequence[str]) -> _Compiled:
    out = []
    for kw in keywords:
        strong = kw.endswith("!")
        kw = kw.rstrip("!")
        prefix = kw.endswith("*")
        ws = tuple(words(kw.rstrip("*")))
        out.append((ws, prefix, 2.0 if len(ws) > 1 or strong else 1.0))
    return tuple(out)


def _match(ws: Sequence[str], compiled: _Compiled) -> float:
    score = 0.0
    n = len(ws)
    for kw, prefix, weight in compiled:
        m = len(kw)
        if m == 0:
            continue
        for i in range(n - m + 1):
            if ws[i:i + m - 1] != list(kw[:-1]):
                continue
            last = ws[i + m - 1]
            if last == kw[-1] or (prefix and last.startswith(kw[-1])):
                score += weight
                break  # each keyword counts once
    return score


@dataclasses.dataclass(frozen=True)
class Categories:
    """The hazard categories of a spec and the keyword tables that guess a request's category."""

    hazard: tuple[str, ...]
    keywords: tuple[tuple[str, ...], ...]  # one tuple per hazard category, in `hazard` order
    benign_cues: tuple[str, ...] = ()
    intent_cues: tuple[str, ...] = ()
    co_occurrence: tuple[CoOccurrence, ...] = ()
    source: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        """Every category a precedent or request may carry: the hazard categories, then `benign`."""
        return self.hazard + (BENIGN,)

    @functools.cached_property
    def _compiled(self) -> dict[str, Any]:
        return {
            "hazard": {c: _compile(kws) for c, kws in zip(self.hazard, self.keywords)},
            "benign": _compile(self.benign_cues),
            "intent": _compile(self.intent_cues),
            "co": [(r.category, r.bonus, [_compile(g) for g in r.groups]) for r in self.co_occurrence],
        }

    def scores(self, request: str) -> dict[str, float]:
        """Keyword scores behind `guess`: one per hazard category, plus `benign` and `intent`."""
        comp = self._compiled
        ws = words(request)
        out = {cat: _match(ws, c) for cat, c in comp["hazard"].items()}
        for cat, bonus, groups in comp["co"]:
            if all(_match(ws, g) for g in groups):
                out[cat] += bonus
        out[BENIGN] = _match(ws, comp["benign"])
        out[INTENT] = _match(ws, comp["intent"])
        return out

    def guess(self, request: str) -> str | None:
        """A hazard category, `"benign"`, or None when no keyword or cue matches."""
        if not isinstance(request, str):
            raise TypeError(f"guess_category expects a string request, got {type(request).__name__}")
        scores = self.scores(request)
        best_cat, best = None, 0.0
        for cat in self.hazard:
            if scores[cat] > best:
                best_cat, best = cat, scores[cat]
        benign = scores[BENIGN]
        if best_cat is None:
            return BENIGN if benign > 0 else None
        if benign > 0 and benign >= best + scores[INTENT]:
            return BENIGN
        return best_cat

    def check(self, category: Any, what: str = "category") -> None:
        """Raise ValueError unless `category` is one of `names` (None is not accepted here)."""
        if category not in self.names:
            where = f" (from {self.source})" if self.source else ""
            raise ValueError(f"unknown {what} {category!r}; use one of {', '.join(self.names)}{where}")


# --------------------------------------------------------------------------------------------------
# Loading categories.yaml
# --------------------------------------------------------------------------------------------------

_TOP_KEYS = ("hazard_categories", "benign_cues", "intent_cues", "co_occurrence")
_CO_KEYS = ("category", "bonus", "groups")
_KEYWORD_FIX = "write keywords as strings of words, e.g. \"kill*\", \"pump and dump\" or \"sarin!\""


def _keywords(value: Any, path: Path, line: int | None, field: str, *, allow_empty: bool) -> tuple[str, ...]:
    if value is None and allow_empty:
        return ()
    if not isinstance(value, list) or (not value and not allow_empty):
        raise spec_error(path, line, field, f"must be a {'' if allow_empty else 'non-empty '}list of keywords, got {value!r}"[:200],
                         _KEYWORD_FIX)
    out: list[str] = []
    for i, item in enumerate(value):
        at = line_of(value, i, line)
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            item = str(item)  # an unquoted 5g is a string already; 1984 is not
        kw = text_field(item, path, at, f"{field}[{i}]", _KEYWORD_FIX)
        if not words(kw.rstrip("!").rstrip("*")):
            raise spec_error(path, at, f"{field}[{i}]", f"keyword {kw!r} has no letters or digits", _KEYWORD_FIX)
        out.append(kw)
    return tuple(out)


def load_categories(path: str | Path | None = None) -> Categories:
    """Read a categories.yaml (None = the shipped one); errors name the file and line."""
    path = Path(path) if path is not None else SHIPPED_CATEGORIES
    data = load_yaml(path, "categories", SHIPPED_CATEGORIES)
    if not isinstance(data, dict):
        raise spec_error(path, 1, None, "must be a mapping with keys " + ", ".join(_TOP_KEYS),
                         "see cada_jax/cada/spec/categories.yaml for the layout")
    check_keys(data, _TOP_KEYS, path, 1, "the categories file")
    if "hazard_categories" not in data:
        raise spec_error(path, 1, "hazard_categories", "missing top-level key",
                         "add 'hazard_categories:' with one entry per category and its keywords")
    cats = data["hazard_categories"]
    cats_line = line_of(data, "hazard_categories", 1)
    if not isinstance(cats, dict) or not cats:
        raise spec_error(path, cats_line, "hazard_categories", "must be a non-empty mapping from category name to its keywords",
                         "write e.g. 'violent_crimes: {keywords: [\"kill*\", ...]}'")
    hazard: list[str] = []
    keywords: list[tuple[str, ...]] = []
    for name, body in cats.items():
        line = line_of(cats, name, cats_line)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise spec_error(path, line, f"hazard_categories.{name}", "invalid category name",
                             "use lowercase letters, digits and '_', starting with a letter (e.g. weapons_trade)")
        if name in (BENIGN, INTENT):
            raise spec_error(path, line, f"hazard_categories.{name}", f"'{name}' is reserved",
                             "'benign' is built in and 'intent' names the intent score; rename the category")
        if not isinstance(body, dict):
            raise spec_error(path, line, f"hazard_categories.{name}", f"must be a mapping with 'keywords', got {body!r}"[:200],
                             "write the category as 'NAME: {keywords: [...]}'")
        check_keys(body, ("keywords",), path, line, f"the category {name}")
        if "keywords" not in body:
            raise spec_error(path, line, f"hazard_categories.{name}.keywords", "missing", "add a 'keywords:' list")
        hazard.append(name)
        keywords.append(_keywords(body["keywords"], path, line_of(body, "keywords", line),
                                  f"hazard_categories.{name}.keywords", allow_empty=False))
    cues = {}
    for key in ("benign_cues", "intent_cues"):
        cues[key] = _keywords(data.get(key), path, line_of(data, key, 1), key, allow_empty=True)
    rules: list[CoOccurrence] = []
    raw = data.get("co_occurrence")
    raw_line = line_of(data, "co_occurrence", 1)
    if raw is not None and not isinstance(raw, list):
        raise spec_error(path, raw_line, "co_occurrence", f"must be a list of rules, got {raw!r}"[:200],
                         "write '- {category: NAME, bonus: 3, groups: [[...], [...]]}' entries")
    for i, rule in enumerate(raw or []):
        line = line_of(raw, i, raw_line)
        field = f"co_occurrence[{i}]"
        if not isinstance(rule, dict):
            raise spec_error(path, line, field, f"must be a mapping, got {rule!r}"[:200],
                             "write '- {category: NAME, bonus: 3, groups: [[...], [...]]}'")
        check_keys(rule, _CO_KEYS, path, line, "a co-occurrence rule")
        for key in _CO_KEYS:
            if key not in rule:
                raise spec_error(path, line, f"{field}.{key}", "missing", f"add '{key}:' to the rule")
        if rule["category"] not in hazard:
            raise spec_error(path, line_of(rule, "category", line), f"{field}.category",
                             f"unknown hazard category {rule['category']!r}", f"use one of {', '.join(hazard)}")
        bonus = rule["bonus"]
        if isinstance(bonus, bool) or not isinstance(bonus, (int, float)) or not bonus > 0:
            raise spec_error(path, line_of(rule, "bonus", line), f"{field}.bonus", f"must be a positive number, got {bonus!r}",
                             "give the score the rule adds, e.g. 3")
        groups = rule["groups"]
        g_line = line_of(rule, "groups", line)
        if not isinstance(groups, list) or not groups:
            raise spec_error(path, g_line, f"{field}.groups", f"must be a non-empty list of keyword lists, got {groups!r}"[:200],
                             "write 'groups: [[child, kid], [nude, naked]]'")
        rules.append(CoOccurrence(
            category=rule["category"], bonus=float(bonus),
            groups=tuple(_keywords(g, path, line_of(groups, j, g_line), f"{field}.groups[{j}]", allow_empty=False)
                         for j, g in enumerate(groups)),
        ))
    return Categories(hazard=tuple(hazard), keywords=tuple(keywords), benign_cues=cues["benign_cues"],
                      intent_cues=cues["intent_cues"], co_occurrence=tuple(rules), source=str(path))


@functools.lru_cache(maxsize=1)
def shipped_categories() -> Categories:
    """The categories of the shipped spec (cada_jax/cada/spec/categories.yaml), loaded once."""
    return load_categories(SHIPPED_CATEGORIES)


def category_scores(request: str, categories: Categories | None = None) -> dict[str, float]:
    """Keyword scores behind `guess_category` (default: the shipped categories)."""
    return (categories or shipped_categories()).scores(request)


def guess_category(request: str, categories: Categories | None = None) -> str | None:
    """A hazard category, `"benign"`, or None when nothing matches (default: the shipped categories)."""
    return (categories or shipped_categories()).guess(request)


def __getattr__(name: str):
    # The shipped spec's category names, read from categories.yaml on first use.
    if name == "HAZARD_CATEGORIES":
        return shipped_categories().hazard
    if name == "CATEGORIES":
        return shipped_categories().names
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BENIGN", "CATEGORIES", "Categories", "CoOccurrence", "HAZARD_CATEGORIES", "SHIPPED_CATEGORIES",
    "category_scores", "guess_category", "load_categories", "shipped_categories", "words",
]
