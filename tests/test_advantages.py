"""Tests for cada_jax.training.advantages against plain-loop numpy re-computations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cada_jax.training import advantages as A
from cada_jax.training.advantages import DynamicSampler, SamplerExhaustedError, group_has_signal

REWARDS = np.array([1.0, 0.0, 0.5, 0.25, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.0, 1.5], dtype=np.float32)
G = 4


def loop_grpo(rewards, g, normalize_std, eps, ddof):
    out = []
    for start in range(0, len(rewards), g):
        grp = [float(x) for x in rewards[start : start + g]]
        mean = sum(grp) / g
        var = sum((x - mean) ** 2 for x in grp) / (g - ddof)
        for x in grp:
            out.append((x - mean) / (math.sqrt(var) + eps) if normalize_std else x - mean)
    return np.array(out)


def loop_rloo(rewards, g):
    out = []
    for start in range(0, len(rewards), g):
        grp = [float(x) for x in rewards[start : start + g]]
        for i, x in enumerate(grp):
            others = [y for j, y in enumerate(grp) if j != i]
            out.append(x - sum(others) / len(others))
    return np.array(out)


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("ddof", [0, 1])
def test_grpo_matches_loops(normalize_std, ddof):
    got = np.asarray(A.grpo_advantages(jnp.asarray(REWARDS), G, normalize_std=normalize_std, ddof=ddof))
    want = loop_grpo(REWARDS, G, normalize_std, 1e-6, ddof)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # zero-variance group (the second) gets exactly zero, no NaN
    assert np.all(got[4:8] == 0.0)


def test_rloo_matches_loops():
    got = np.asarray(A.compute_advantages("rloo", jnp.asarray(REWARDS), G))
    np.testing.assert_allclose(got, loop_rloo(REWARDS, G), rtol=1e-5, atol=1e-6)
    # rloo is the unnormalised grpo advantage scaled by G / (G - 1)
    np.testing.assert_allclose(got, loop_grpo(REWARDS, G, False, 0.0, 0) * G / (G - 1), rtol=1e-5, atol=1e-6)


def test_registry_lookup_and_jit():
    assert {"grpo", "rloo"} <= set(A.available_advantages())
    fn = A.get_advantage("grpo")
    jitted = jax.jit(fn, static_argnums=1, static_argnames=("normalize_std",))
    got = np.asarray(jitted(jnp.asarray(REWARDS), G, normalize_std=False))
    np.testing.assert_allclose(got, loop_grpo(REWARDS, G, False, 0.0, 0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'; registered: .*grpo.*rloo"):
        A.get_advantage("ppo")


@A.register_advantage("test_max_baseline")
def _max_baseline(rewards_B, group_size, *, scale=1.0):
    r = jnp.asarray(rewards_B, jnp.float32).reshape(-1, group_size)
    return (scale * (r - r.max(axis=1, keepdims=True))).reshape(-1)


def test_register_your_own_estimator():
    got = np.asarray(A.compute_advantages("test_max_baseline", REWARDS, G, scale=2.0))
    want = []
    for start in range(0, len(REWARDS), G):
        grp = list(REWARDS[start : start + G])
        want += [2.0 * (x - max(grp)) for x in grp]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="already registered"):
        A.register_advantage("rloo")(_max_baseline)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_divisibility_error_is_explicit(name):
    with pytest.raises(ValueError, match=r"11 entries, not a positive multiple of group_size=4.*contiguous") as e:
        A.compute_advantages(name, REWARDS[:11], 4)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="1-D"):
        A.compute_advantages(name, REWARDS.reshape(3, 4), 4)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        A.compute_advantages(name, REWARDS, 0)


def test_rloo_needs_two_samples_and_grpo_options_checked():
    with pytest.raises(ValueError, match="rloo needs group_size >= 2"):
        A.rloo_advantages(REWARDS, 1)
    with pytest.raises(ValueError, match="ddof"):
        A.grpo_advantages(REWARDS, G, ddof=2)
    with pytest.raises(ValueError, match="eps"):
        A.grpo_advantages(REWARDS, G, eps=-1.0)


# ----------------------------------------------------------------------------- dynamic sampling


def test_group_has_signal():
    flags = group_has_signal(REWARDS, G)
    want = []
    for start in range(0, len(REWARDS), G):
        grp = list(REWARDS[start : start + G])
        want.append(max(grp) - min(grp) > 1e-6)
    assert flags.dtype == bool and list(flags) == want == [True, False, True]
    assert list(group_has_signal([0.0, 1e-8, 1.0, 1.0], 2)) == [False, False]
    assert list(group_has_signal([0.0, 1e-8, 1.0, 1.0], 2, tol=0.0)) == [True, False]
    with pytest.raises(ValueError, match="not a positive multiple"):
        group_has_signal(REWARDS[:10], G)
    with pytest.raises(ValueError, match="NaN or inf"):
        group_has_signal([0.0, np.nan], 2)


def _round(tag, rewards_per_group):
    groups = [{"id": f"{tag}{k}", "tokens": np.zeros((len(r), 3), np.int32)} for k, r in enumerate(rewards_per_group)]
    return groups, np.array(rewards_per_group, dtype=np.float32)


def test_dynamic_sampler_drops_flat_groups_and_refills_across_rounds():
    s = DynamicSampler(max_rounds=3)
    target = 3
    rounds = [
        _round("a", [[1, 1, 1], [0, 1, 0], [0, 0, 0]]),  # 1 kept
        _round("b", [[1, 1, 1], [0, 0, 0]]),  # 0 kept
        _round("c", [[1, 0, 1], [0.5, 0.5, 0.5], [0, 0, 1], [1, 0, 0]]),  # 3 kept -> 4 buffered
    ]
    used = 0
    while not s.ready(target):
        groups, rewards = rounds[used]
        s.add(groups, rewards)
        used += 1
    assert used == 3
    batch = s.take(target)
    assert [g["id"] for g in batch] == ["a1", "c0", "c2"]
    st = s.stats()
    assert st["total_rounds"] == 3 and st["rounds"] == 0
    assert st["groups_seen"] == 9 and st["groups_kept"] == 4 and st["groups_dropped"] == 5
    assert st["surplus_dropped"] == 1 and st["buffered"] == 0  # surplus discarded by default


def test_dynamic_sampler_keep_surplus_and_rewards_from_groups():
    s = DynamicSampler(max_rounds=0, keep_surplus=True)
    groups = [
        SimpleNamespace(name="x", rewards=np.array([0.0, 1.0])),
        {"name": "y", "rewards": [2.0, 2.0]},
        {"name": "z", "rewards": [0.0, 3.0]},
    ]
    assert s.add(groups) == 2
    assert [g.name if hasattr(g, "name") else g["name"] for g in s.take(1)] == ["x"]
    assert len(s) == 1 and s.stats()["surplus_dropped"] == 0
    assert s.ready(1)
    assert s.take(1)[0]["name"] == "z"
    with pytest.raises(ValueError, match="cannot find rewards"):
        s.add([object()])
    with pytest.raises(ValueError, match="2 groups but 1 reward arrays"):
        s.add([1, 2], [[0.0, 1.0]])


def test_dynamic_sampler_exhaustion_error_mode():
    s = DynamicSampler(max_rounds=2, on_exhausted="error")
    calls = 0
    with pytest.raises(SamplerExhaustedError, match=r"only 1 of 4 groups .* after 3 sampling rounds .*max_rounds=2"):
        while not s.ready(4):
            groups, rewards = _round(f"r{calls}", [[0, 0], [1, 0]] if calls == 0 else [[1, 1], [2, 2]])
            s.add(groups, rewards)
            calls += 1
    assert calls == 3  # the first round + max_rounds extra rounds, then it stops
    with pytest.raises(SamplerExhaustedError):
        s.take(4)


def test_dynamic_sampler_exhaustion_partial_mode():
    s = DynamicSampler(max_rounds=1, on_exhausted="partial")
    calls = 0
    while not s.ready(3):
        s.add(*_round(f"p{calls}", [[0, 1], [1, 1]]))
        calls += 1
    assert calls == 2
    batch = s.take(3)
    assert [g["id"] for g in batch] == ["p00", "p10"]
    assert s.stats()["partial_takes"] == 1
    # a new step starts with a fresh round budget
    assert not s.ready(1) and not s.exhausted
    with pytest.raises(RuntimeError, match="call add\\(\\) until ready"):
        s.take(1)
    # nothing with signal at all: partial returns an empty list
    s2 = DynamicSampler(max_rounds=0, on_exhausted="partial")
    s2.add(*_round("q", [[1, 1]]))
    assert s2.ready(2) and s2.take(2) == []


def test_dynamic_sampler_exhaustion_pad_mode():
    s = DynamicSampler(max_rounds=1, on_exhausted="pad")
    calls = 0
    while not s.ready(3):
        s.add(*_round(f"p{calls}", [[0, 1], [1, 1]]))
        calls += 1
    assert calls == 2
    # the two groups with signal, then the latest flat group of the step
    assert [g["id"] for g in s.take(3)] == ["p00", "p10", "p11"]
    st = s.stats()
    assert st["groups_padded"] == 1 and st["groups_dropped"] == 1 and st["partial_takes"] == 0
    s.add(*_round("q", [[1, 1], [2, 2], [0, 1]]))
    assert s.ready(1) and [g["id"] for g in s.take(1)] == ["q2"] and s.stats()["groups_padded"] == 1


def test_dynamic_sampler_bad_config():
    with pytest.raises(ValueError, match="on_exhausted"):
        DynamicSampler(on_exhausted="retry")
    with pytest.raises(ValueError, match="max_rounds"):
        DynamicSampler(max_rounds=-1)
    with pytest.raises(ValueError, match="target_groups"):
        DynamicSampler().ready(0)
