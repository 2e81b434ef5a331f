"""The CADA specification as data: statutes, the extensive code, precedents and categories.

A spec is a directory (the shipped one is `cada_jax/cada/spec/`; a run picks another with the
config key `spec.dir`) holding four files:

- `statutes.yaml`: a handful of short, simple codes with ids (C1, C2, ...);
- `extensive_code.yaml`: a long, tiered, Deliberative-Alignment-style specification with allowed /
  disallowed sub-types for every hazard category (the `code` ablation);
- `precedents.jsonl`: cases, each a request, short reasoning that cites statute ids, a verdict and
  optionally the answer given. Benign look-alike cases ("how do I kill a Python process") sit next
  to the harmful ones so that a model sees where the boundary lies;
- `categories.yaml`: the hazard categories and the keyword tables that guess a request's category
  (`cada_jax.cada.categories`).

All four are validated on load; a malformed file raises `SpecError` (a `ValueError`) with a one-line
message naming the file, the line, the field, what is wrong and how to fix it.

Precedent retrieval (BM25, embeddings, hybrid) lives in `cada_jax.cada.retrieval`; its public names
stay importable from here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from cada_jax.cada.categories import BENIGN, Categories, load_categories, shipped_categories
from cada_jax.cada.specfile import (
    SpecError,
    check_keys,
    line_of,
    load_yaml,
    read_text,
    spec_error,
    text_field,
    text_list,
)
from cada_jax.files import jsonl_records

VERDICTS: tuple[str, ...] = ("refuse", "comply", "safe_complete")

SPEC_DIR = Path(__file__).resolve().with_name("spec")
SPEC_FILES: tuple[str, ...] = ("statutes.yaml", "extensive_code.yaml", "precedents.jsonl", "categories.yaml")
DEFAULT_STATUTES = SPEC_DIR / "statutes.yaml"
DEFAULT_CODE = SPEC_DIR / "extensive_code.yaml"
DEFAULT_PRECEDENTS = SPEC_DIR / "precedents.jsonl"
DEFAULT_CATEGORIES = SPEC_DIR / "categories.yaml"


# --------------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Statute:
    """One simple code: an id cited by precedents (e.g. "C1"), a short title and one or two sentences."""

    id: str
    text: str
    title: str = ""


@dataclasses.dataclass(frozen=True)
class CategoryRules:
    """Tier-2 rules of the extensive code for one hazard category."""

    category: str
    summary: str
    allowed: tuple[str, ...]
    disallowed: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ExtensiveCode:
    """The DA-style extensive specification: objectives > category rules > defaults > style."""

    title: str
    preamble: str
    objectives: tuple[str, ...]
    categories: tuple[CategoryRules, ...]
    defaults: tuple[str, ...]
    style: tuple[tuple[str, tuple[str, ...]], ...]

    def rules_for(self, category: str) -> CategoryRules:
        for rules in self.categories:
            if rules.category == category:
                return rules
        raise KeyError(f"no rules for category {category!r}; known: {', '.join(r.category for r in self.categories)}")


@dataclasses.dataclass(frozen=True)
class Case:
    """A precedent: a request, the reasoning about it (citing statute ids), the verdict, an answer."""

    id: str
    category: str
    request: str
    reasoning: str
    verdict: str
    answer: str | None = None


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything a prompt variant may show: statutes, the extensive code and the precedents."""

    statutes: tuple[Statute, ...]
    code: ExtensiveCode
    cases: tuple[Case, ...]
    sources: tuple[str, str, str] = ("", "", "")  # statutes, code, precedents file paths
    categories: Categories = dataclasses.field(default_factory=shipped_categories)
    retrieval: str = "bm25"  # how the cases variant ranks precedents: bm25 | embedding | hybrid
    embed_fn: Callable[[list[str]], Any] | None = dataclasses.field(default=None, compare=False, repr=False)

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.id == case_id:
                return c
        raise KeyError(f"no precedent with id {case_id!r}")

    def statute(self, statute_id: str) -> Statute:
        for s in self.statutes:
            if s.id == statute_id:
                return s
        raise KeyError(f"no statute with id {statute_id!r}")




# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------

_STATUTE_KEYS = ("id", "title", "text")


def load_statutes(path: str | Path | None = None) -> tuple[Statute, ...]:
    """Read statutes from a YAML file: `statutes: [{id, text, title?}, ...]` (or a bare list)."""
    path = Path(path) if path is not None else DEFAULT_STATUTES
    data = load_yaml(path, "statutes", DEFAULT_STATUTES)
    if isinstance(data, dict):
        check_keys(data, ("statutes",), path, getattr(data, "line", 1), "the statutes file")
        if "statutes" not in data:
            raise spec_error(path, 1, "statutes", "missing", "put the list of statutes under a top-level 'statutes:' key")
        data = data["statutes"]
    if not isinstance(data, list) or not data:
        raise spec_error(path, getattr(data, "line", 1), "statutes", "must be a non-empty list",
                         "list statutes as '- id: C1' entries with a 'text'")
    out: list[Statute] = []
    first_line: dict[str, int | None] = {}
    for i, item in enumerate(data):
        line = line_of(data, i, 1)
        if not isinstance(item, dict):
            raise spec_error(path, line, f"statutes[{i}]", f"must be a mapping with id and text, got {item!r}"[:200],
                             "write each statute as '- id: C1' followed by 'text: ...'")
        check_keys(item, _STATUTE_KEYS, path, line, "a statute")
        for required in ("id", "text"):
            if required not in item:
                raise spec_error(path, line, required, f"statute #{i + 1} is missing it", f"add a '{required}' to the statute")
        sid = item["id"]
        if isinstance(sid, int):
            sid = str(sid)
        sid = text_field(sid, path, line_of(item, "id", line), "id", "give the statute a short id such as C1")
        if re.search(r"\s", sid):
            raise spec_error(path, line_of(item, "id", line), "id", f"statute id {sid!r} contains whitespace",
                             "use a short id without spaces such as C1")
        if sid in first_line:
            raise spec_error(path, line_of(item, "id", line), "id",
                             f"duplicate statute id {sid!r} (first on line {first_line[sid]})", "give every statute a unique id")
        first_line[sid] = line_of(item, "id", line)
        text = text_field(item["text"], path, line_of(item, "text", line), "text", "write the statute as one or two sentences")
        title = ""
        if item.get("title") is not None:
            title = text_field(item["title"], path, line_of(item, "title", line), "title", "give a short title or drop the key")
        out.append(Statute(id=sid, text=text, title=title))
    return tuple(out)


_CODE_KEYS = ("title", "preamble", "objectives", "categories", "defaults", "style")
_RULE_KEYS = ("summary", "allowed", "disallowed")


def load_extensive_code(path: str | Path | None = None, categories: Categories | None = None) -> ExtensiveCode:
    """Read the extensive, DA-style code (see `spec/extensive_code.yaml` for the layout); it needs
    rules for every hazard category of `categories` (default: the shipped categories)."""
    path = Path(path) if path is not None else DEFAULT_CODE
    categories = categories or shipped_categories()
    hazard = categories.hazard
    data = load_yaml(path, "extensive code", DEFAULT_CODE)
    if not isinstance(data, dict):
        raise spec_error(path, 1, None, "must be a mapping with keys " + ", ".join(_CODE_KEYS),
                         "see cada_jax/cada/spec/extensive_code.yaml for the layout")
    check_keys(data, _CODE_KEYS, path, 1, "the extensive code")
    for required in ("title", "objectives", "categories", "defaults", "style"):
        if required not in data:
            raise spec_error(path, 1, required, "missing top-level key", f"add '{required}:' (see the built-in extensive_code.yaml)")
    title = text_field(data["title"], path, line_of(data, "title", 1), "title", "give the specification a title")
    preamble = ""
    if data.get("preamble") is not None:
        preamble = text_field(data["preamble"], path, line_of(data, "preamble", 1), "preamble", "write a short preamble or drop the key")
    objectives = text_list(data["objectives"], path, line_of(data, "objectives", 1), "objectives",
                           "list the objectives as strings")
    defaults = text_list(data["defaults"], path, line_of(data, "defaults", 1), "defaults", "list the defaults as strings")

    cats = data["categories"]
    cats_line = line_of(data, "categories", 1)
    if not isinstance(cats, dict):
        raise spec_error(path, cats_line, "categories", "must be a mapping from hazard category to rules",
                         "write 'categories:' with one entry per hazard category")
    rules: list[CategoryRules] = []
    for name, body in cats.items():
        line = line_of(cats, name, cats_line)
        if name not in hazard:
            raise spec_error(path, line, f"categories.{name}", "unknown hazard category",
                             f"use one of {', '.join(hazard)} (or add it to {Path(categories.source).name or 'categories.yaml'})")
        if not isinstance(body, dict):
            raise spec_error(path, line, f"categories.{name}", "must be a mapping with summary, allowed, disallowed",
                             "add 'allowed:' and 'disallowed:' lists")
        check_keys(body, _RULE_KEYS, path, line, f"the rules for {name}")
        for required in ("allowed", "disallowed"):
            if required not in body:
                raise spec_error(path, line, f"categories.{name}.{required}", "missing",
                                 f"add a '{required}:' list of sub-types")
        summary = ""
        if body.get("summary") is not None:
            summary = text_field(body["summary"], path, line_of(body, "summary", line), f"categories.{name}.summary",
                                 "write a one-line summary or drop the key")
        allowed = text_list(body["allowed"], path, line_of(body, "allowed", line), f"categories.{name}.allowed",
                            "list allowed sub-types as strings")
        disallowed = text_list(body["disallowed"], path, line_of(body, "disallowed", line),
                               f"categories.{name}.disallowed", "list disallowed sub-types as strings")
        rules.append(CategoryRules(category=name, summary=summary, allowed=allowed, disallowed=disallowed))
    missing = [c for c in hazard if c not in cats]
    if missing:
        raise spec_error(path, cats_line, "categories", f"no rules for {', '.join(missing)}",
                         "add an entry with allowed/disallowed sub-types for every hazard category")
    rules.sort(key=lambda r: hazard.index(r.category))

    style_raw = data["style"]
    style_line = line_of(data, "style", 1)
    if not isinstance(style_raw, dict) or not style_raw:
        raise spec_error(path, style_line, "style", "must be a mapping from section name to a list of rules",
                         "write e.g. 'style: {refusal: [...], compliance: [...]}'")
    style = tuple(
        (str(name), text_list(items, path, line_of(style_raw, name, style_line), f"style.{name}",
                              "list the style rules as strings"))
        for name, items in style_raw.items()
    )
    return ExtensiveCode(title=title, preamble=preamble, objectives=objectives, categories=tuple(rules),
                         defaults=defaults, style=style)


_CASE_REQUIRED = ("id", "category", "request", "reasoning", "verdict")
_CASE_KEYS = _CASE_REQUIRED + ("answer",)


def load_precedents(path: str | Path | None = None, categories: Categories | None = None) -> tuple[Case, ...]:
    """Read precedent cases from JSONL: one `{id, category, request, reasoning, verdict, answer?}` a
    line; `category` is one of `categories.names` (default: the shipped categories)."""
    path = Path(path) if path is not None else DEFAULT_PRECEDENTS
    names = (categories or shipped_categories()).names
    text = read_text(path, "precedents", DEFAULT_PRECEDENTS)
    out: list[Case] = []
    first_line: dict[str, int] = {}
    for lineno, rec in jsonl_records(text, path, spec_error):
        check_keys(rec, _CASE_KEYS, path, lineno, "a precedent")
        for key in _CASE_REQUIRED:
            if key not in rec:
                raise spec_error(path, lineno, key, "missing", f"add \"{key}\" to the record")
        cid = text_field(rec["id"], path, lineno, "id", "give the case a unique string id")
        if cid in first_line:
            raise spec_error(path, lineno, "id", f"duplicate case id {cid!r} (first on line {first_line[cid]})",
                             "give every case a unique id")
        first_line[cid] = lineno
        category = rec["category"]
        if category not in names:
            raise spec_error(path, lineno, "category", f"unknown category {category!r}", f"use one of {', '.join(names)}")
        verdict = rec["verdict"]
        if verdict not in VERDICTS:
            raise spec_error(path, lineno, "verdict", f"unknown verdict {verdict!r}", f"use one of {', '.join(VERDICTS)}")
        if category == BENIGN and verdict == "refuse":
            raise spec_error(path, lineno, "verdict", "a benign case cannot be refused",
                             "use verdict comply (or safe_complete), or give the case a hazard category")
        answer = rec.get("answer")
        if answer is not None:
            answer = text_field(answer, path, lineno, "answer", "give a short answer string, or drop the field")
        out.append(Case(
            id=cid,
            category=category,
            request=text_field(rec["request"], path, lineno, "request", "write the user's request"),
            reasoning=text_field(rec["reasoning"], path, lineno, "reasoning", "write short reasoning citing statute ids"),
            verdict=verdict,
            answer=answer,
        ))
    if not out:
        raise spec_error(path, None, None, "contains no cases", "add at least one JSON line per case")
    return tuple(out)


def cited_statutes(text: str, statute_ids: Sequence[str]) -> list[str]:
    """Statute-like ids cited in `text`: tokens with the same letter prefix as the known ids (C1 -> C\\d+)."""
    prefixes = sorted({m.group(1) for sid in statute_ids if (m := re.fullmatch(r"([A-Za-z]+)\d+", sid))})
    if not prefixes:
        return [sid for sid in statute_ids if re.search(rf"(?<![\w-]){re.escape(sid)}(?![\w-])", text)]
    pattern = re.compile(rf"(?<![\w-])(?:{'|'.join(map(re.escape, prefixes))})\d+(?![\w-])")
    seen: list[str] = []
    for m in pattern.finditer(text):
        if m.group(0) not in seen:
            seen.append(m.group(0))
    return seen


def load_spec(statutes: str | Path | None = None, code: str | Path | None = None,
              precedents: str | Path | None = None, categories: str | Path | Categories | None = None) -> Spec:
    """Load and cross-check the four parts (None = the built-in file for that part).

    `categories` is a categories.yaml path or a loaded `Categories`; the extensive code and the
    precedents are checked against its category names. Cross-check: every statute id a case's
    reasoning cites (ids with the statutes' letter prefix, e.g. C12) must exist among the statutes.
    """
    st_path = Path(statutes) if statutes is not None else DEFAULT_STATUTES
    pr_path = Path(precedents) if precedents is not None else DEFAULT_PRECEDENTS
    code_path = Path(code) if code is not None else DEFAULT_CODE
    if not isinstance(categories, Categories):
        categories = shipped_categories() if categories is None else load_categories(categories)
    stats = load_statutes(st_path)
    ext = load_extensive_code(code_path, categories)
    cases = load_precedents(pr_path, categories)
    ids = [s.id for s in stats]
    known = set(ids)
    case_lines = _case_lines(pr_path)
    for case in cases:
        unknown = [c for c in cited_statutes(case.reasoning, ids) if c not in known]
        if unknown:
            raise spec_error(pr_path, case_lines.get(case.id), "reasoning",
                             f"case {case.id!r} cites {', '.join(unknown)}, not a statute in {st_path}",
                             f"cite only {', '.join(ids)} or add the statute")
    return Spec(statutes=stats, code=ext, cases=cases, sources=(str(st_path), str(code_path), str(pr_path)),
                categories=categories)


def load_spec_dir(directory: str | Path | None = None) -> Spec:
    """The spec in `directory` (None or "" = the shipped one): statutes.yaml, extensive_code.yaml,
    precedents.jsonl and categories.yaml, all four required."""
    if directory is None or str(directory) == "":
        return default_spec()
    d = Path(directory).expanduser()
    if not d.is_dir():
        what = "is a file, not a directory" if d.exists() else "not found"
        raise FileNotFoundError(f"{d}: spec directory {what}; point spec.dir (--spec-dir) at a directory holding "
                                f"{', '.join(SPEC_FILES)} (copy {SPEC_DIR} to start one)")
    missing = [name for name in SPEC_FILES if not (d / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{d}: spec directory has no {', '.join(missing)}; a spec directory holds "
                                f"{', '.join(SPEC_FILES)} (copy the missing file(s) from {SPEC_DIR})")
    return load_spec(d / "statutes.yaml", d / "extensive_code.yaml", d / "precedents.jsonl", d / "categories.yaml")


def spec_digest(spec: Spec) -> str:
    """A content hash of everything a spec shows or retrieves with (files' content, categories,
    retrieval method and embedder identity), for resume headers and caches."""
    content = (spec.statutes, spec.code, spec.cases, spec.categories.hazard, spec.categories.keywords,
               spec.categories.benign_cues, spec.categories.intent_cues, spec.categories.co_occurrence,
               spec.retrieval, str(getattr(spec.embed_fn, "identity", "") if spec.embed_fn is not None else ""))
    return hashlib.sha256(repr(content).encode("utf-8")).hexdigest()


def _case_lines(path: Path) -> dict[str, int]:
    lines: dict[str, int] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if raw.strip():
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                lines.setdefault(rec["id"], lineno)
    return lines


@functools.lru_cache(maxsize=1)
def default_spec() -> Spec:
    """The built-in spec (cada_jax/cada/spec/), loaded once per process."""
    return load_spec()


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def render_statutes(spec: Spec) -> str:
    """The statutes as a compact numbered block: `C1 (Prevent serious harm): text`."""
    lines = ["Safety codes:"]
    for s in spec.statutes:
        lines.append(f"{s.id} ({s.title}): {s.text}" if s.title else f"{s.id}: {s.text}")
    return "\n".join(lines)


def render_code(spec: Spec) -> str:
    """The extensive code as text, tier by tier."""
    code = spec.code
    parts = [code.title]
    if code.preamble:
        parts.append(code.preamble)
    parts.append("Tier 1. Objectives\n" + "\n".join(f"{i}. {o}" for i, o in enumerate(code.objectives, 1)))
    rules = ["Tier 2. Rules by hazard category"]
    for r in code.categories:
        head = r.category.replace("_", " ").capitalize() + (f": {r.summary}" if r.summary else "")
        rules.append(head)
        rules.append("  Allowed: " + "; ".join(r.allowed) + ".")
        rules.append("  Disallowed: " + "; ".join(r.disallowed) + ".")
    parts.append("\n".join(rules))
    parts.append("Tier 3. Defaults\n" + "\n".join(f"- {d}" for d in code.defaults))
    style = ["Tier 4. Style"]
    for name, items in code.style:
        style.append(name.replace("_", " ").capitalize() + ":")
        style.extend(f"- {item}" for item in items)
    parts.append("\n".join(style))
    return "\n\n".join(parts)


_VERDICT_TEXT = {"refuse": "refuse", "comply": "comply", "safe_complete": "safe completion"}


def render_case(case: Case) -> str:
    """One precedent as a short block: request, reasoning, verdict and (if any) the answer."""
    lines = [
        f"Case {case.id} [{case.category.replace('_', ' ')}]",
        f"Request: {case.request}",
        f"Reasoning: {case.reasoning}",
        f"Verdict: {_VERDICT_TEXT[case.verdict]}",
    ]
    if case.answer:
        lines.append(f"Answer: {case.answer}")
    return "\n".join(lines)



def cases_by_category(cases: Sequence[Case], categories: Categories | None = None) -> dict[str, list[Case]]:
    """Cases grouped by category, in the order of `categories.names` (default: the shipped
    categories; categories with no case are omitted)."""
    out: dict[str, list[Case]] = {}
    for cat in (categories or shipped_categories()).names:
        group = [c for c in cases if c.category == cat]
        if group:
            out[cat] = group
    return out


# Names that moved to cada_jax.cada.categories and cada_jax.cada.retrieval, still importable from here
# (resolved on first use: retrieval imports this module).
_MOVED = {
    "HAZARD_CATEGORIES": "categories", "CATEGORIES": "categories", "category_scores": "categories",
    "guess_category": "categories", "RETRIEVAL_METHODS": "retrieval", "bm25_scores": "retrieval",
    "retrieve": "retrieval", "retrieve_for": "retrieval", "similarity_scores": "retrieval",
}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"cada_jax.cada.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BENIGN", "CATEGORIES", "HAZARD_CATEGORIES", "RETRIEVAL_METHODS", "SPEC_DIR", "SPEC_FILES", "VERDICTS",
    "Case", "CategoryRules", "ExtensiveCode", "Spec", "SpecError", "Statute",
    "bm25_scores", "cases_by_category", "category_scores", "cited_statutes", "default_spec",
    "guess_category", "load_extensive_code", "load_precedents", "load_spec", "load_spec_dir", "load_statutes",
    "render_case", "render_code", "render_statutes", "retrieve", "retrieve_for", "similarity_scores", "spec_digest",
]
