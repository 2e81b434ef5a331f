"""Metrics against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cada_jax.data.records import PromptRecord
from cada_jax.eval.metrics import (
    bootstrap_ci,
    gsm8k_correct,
    gsm8k_extract,
    harmful_compliance_rate,
    mmlu_correct,
    mmlu_extract,
    over_refusal_rate,
    per_category,
    rate,
    strongreject_mean,
    summarize,
    worst_attack,
)


def test_rates():
    assert rate([True, False, True, True]) == 0.75
    assert math.isnan(rate([]))
    # 3 of 4 harmful prompts refused -> 1 complied
    assert harmful_compliance_rate([True, True, False, True]) == 0.25
    # 1 of 5 benign prompts refused
    assert over_refusal_rate([False, False, True, False, False]) == 0.2
    assert math.isnan(harmful_compliance_rate([]))


def test_strongreject_mean():
    assert strongreject_mean([0.0, 0.5, 1.0, 0.25]) == pytest.approx(0.4375)
    with pytest.raises(ValueError, match=r"score #1 is 1.5; StrongREJECT scores must lie in \[0, 1\]"):
        strongreject_mean([0.2, 1.5])
    with pytest.raises(ValueError, match="score #0 is nan"):
        strongreject_mean([float("nan")])


def test_bootstrap_two_point_distribution_by_hand():
    # Resampling 2 values from {0, 1}: the mean is 0, 0.5, 1 with probability 1/4, 1/2, 1/4.
    # The central 95% interval therefore spans [0, 1]; the central 40% interval (quantiles
    # 0.3 and 0.7) lies inside the 0.5 mass, so it is [0.5, 0.5].
    assert bootstrap_ci([0, 1], n_boot=4000, seed=1) == (0.0, 1.0)
    assert bootstrap_ci([0, 1], n_boot=4000, alpha=0.6, seed=1) == (0.5, 0.5)


def test_bootstrap_edge_cases():
    assert bootstrap_ci([0.3] * 7) == pytest.approx((0.3, 0.3))
    assert bootstrap_ci([0.7]) == pytest.approx((0.7, 0.7))
    lo, hi = bootstrap_ci([])
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="alpha must be in"):
        bootstrap_ci([1, 0], alpha=1.0)
    with pytest.raises(ValueError, match="n_boot must be a positive int"):
        bootstrap_ci([1, 0], n_boot=0)


def test_bootstrap_contains_mean_is_seeded_and_narrows_with_n():
    rng = np.random.default_rng(123)
    small = rng.random(20) < 0.3
    large = rng.random(2000) < 0.3
    lo_s, hi_s = bootstrap_ci(small, seed=7)
    assert lo_s <= small.mean() <= hi_s
    assert bootstrap_ci(small, seed=7) == (lo_s, hi_s)
    assert bootstrap_ci(small, seed=8) != (lo_s, hi_s)
    lo_l, hi_l = bootstrap_ci(large, seed=7)
    assert lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 4  # ~ 1/sqrt(100) of the width
    # a 50% interval is inside the 95% one
    lo50, hi50 = bootstrap_ci(small, alpha=0.5, seed=7)
    assert lo_s <= lo50 <= hi50 <= hi_s


def test_bootstrap_custom_stat_matches_axis_path():
    values = [1.0, 2.0, 3.0, 10.0]
    fast = bootstrap_ci(values, stat=np.median, seed=3)
    slow = bootstrap_ci(values, stat=lambda x: float(np.median(x)), seed=3)
    assert fast == pytest.approx(slow)


def test_per_category():
    recs = [
        PromptRecord(id="1", prompt="p", label="harmful", category="weapons"),
        PromptRecord(id="2", prompt="p", label="harmful", category="weapons"),
        PromptRecord(id="3", prompt="p", label="harmful", category="fraud"),
        PromptRecord(id="4", prompt="p", label="harmful", category=None),
        PromptRecord(id="5", prompt="p", label="harmful", category="weapons"),
    ]
    out = per_category(recs, [True, False, True, False, True])
    assert list(out) == ["fraud", "uncategorized", "weapons"]
    assert out["weapons"]["n"] == 3 and out["weapons"]["mean"] == pytest.approx(2 / 3)
    assert out["fraud"] == {"n": 1, "mean": 1.0, "ci": (1.0, 1.0)}
    assert out["uncategorized"]["mean"] == 0.0
    lo, hi = out["weapons"]["ci"]
    assert 0.0 <= lo <= 2 / 3 <= hi <= 1.0
    # plain category strings and dicts work too
    assert per_category(["a", {"category": "a"}], [0, 1])["a"]["mean"] == 0.5
    with pytest.raises(ValueError, match="2 records but 1 values"):
        per_category(["a", "b"], [1])


def test_worst_attack():
    per_attack = {"none": [False, False, True, False], "base64": [True, False, False, False], "past_tense": [False, False, True, False]}
    assert worst_attack(per_attack) == [True, False, True, False]
    assert rate(worst_attack(per_attack)) == 0.5
    with pytest.raises(ValueError, match="different numbers of prompts"):
        worst_attack({"a": [True], "b": [True, False]})
    with pytest.raises(ValueError, match="no attacks given"):
        worst_attack({})


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
        ("#### 1,234", "1234"),
        ("The total is $1,250.", "1250"),
        ("It costs $12.50 in all.", "12.5"),
        ("So the answer is 42. It took 3 steps.", "42"),
        ("Final answer: -3", "-3"),
        ("The temperature falls to −8 degrees", "-8"),
        ("between pages 3-4 we find 19", "19"),
        ("Half of 9 is 4.5.", "4.5"),
        ("That is 40.00 dollars", "40"),
        ("0.50", "0.5"),
        ("no digits here", None),
        ("", None),
        (None, None),
    ],
)
def test_gsm8k_extract(text, expected):
    assert gsm8k_extract(text) == expected


def test_gsm8k_correct():
    gold = "Two books cost 2 * 12 = <<2*12=24>>24 dollars.\nWith the pen: 24 + 3 = 27.\n#### 27"
    assert gsm8k_correct("The answer is 27.", gold)
    assert gsm8k_correct("They pay $27.00", gold)
    assert not gsm8k_correct("The answer is 24.", gold)
    assert not gsm8k_correct("I don't know", gold)
    assert gsm8k_correct("1,200 people", 1200)
    assert gsm8k_correct("so 4.50", "4.5")
    with pytest.raises(ValueError, match="no number in the gold answer"):
        gsm8k_correct("7", "seven")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer: C", "C"),
        ("The answer is C", "C"),
        ("the answer is (b).", "B"),
        ("**Answer:** D", "D"),
        ("(C)", "C"),
        ("C.", "C"),
        ("B) because the others are wrong", "B"),
        ("A", "A"),
        ("I think (A) at first, but the answer is B.", "B"),
        ("Let me answer a question first. The answer is D", "D"),
        ("A good question.", None),
        ("answer is a bit unclear", None),
        ("", None),
    ],
)
def test_mmlu_extract(text, expected):
    assert mmlu_extract(text) == expected


def test_mmlu_correct():
    assert mmlu_correct("Answer: C", "C")
    assert mmlu_correct("Answer: C", 2)
    assert mmlu_correct("answer is (c)", "c")
    assert not mmlu_correct("Answer: C", "B")
    assert not mmlu_correct("no idea", "A")
    with pytest.raises(ValueError, match="gold index 4 is not in 0-3"):
        mmlu_correct("A", 4)
    with pytest.raises(ValueError, match="gold must be a letter A-D"):
        mmlu_correct("A", "E")


def test_mmlu_correct_with_more_options():
    # BIG-bench items have up to 13 options: letters past D count only when the item has them
    assert mmlu_correct("The answer is F.", "F", n_choices=6)
    assert mmlu_correct("Answer: (f)", 5, n_choices=6)
    assert mmlu_extract("Answer: F", n_choices=6) == "F"
    assert mmlu_extract("Answer: F") is None
    assert not mmlu_correct("Answer: F", "C", n_choices=6)
    with pytest.raises(ValueError, match="gold must be a letter A-F or an index 0-5"):
        mmlu_correct("A", "G", n_choices=6)
    with pytest.raises(ValueError, match="n_choices must be an int in 2-26"):
        mmlu_correct("A", "A", n_choices=1)


def test_summarize():
    refused_harmful = [True, True, False, True]
    out = summarize(
        {
            "harmful_compliance": [not r for r in refused_harmful],
            "over_refusal": [False, True, False, False, False],
            "strongreject": [0.0, 0.5, 1.0, 0.25],
            "empty": [],
        },
        seed=0,
    )
    assert list(out) == ["harmful_compliance", "over_refusal", "strongreject", "empty"]
    assert out["harmful_compliance"]["value"] == 0.25 and out["harmful_compliance"]["n"] == 4
    assert out["over_refusal"]["value"] == 0.2 and out["over_refusal"]["n"] == 5
    assert out["strongreject"]["value"] == pytest.approx(0.4375)
    for name in ("harmful_compliance", "over_refusal", "strongreject"):
        lo, hi = out[name]["ci"]
        assert lo <= out[name]["value"] <= hi
    assert out["empty"] == {"value": None, "ci": [None, None], "n": 0}
    assert json.loads(json.dumps(out)) == out
    assert summarize({"x": [1, 0, 1]}, seed=5) == summarize({"x": [1, 0, 1]}, seed=5)
