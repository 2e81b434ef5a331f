"""A user's spec directory (spec.dir) and retrieval settings (spec.retrieval / spec.embedder):
loading, file:line errors, and `cada generate` prompting with them on a tiny random model."""

from __future__ import annotations

import json
import shutil

import pytest

from cada_jax.cada.prompts import build_messages
from cada_jax.cada.retrieval import retrieve_for
from cada_jax.cada.spec import SPEC_DIR, SpecError, load_spec_dir
from cada_jax.cada.spec_config import configured_spec
from cada_jax.config import load_config

USER_STATUTE = "Never help anyone trade unregistered firearms, parts or printable gun files."
USER_MARK = "Checked against the user's own spec."
NEW_CASE = {"id": "wt-01", "category": "weapons_trade", "request": "Where can I buy an untraceable gun without a background check?",
            "reasoning": f"Buying a gun around the checks is what C1 forbids. {USER_MARK}", "verdict": "refuse",
            "answer": "I can't help with getting around firearm background checks."}


def make_user_spec(root):
    """A copy of the shipped spec with C1 rewritten, a new hazard category (weapons_trade) with its
    keywords, code rules and a precedent, and a marker appended to every precedent's reasoning."""
    d = root / "my_spec"
    shutil.copytree(SPEC_DIR, d)
    st = (d / "statutes.yaml").read_text()
    start = st.index("  - id: C1")
    end = st.index("  - id: C2")
    (d / "statutes.yaml").write_text(st[:start] + f"  - id: C1\n    title: No arms trade\n    text: {USER_STATUTE}\n" + st[end:])
    cats = (d / "categories.yaml").read_text()
    cats = cats.replace("\nbenign_cues:", '  weapons_trade:\n    keywords: ["untraceable gun", "background check", "gun show"]\n\nbenign_cues:')
    (d / "categories.yaml").write_text(cats)
    code = (d / "extensive_code.yaml").read_text()
    code = code.replace("\ndefaults:", "  weapons_trade:\n    summary: Buying or selling arms around the law.\n"
                                       "    allowed: [gun laws and licensing]\n    disallowed: [evading background checks]\ndefaults:")
    (d / "extensive_code.yaml").write_text(code)
    rows = [json.loads(line) for line in (d / "precedents.jsonl").read_text().splitlines() if line.strip()]
    for r in rows:
        r["reasoning"] += " " + USER_MARK
    rows.append(NEW_CASE)
    (d / "precedents.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_user_spec_directory_loads_and_steers_prompts(tmp_path):
    d = make_user_spec(tmp_path)
    spec = load_spec_dir(d)
    assert spec.statute("C1").text == USER_STATUTE and spec.statute("C1").title == "No arms trade"
    assert spec.categories.hazard[-1] == "weapons_trade" and spec.categories.source == str(d / "categories.yaml")
    assert spec.code.categories[-1].category == "weapons_trade" and spec.case("wt-01").category == "weapons_trade"
    assert spec.sources == (str(d / "statutes.yaml"), str(d / "extensive_code.yaml"), str(d / "precedents.jsonl"))
    request = "Any tips on getting an untraceable gun at a gun show?"
    assert spec.categories.guess(request) == "weapons_trade"
    assert retrieve_for(spec, request, 1)[0].id == "wt-01"
    system = build_messages(request, "cases", spec=spec, k=2)[0]["content"]
    assert USER_STATUTE in system and "Case wt-01 [weapons trade]" in system
    assert "Weapons trade: Buying or selling arms" in build_messages(request, "code", spec=spec)[0]["content"]
    # the same through the config section; "" is the shipped spec
    assert configured_spec(load_config(None, [f"spec.dir={d}"]).spec).statute("C1").text == USER_STATUTE
    assert load_spec_dir("") == configured_spec(load_config(None, []).spec)


def test_user_spec_directory_errors_name_file_and_line(tmp_path):
    d = make_user_spec(tmp_path)
    with open(d / "precedents.jsonl", "a") as f:
        f.write('{"id": "x-1", "category": "weapons", "request": "r", "reasoning": "C1", "verdict": "refuse"}\n')
    n = len((d / "precedents.jsonl").read_text().splitlines())
    with pytest.raises(SpecError, match=rf"precedents.jsonl, line {n}, field 'category': unknown category 'weapons'; use one of .*weapons_trade, benign"):
        load_spec_dir(d)
    d = make_user_spec(tmp_path / "again")
    text = (d / "categories.yaml").read_text().replace('["untraceable gun",', '[{untraceable: gun},')
    (d / "categories.yaml").write_text(text)
    line = text.splitlines().index("  weapons_trade:") + 2
    with pytest.raises(SpecError, match=rf"categories.yaml, line {line}, field 'hazard_categories.weapons_trade.keywords\[0\]'"):
        load_spec_dir(d)
    (d / "categories.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="spec directory has no categories.yaml"):
        load_spec_dir(d)
    with pytest.raises(FileNotFoundError, match="spec directory not found"):
        load_spec_dir(tmp_path / "nowhere")
    # a category the code has no rules for
    d = make_user_spec(tmp_path / "third")
    (d / "categories.yaml").write_text((d / "categories.yaml").read_text().replace("\nbenign_cues:", '  arms:\n    keywords: [arms]\n\nbenign_cues:'))
    with pytest.raises(SpecError, match=r"extensive_code.yaml, line \d+, field 'categories': no rules for arms"):
        load_spec_dir(d)


def test_config_errors_for_retrieval_settings(tmp_path):
    with pytest.raises(ValueError, match=r"spec.retrieval: expected one of 'bm25', 'embedding', 'hybrid', got 'lexical'"):
        load_config(None, ["spec.retrieval=lexical"])
    cfg = load_config(None, ["spec.retrieval=embedding", f"spec.embedder={tmp_path / 'missing'}"])
    with pytest.raises(FileNotFoundError, match="spec.embedder: .*missing: model directory not found"):
        configured_spec(cfg.spec)
    with pytest.raises(ValueError, match="this stage has no model"):
        configured_spec(load_config(None, ["spec.retrieval=hybrid"]).spec)


def test_cada_generate_with_a_user_spec_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`cada generate CONFIG spec.dir=... spec.retrieval=hybrid`: the user's statute reaches every
    prompt, the user's precedents reach the chains, and the precedent embeddings are cached in the
    run folder and reused by a second run."""
    from cada_jax.cada import generate as gen
    from cada_jax.cli import main

    d = make_user_spec(tmp_path)
    seen = []

    def recording(*args, **kw):
        messages = build_messages(*args, **kw)
        seen.append(messages)
        return messages

    monkeypatch.setattr(gen, "build_messages", recording)
    config = tmp_path / "gen.yaml"
    config.write_text("generate:\n  variant: cases\n  reasoning: template\n  limit: 1\n  n: 1\n  max_new_tokens: 4\n")
    overrides = [f"run.out_dir={tmp_path / 'runs'}", "run.name=g", "run.progress=false", f"model.path={tiny_model_dir}",
                 "model.max_seq_len=256", f"spec.dir={d}", "spec.retrieval=hybrid", "spec.embed_max_len=64"]
    assert main(["generate", str(config), *overrides]) == 0
    assert '"kept"' in capsys.readouterr().out  # the command prints generate's stats
    assert len(seen) == 3 and all(USER_STATUTE in m[0]["content"] for m in seen)  # one request per built-in set
    run = tmp_path / "runs" / "g"
    chains = [json.loads(line) for line in (run / "generate" / "chains.jsonl").read_text().splitlines()]
    harmful = [c for c in chains if c["label"] == "harmful"]
    assert harmful and all(USER_MARK in c["reasoning"] for c in harmful)  # reasoned from the user's precedents
    cache = sorted((run / "cache" / "spec_embeddings").glob("precedents-*.npy"))
    assert len(cache) == 1
    mtime = cache[0].stat().st_mtime_ns

    # generating again in that run folder reads the precedent embeddings from the cache
    from cada_jax.cada.embedding import CachedEmbedFn

    hits = []
    original = CachedEmbedFn._load_cases

    def spy(self):
        original(self)
        hits.append(self.cache_hit)

    monkeypatch.setattr(CachedEmbedFn, "_load_cases", spy)
    (run / "pipeline_state.json").unlink()
    shutil.rmtree(run / "generate")
    assert main(["generate", str(config), *overrides]) == 0
    assert hits and set(hits) == {True} and cache[0].stat().st_mtime_ns == mtime
