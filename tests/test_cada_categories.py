"""categories.yaml: loading a user's categories, the keyword semantics, and file:line errors."""

from __future__ import annotations

import re

import pytest

from cada_jax.cada.categories import (
    SHIPPED_CATEGORIES,
    Categories,
    CoOccurrence,
    guess_category,
    load_categories,
    shipped_categories,
)
from cada_jax.cada.spec import SpecError

GOOD = """\
hazard_categories:
  weapons_trade:
    keywords: ["gun*", "sell weapons", "ghost gun!"]
  fraud:
    keywords: ["scam*", "fake invoice"]
benign_cues: ["python", "history"]
intent_cues: ["without a trace"]
co_occurrence:
  - category: fraud
    bonus: 3
    groups: [["grandma", "elderly"], ["wire", "transfer"]]
"""


def _write(tmp_path, text):
    path = tmp_path / "categories.yaml"
    path.write_text(text)
    return path


def test_user_categories_and_their_keyword_semantics(tmp_path):
    cats = load_categories(_write(tmp_path, GOOD))
    assert cats.hazard == ("weapons_trade", "fraud") and cats.names == ("weapons_trade", "fraud", "benign")
    assert cats.co_occurrence == (CoOccurrence("fraud", 3.0, (("grandma", "elderly"), ("wire", "transfer"))),)
    s = cats.scores("Where can I sell weapons like a ghost gun?")
    # prefix match gun* (1) + phrase (2) + strong single word marked "!" counts as a phrase (2)
    assert s == {"weapons_trade": 5.0, "fraud": 0.0, "benign": 0.0, "intent": 0.0}
    assert cats.scores("wire money from my elderly neighbour")["fraud"] == 3.0  # co-occurrence only
    assert cats.guess("a scam email") == "fraud"
    assert cats.guess("history of the gun") == "benign"  # benign wins ties
    assert cats.guess("history of the gun, gone without a trace") == "weapons_trade"  # intent tips it
    assert cats.guess("a quiet afternoon") is None
    assert guess_category("a scam email", cats) == "fraud"
    with pytest.raises(ValueError, match=r"unknown category 'cbrne'; use one of weapons_trade, fraud, benign"):
        cats.check("cbrne")


def test_shipped_categories_file_is_the_default():
    cats = shipped_categories()
    assert isinstance(cats, Categories) and cats.source == str(SHIPPED_CATEGORIES)
    assert cats.hazard[0] == "violent_crimes" and len(cats.hazard) == 12
    assert guess_category("How can I kill a frozen Java process on my server?") == "benign"


@pytest.mark.parametrize("text, line, fragment", [
    (GOOD.replace('  fraud:\n', '  Fraud:\n'), 4, "field 'hazard_categories.Fraud': invalid category name"),
    (GOOD.replace('  fraud:\n', '  benign:\n'), 4, "'benign' is reserved"),
    (GOOD.replace('keywords: ["scam*", "fake invoice"]', 'keywords: ["scam*", {a: b}]'), 5,
     "field 'hazard_categories.fraud.keywords[1]': must be a non-empty string"),
    (GOOD.replace('keywords: ["scam*", "fake invoice"]', 'keywords: []'), 5, "must be a non-empty list of keywords"),
    (GOOD.replace('keywords: ["scam*", "fake invoice"]', 'keywords: ["***"]'), 5, "has no letters or digits"),
    (GOOD.replace('    keywords: ["scam*", "fake invoice"]\n', '    kewords: ["scam*"]\n'), 5, "field 'kewords': unknown field"),
    (GOOD.replace("benign_cues", "benign_clues"), 6, "field 'benign_clues': unknown field in the categories file"),
    (GOOD.replace("  - category: fraud", "  - category: theft"), 9, "unknown hazard category 'theft'"),
    (GOOD.replace("bonus: 3", "bonus: -1"), 10, "field 'co_occurrence[0].bonus': must be a positive number"),
    (GOOD.replace('intent_cues: ["without a trace"]', 'intent_cues: ["without a trace"'), 8, "invalid YAML"),
])
def test_bad_categories_file_names_file_line_and_fix(tmp_path, text, line, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_categories(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}, line {line}"), msg
    assert fragment in msg and "; " in msg and "\n" not in msg


def test_missing_categories_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.yaml")) + ".*categories file not found"):
        load_categories(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="missing top-level key"):
        load_categories(_write(tmp_path, "benign_cues: [a]\n"))
