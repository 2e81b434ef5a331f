"""Invariants of the built-in prompt sets and their loader."""

from __future__ import annotations

import collections
import json
import re

import pytest

from cada_jax.cada.spec import BENIGN, HAZARD_CATEGORIES, load_precedents
from cada_jax.data.builtin import (
    BUILTIN_SETS,
    SPLITS,
    BuiltinDataError,
    builtin_mix,
    load_builtin,
    read_prompt_file,
)

EXPECTED = {("harmful", "train"): 120, ("harmful", "test"): 60, ("benign", "train"): 60,
            ("benign", "test"): 30, ("lookalike", "train"): 60, ("lookalike", "test"): 30}


def _norm(text):
    return " ".join(re.findall(r"\w+", text.lower()))


@pytest.fixture(scope="module")
def sets():
    return {(name, split): load_builtin(name, split) for name in BUILTIN_SETS for split in SPLITS}


def test_counts(sets):
    assert {key: len(recs) for key, recs in sets.items()} == EXPECTED


def test_harmful_prompts_cover_every_category_evenly(sets):
    for split, per_category in (("train", 10), ("test", 5)):
        counts = collections.Counter(r["category"] for r in sets["harmful", split])
        assert counts == {cat: per_category for cat in HAZARD_CATEGORIES}


def test_lookalikes_resemble_every_category(sets):
    for split in SPLITS:
        resembles = collections.Counter(r["resembles"] for r in sets["lookalike", split])
        assert set(resembles) == set(HAZARD_CATEGORIES), split


def test_labels_and_categories_are_consistent(sets):
    for (name, _), recs in sets.items():
        for r in recs:
            if name == "harmful":
                assert r["label"] == "harmful" and r["category"] in HAZARD_CATEGORIES
            else:
                assert r["label"] == "benign" and r["category"] == BENIGN
            assert ("resembles" in r) == (name == "lookalike")


def test_ids_and_prompts_are_unique_and_splits_disjoint(sets):
    all_records = [r for recs in sets.values() for r in recs]
    ids = [r["id"] for r in all_records]
    assert len(set(ids)) == len(ids)
    prompts = [_norm(r["prompt"]) for r in all_records]
    assert len(set(prompts)) == len(prompts)
    train = {_norm(r["prompt"]) for name in BUILTIN_SETS for r in sets[name, "train"]}
    test = {_norm(r["prompt"]) for name in BUILTIN_SETS for r in sets[name, "test"]}
    assert not train & test


def test_no_prompt_repeats_a_precedent(sets):
    precedents = {_norm(c.request) for c in load_precedents()}
    overlap = [r["prompt"] for recs in sets.values() for r in recs if _norm(r["prompt"]) in precedents]
    assert overlap == []


def test_builtin_mix_concatenates_the_three_sets(sets):
    for split in SPLITS:
        mix = builtin_mix(split)
        assert mix == sets["harmful", split] + sets["benign", split] + sets["lookalike", split]
        assert collections.Counter(r["label"] for r in mix) == {
            "harmful": EXPECTED["harmful", split],
            "benign": EXPECTED["benign", split] + EXPECTED["lookalike", split],
        }


def test_loaded_records_are_fresh_copies():
    first = load_builtin("benign", "test")
    first[0]["prompt"] = "changed"
    assert load_builtin("benign", "test")[0]["prompt"] != "changed"


def test_unknown_names_and_splits_are_rejected():
    with pytest.raises(ValueError, match="unknown built-in prompt set 'toxic'; use one of harmful, benign, lookalike"):
        load_builtin("toxic", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'.*use one of train, test"):
        load_builtin("harmful", "dev")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        builtin_mix("val")


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


GOOD = {"id": "1", "prompt": "p", "category": "benign", "label": "benign"}


@pytest.mark.parametrize(
    "bad, field, fragment",
    [
        ({"label": "unsafe"}, "label", "use one of harmful, benign"),
        ({"category": "privacy"}, "category", "put a look-alike's hazard category in 'resembles'"),
        ({"label": "harmful"}, "category", "harmful prompt with category 'benign'"),
        ({"resembles": "Weapons!"}, "resembles", "unknown hazard category"),
        ({"prompt": ""}, "prompt", "non-empty string"),
        ({"id": "1"}, "id", "duplicate id '1' (first on line 1)"),
        ({"lable": "benign"}, "lable", "unknown field"),
    ],
)
def test_prompt_file_errors_name_file_line_and_field(tmp_path, bad, field, fragment):
    path = _write(tmp_path / "set.jsonl", [GOOD, {**GOOD, "id": "2", **bad}])
    with pytest.raises(BuiltinDataError) as err:
        read_prompt_file(path)
    msg = str(err.value)
    assert str(path) in msg and "line 2" in msg and f"field '{field}'" in msg and fragment in msg


def test_prompt_file_checks_categories_against_a_given_list(tmp_path):
    harmful = {"id": "h", "prompt": "p", "category": "weapons", "label": "harmful"}
    path = _write(tmp_path / "set.jsonl", [GOOD, {**GOOD, "id": "2", "resembles": "weapons"}, harmful])
    assert len(read_prompt_file(path)) == 3  # well-formed names pass without a list (a user spec may add categories)
    with pytest.raises(BuiltinDataError, match=r"line 2, field 'resembles': unknown hazard category 'weapons'; use one of violent_crimes"):
        read_prompt_file(path, hazard_categories=HAZARD_CATEGORIES)
    path = _write(tmp_path / "set.jsonl", [GOOD, harmful])
    with pytest.raises(BuiltinDataError, match=r"line 2, field 'category': harmful prompt with category 'weapons'"):
        read_prompt_file(path, hazard_categories=HAZARD_CATEGORIES)


def test_builtin_data_does_not_import_the_spec():
    import ast
    import pathlib

    import cada_jax.data.builtin as builtin

    tree = ast.parse(pathlib.Path(builtin.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + \
               [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("cada_jax.cada")], imported


def test_prompt_file_expected_label_and_missing_file(tmp_path):
    path = _write(tmp_path / "harmful.jsonl", [GOOD])
    with pytest.raises(BuiltinDataError, match=r"line 1, field 'label': 'benign' in a file of harmful prompts"):
        read_prompt_file(path, expected_label="harmful")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_prompt_file(tmp_path / "missing.jsonl")
