"""Multiple-choice scoring by log-likelihood against transformers on the tiny Llama."""

from __future__ import annotations

import numpy as np
import pytest

from cada_jax.data.records import PromptRecord
from cada_jax.eval import likelihood
from cada_jax.eval.likelihood import choice_logprobs, mc_accuracy, mc_context
from cada_jax.eval.metrics import bootstrap_ci

RECORDS = [
    PromptRecord(id="q0", prompt="How many legs does a cat have?", label="utility", source="t",
                 answer="B", choices=["two", "four", "six"], meta={"question": "How many legs does a cat have?"}),
    PromptRecord(id="q1", prompt="What colour is the sky on a clear day? A long question to vary the context length.",
                 label="utility", source="t", answer="A", choices=["blue", "green", "a very long answer option with many words", "red", "grey"]),
    PromptRecord(id="q2", prompt="2 + 2 =", label="utility", source="t", answer="D", choices=["3", "5", "22", "4"]),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from cada_jax.checkpoints.hf import load_params
    from cada_jax.tokenizer import Tokenizer

    params, cfg = load_params(tiny_model_dir)
    return params, cfg, Tokenizer(tiny_model_dir)


def _reference(model_dir, tok, records):
    """transformers: log-softmax of the logits over [context | option] ids, summed over the option."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for r in records:
        ctx = tok.encode(mc_context(r), add_special_tokens=True)
        row = []
        for option in r.choices:
            opt = tok.encode(" " + option, add_special_tokens=False)
            ids = torch.tensor([ctx + opt])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            row.append(float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(opt))))
        out.append(row)
    return out


def test_context_uses_the_bare_question():
    assert mc_context(RECORDS[0]) == "Question: How many legs does a cat have?\nAnswer:"
    mmlu_like = PromptRecord(id="m", prompt="Q?\n\nA. x\nB. y", label="utility", answer="A", choices=["x", "y"],
                             meta={"question": "Q?"})
    assert mc_context(mmlu_like) == "Question: Q?\nAnswer:"


def test_choice_logprobs_match_transformers(tiny, tiny_model_dir):
    params, cfg, tok = tiny
    ref = _reference(tiny_model_dir, tok, RECORDS)
    # batch_size 4 over 12 (record, option) pairs: several batches, the last one padded
    got = choice_logprobs(params, cfg, tok, RECORDS, batch_size=4)
    assert [len(g) for g in got] == [len(r.choices) for r in RECORDS]
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(ref), rtol=1e-4, atol=1e-4)
    again = choice_logprobs(params, cfg, tok, RECORDS[::-1], batch_size=16)  # order and batching do not matter
    np.testing.assert_allclose(np.concatenate(again[::-1]), np.concatenate(got), rtol=1e-5, atol=1e-5)


def test_mc_accuracy_picks_the_argmax(tiny, monkeypatch):
    params, cfg, tok = tiny
    scores = choice_logprobs(params, cfg, tok, RECORDS)
    picked = ["ABCDE"[int(np.argmax(s))] for s in scores]
    res = mc_accuracy(params, cfg, tok, RECORDS)
    assert res["predicted"] == picked
    assert res["correct"] == [p == r.answer for p, r in zip(picked, RECORDS)]
    assert res["n"] == 3 and res["accuracy"] == pytest.approx(np.mean(res["correct"]))
    assert res["ci95"] == list(bootstrap_ci(res["correct"]))

    # by hand, with fixed scores: ties go to the first option, several gold letters all count
    fixed = [[-3.0, -1.0, -2.0], [-1.0, -1.0, -5.0, -9.0, -9.0], [-4.0, -3.0, -2.0, -2.5], [-1.0, -2.0, -3.0, -4.0]]
    monkeypatch.setattr(likelihood, "choice_logprobs", lambda *a, **k: fixed)
    several = PromptRecord(id="q2b", prompt="x", label="utility", answer="D", choices=["3", "5", "22", "4"],
                           meta={"answers": ["D", "C"]})
    res = mc_accuracy(params, cfg, tok, [RECORDS[0], RECORDS[1], several, RECORDS[2]])
    assert res["predicted"] == ["B", "A", "C", "A"]
    assert res["correct"] == [True, True, True, False]
    assert res["accuracy"] == pytest.approx(0.75) and res["n"] == 4
    lo, hi = res["ci95"]
    assert 0.0 <= lo <= 0.75 <= hi <= 1.0


def test_bad_records(tiny):
    params, cfg, tok = tiny
    plain = PromptRecord(id="p", prompt="hi", label="utility", answer="A")
    with pytest.raises(ValueError, match="record 'p' .*no choices to score"):
        choice_logprobs(params, cfg, tok, [plain])
    wrong = PromptRecord(id="w", prompt="hi", label="utility", answer="E", choices=["a", "b"], source="s")
    with pytest.raises(ValueError, match=r"record 'w' \(s\): answer 'E' is not an option letter A-B"):
        mc_accuracy(params, cfg, tok, [wrong])
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        choice_logprobs(params, cfg, tok, RECORDS, batch_size=0)
