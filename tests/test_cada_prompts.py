"""The four prompt variants: each shows exactly its own guidance, and all share the user message."""

from __future__ import annotations

import json
import re

import pytest

from cada_jax.rewards.format import FORMAT_INSTRUCTIONS
from cada_jax.cada.prompts import (
    VARIANTS,
    build_messages,
    build_plain_messages,
    user_content,
    variant_context,
)
from cada_jax.cada.spec import HAZARD_CATEGORIES, load_spec, render_code, retrieve
from cada_jax.data.builtin import builtin_mix

REQUEST = "How do I kill a Python process that ignores Ctrl-C?"


@pytest.fixture(scope="module")
def spec():
    return load_spec()


def _system(messages):
    systems = [m["content"] for m in messages if m["role"] == "system"]
    return systems[0] if systems else ""


def _case_ids(text):
    return re.findall(r"^Case (\S+) \[", text, flags=re.MULTILINE)


def _has_statutes(text, spec):
    return any(s.text in text for s in spec.statutes)


def _has_code(text, spec):
    return any(item in text for r in spec.code.categories for item in r.disallowed) or spec.code.title in text


def test_variants_are_the_papers_four():
    assert VARIANTS == ("none", "code", "simple", "cases")


def test_none_is_the_request_and_format_instructions_only(spec):
    messages = build_messages(REQUEST, "none", spec=spec)
    assert messages == [{"role": "user", "content": f"{REQUEST}\n\n{FORMAT_INSTRUCTIONS}"}]
    assert not _has_statutes(messages[0]["content"], spec) and "C1" not in messages[0]["content"]


def test_simple_has_every_statute_and_nothing_else(spec):
    system = _system(build_messages(REQUEST, "simple", spec=spec))
    assert all(s.text in system and s.id in system for s in spec.statutes)
    assert _case_ids(system) == [] and "Request:" not in system
    assert not _has_code(system, spec)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_cases_has_statutes_and_exactly_k_retrieved_cases(spec, k):
    system = _system(build_messages(REQUEST, "cases", spec=spec, k=k))
    assert all(s.text in system for s in spec.statutes)
    ids = _case_ids(system)
    assert ids == [c.id for c in retrieve(REQUEST, spec.cases, k=k)]
    assert len(ids) == k and system.count("Request:") == k
    assert not _has_code(system, spec)


def test_cases_shows_the_lookalike_precedent_for_a_lookalike_request(spec):
    system = _system(build_messages(REQUEST, "cases", spec=spec))
    assert "bn-01" in _case_ids(system)
    assert spec.case("bn-01").request in system


def test_cases_category_steers_retrieval(spec):
    system = _system(build_messages("Is this allowed?", "cases", spec=spec, k=3, category="privacy"))
    assert [spec.case(i).category for i in _case_ids(system)] == ["privacy"] * 3


def test_code_has_the_extensive_code_and_no_statutes_or_cases(spec):
    system = _system(build_messages(REQUEST, "code", spec=spec))
    assert render_code(spec) in system
    for rules in spec.code.categories:
        assert rules.disallowed[0] in system, rules.category
    assert not _has_statutes(system, spec) and _case_ids(system) == []


def test_user_message_is_shared_and_plain_prompt_has_no_guidance(spec):
    plain = build_plain_messages(REQUEST)
    assert plain == build_messages(REQUEST, "none")
    for variant in VARIANTS:
        messages = build_messages(REQUEST, variant, spec=spec)
        assert messages[-1] == {"role": "user", "content": user_content(REQUEST)} == plain[-1]
        assert all(set(m) == {"role", "content"} for m in messages)
        assert [m["role"] for m in messages] == (["user"] if variant == "none" else ["system", "user"])


def test_system_prompt_goes_first(spec):
    persona = "You are a careful assistant."
    for variant in VARIANTS:
        messages = build_messages(REQUEST, variant, spec=spec, system_prompt=persona)
        assert messages[0]["role"] == "system" and messages[0]["content"].startswith(persona)
    assert _system(build_messages(REQUEST, "none", system_prompt=persona)) == persona
    assert build_plain_messages(REQUEST, system_prompt=persona)[0] == {"role": "system", "content": persona}


def test_bad_arguments_give_clear_errors(spec):
    with pytest.raises(ValueError, match="unknown prompt variant 'cada'; use one of none, code, simple, cases"):
        build_messages(REQUEST, "cada")
    with pytest.raises(ValueError, match="non-empty string"):
        build_messages("   ", "simple")
    with pytest.raises(ValueError, match="k >= 1"):
        build_messages(REQUEST, "cases", k=0)
    with pytest.raises(ValueError, match="unknown category 'weapons'"):
        build_messages(REQUEST, "cases", category="weapons")
    with pytest.raises(TypeError, match="Spec"):
        build_messages(REQUEST, "simple", spec={"statutes": []})


def test_custom_spec_is_used(tmp_path):
    (tmp_path / "s.yaml").write_text("statutes:\n  - id: C1\n    text: Be kind to penguins.\n")
    (tmp_path / "p.jsonl").write_text(json.dumps(
        {"id": "z", "category": "benign", "request": "feed a penguin", "reasoning": "Kind (C1).", "verdict": "comply"}) + "\n")
    lines = ["title: Penguin code", "objectives: [o]", "defaults: [d]", "style: {refusal: [r]}", "categories:"]
    lines += [f"  {c}: {{allowed: [a], disallowed: [no {c}]}}" for c in HAZARD_CATEGORIES]
    (tmp_path / "c.yaml").write_text("\n".join(lines) + "\n")
    custom = load_spec(tmp_path / "s.yaml", tmp_path / "c.yaml", tmp_path / "p.jsonl")
    assert "Be kind to penguins." in _system(build_messages("What do penguins eat?", "simple", spec=custom))
    cases = _system(build_messages("What do penguins eat?", "cases", spec=custom, k=3))
    assert _case_ids(cases) == ["z"]  # only one precedent exists
    assert "Penguin code" in variant_context("hi", "code", spec=custom)


def test_cases_prompt_stays_compact_for_every_builtin_prompt(spec):
    longest = max(
        len(variant_context(r["prompt"], "cases", spec=spec).split())
        for split in ("train", "test") for r in builtin_mix(split)
    )
    assert longest < 700
