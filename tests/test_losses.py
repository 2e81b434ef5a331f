"""Tests for cada_jax.training.losses against a plain-loop numpy re-computation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cada_jax.training import losses as L
from cada_jax.training.losses import LossConfig, policy_loss, token_entropy, token_logprobs, token_logprobs_and_entropy

# ----------------------------------------------------------------------------- numpy reference


def ref_policy_loss(logp, old, adv, mask, cfg, ref=None):
    """Loops over sequences and tokens, float64; returns (loss, metrics) like policy_loss."""
    B, T = logp.shape
    lo, hi = 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high
    seq_ratio = [1.0] * B
    if cfg.ratio_level == "sequence":
        for i in range(B):
            total, n = 0.0, 0
            for t in range(T):
                if mask[i][t]:
                    total += float(logp[i][t]) - float(old[i][t])
                    n += 1
            seq_ratio[i] = math.exp(total / n) if n else 1.0
    pg = {}
    kl = {}
    n_low = n_high = n_dual = 0
    ratio_sum = 0.0
    for i in range(B):
        A = float(adv[i])
        for t in range(T):
            if not mask[i][t]:
                continue
            if cfg.ratio_level == "sequence":
                r = seq_ratio[i]
            else:
                r = math.exp(float(logp[i][t]) - float(old[i][t]))
            ratio_sum += r
            rc = min(max(r, lo), hi)
            ru = r
            if cfg.delta is not None and A < 0:
                ru = min(r, cfg.delta)
            pg[i, t] = -min(ru * A, rc * A)
            if r < lo and A < 0:
                n_low += 1
            if r > hi and A > 0:
                n_high += 1
            if cfg.delta is not None and r > cfg.delta and A < 0:
                n_dual += 1
            if ref is not None:
                d = float(ref[i][t]) - float(logp[i][t])
                if cfg.kl_estimator == "k1":
                    kl[i, t] = -d
                elif cfg.kl_estimator == "k2":
                    kl[i, t] = 0.5 * d * d
                else:
                    kl[i, t] = math.exp(d) - d - 1.0
    total_tok = {k: pg[k] + (cfg.beta * kl[k] if cfg.beta > 0 else 0.0) for k in pg}

    def aggregate(vals):
        if cfg.name == "grpo":
            seq_means = []
            for i in range(B):
                toks = [vals[i, t] for t in range(T) if (i, t) in vals]
                if toks:
                    seq_means.append(sum(toks) / len(toks))
            return sum(seq_means) / len(seq_means) if seq_means else 0.0
        if cfg.name == "dr_grpo":
            return sum(vals.values()) / (B * cfg.max_len)
        if cfg.name == "dapo":
            return sum(vals.values()) / max(len(vals), 1)
        raise AssertionError(cfg.name)

    n_valid = max(len(pg), 1)
    metrics = {
        "pg_loss": aggregate(pg),
        "kl": (sum(kl.values()) / n_valid) if ref is not None else 0.0,
        "clip_frac_low": n_low / n_valid,
        "clip_frac_high": n_high / n_valid,
        "clip_frac_dual": n_dual / n_valid,
        "ratio_mean": ratio_sum / n_valid,
    }
    return aggregate(total_tok), metrics


def make_batch(seed=0, B=4, T=6):
    """Hand-shaped batch: varied lengths incl. one fully padded row, ratios around 1."""
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 3.0, size=(B, T))
    old = logp + rng.normal(0.0, 0.3, size=(B, T))
    ref = logp + rng.normal(0.0, 0.5, size=(B, T))
    adv = np.array([1.3, -0.7, 0.4, -1.1, 0.9, -0.2][:B])
    lengths = [T, 3, 0, 5, 1, 2][:B]
    mask = np.zeros((B, T), dtype=bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return logp, old, adv, mask, ref


def run(cfg, logp, old, adv, mask, ref=None):
    f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
    loss, m = policy_loss(f32(logp), f32(old), f32(adv), jnp.asarray(mask), cfg, f32(ref))
    return float(loss), {k: float(v) for k, v in m.items()}


def assert_matches(cfg, logp, old, adv, mask, ref=None, rtol=2e-5, atol=2e-6):
    loss, m = run(cfg, logp, old, adv, mask, ref)
    want_loss, want_m = ref_policy_loss(logp, old, adv, mask, cfg, ref)
    np.testing.assert_allclose(loss, want_loss, rtol=rtol, atol=atol)
    assert set(m) == set(want_m)
    for k in want_m:
        np.testing.assert_allclose(m[k], want_m[k], rtol=rtol, atol=atol, err_msg=k)
    return loss, m


# ----------------------------------------------------------------------------- modes


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_modes_match_reference(name, ratio_level):
    logp, old, adv, mask, ref = make_batch(seed=1)
    cfg = LossConfig(name=name, ratio_level=ratio_level, beta=0.05, max_len=8)
    loss, _ = assert_matches(cfg, logp, old, adv, mask, ref)
    assert loss != 0.0


def test_modes_differ_from_each_other():
    logp, old, adv, mask, ref = make_batch(seed=2)
    losses = {
        n: run(LossConfig(name=n, max_len=8), logp, old, adv, mask, ref)[0] for n in ("grpo", "dr_grpo", "dapo")
    }
    assert len({round(v, 6) for v in losses.values()}) == 3, losses


def test_sequence_ratio_is_constant_per_sequence():
    logp, old, adv, mask, _ = make_batch(seed=3)
    cfg = LossConfig(ratio_level="sequence", beta=0.0)
    # Per-token ratio mean for a single-sequence batch equals exp(mean log ratio) of that sequence.
    i = 0
    _, m = run(cfg, logp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1])
    want = math.exp(np.mean(logp[i] - old[i]))
    np.testing.assert_allclose(m["ratio_mean"], want, rtol=1e-5)


# ----------------------------------------------------------------------------- clipping


def test_asymmetric_clip_both_bind():
    # eps_low=0.1 -> lower bound 0.9; eps_high=0.3 -> upper bound 1.3
    ratios = np.array([[0.5, 0.85, 1.0, 1.25], [2.0, 1.5, 0.7, 1.1]])
    adv = np.array([-1.0, 2.0])
    old = np.full((2, 4), -1.0)
    logp = old + np.log(ratios)
    mask = np.ones((2, 4), dtype=bool)
    cfg = LossConfig(epsilon_low=0.1, epsilon_high=0.3, beta=0.0, name="dapo")
    loss, m = assert_matches(cfg, logp, old, adv, mask)
    # row 0 (A<0): 0.5 and 0.85 are below 0.9 -> low clip binds on 2 tokens
    # row 1 (A>0): 2.0 and 1.5 are above 1.3 -> high clip binds on 2 tokens; 0.7 (below, A>0) does not bind
    assert m["clip_frac_low"] == pytest.approx(2 / 8)
    assert m["clip_frac_high"] == pytest.approx(2 / 8)
    # hand value: row 0 per-token -min(rA, clip(r)A) with A=-1 -> max(r, clip r): 0.9, 0.9, 1.0, 1.25
    # row 1 with A=2 -> -2*min(r, clip r): -2.6, -2.6, -1.4, -2.2
    want = (0.9 + 0.9 + 1.0 + 1.25 - 2.6 - 2.6 - 1.4 - 2.2) / 8
    assert loss == pytest.approx(want, rel=1e-5)
    # with symmetric 0.2 clip the 1.25 token of row 0 is not clipped either, but the 0.85 one is not
    # below 0.8 -> only one low-binding token: the asymmetry matters.
    _, m_sym = run(LossConfig(beta=0.0, name="dapo"), logp, old, adv, mask)
    assert m_sym["clip_frac_low"] == pytest.approx(1 / 8)


def test_dual_clip_caps_negative_advantage():
    old = np.full((2, 3), -2.0)
    ratios = np.array([[5.0, 1.0, 2.0], [5.0, 0.5, 1.0]])
    logp = old + np.log(ratios)
    adv = np.array([-1.0, 1.0])
    mask = np.ones((2, 3), dtype=bool)
    cfg = LossConfig(beta=0.0, delta=3.0, name="dapo")
    loss, m = assert_matches(cfg, logp, old, adv, mask)
    # row 0 A=-1: tokens give min(max(r, clip r), 3) = 3, 1, 2; row 1 A=1: -min(r, clip r) = -1.2, -0.5, -1
    assert loss == pytest.approx((3 + 1 + 2 - 1.2 - 0.5 - 1.0) / 6, rel=1e-5)
    assert m["clip_frac_dual"] == pytest.approx(1 / 6)
    loss_nodual, _ = run(LossConfig(beta=0.0, name="dapo"), logp, old, adv, mask)
    assert loss_nodual == pytest.approx((5 + 1 + 2 - 1.2 - 0.5 - 1.0) / 6, rel=1e-5)


# ----------------------------------------------------------------------------- KL


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators(estimator):
    logp, old, adv, mask, ref = make_batch(seed=4)
    cfg = LossConfig(beta=0.3, kl_estimator=estimator)
    _, m = assert_matches(cfg, logp, old, adv, mask, ref)
    # independent per-token formula check of the kl metric
    vals = []
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t]:
                x = logp[i, t] - ref[i, t]
                vals.append({"k1": x, "k2": 0.5 * x * x, "k3": math.exp(-x) + x - 1.0}[estimator])
    np.testing.assert_allclose(m["kl"], np.mean(vals), rtol=2e-5, atol=1e-6)


def test_beta_zero_allows_no_reference():
    logp, old, adv, mask, ref = make_batch(seed=5)
    cfg = LossConfig(beta=0.0)
    loss_none, m_none = run(cfg, logp, old, adv, mask, None)
    loss_ref, m_ref = run(cfg, logp, old, adv, mask, ref)
    assert loss_none == pytest.approx(loss_ref, rel=1e-6)
    assert m_none["kl"] == 0.0
    assert m_ref["kl"] > 0.0  # still reported for monitoring
    assert loss_none == pytest.approx(m_none["pg_loss"], rel=1e-6)
    with pytest.raises(ValueError, match="ref_logp_BT"):
        run(LossConfig(beta=0.1), logp, old, adv, mask, None)


def test_kl_changes_loss_by_beta_times_kl_under_dapo():
    logp, old, adv, mask, ref = make_batch(seed=6)
    loss, m = run(LossConfig(name="dapo", beta=0.5), logp, old, adv, mask, ref)
    # dapo is a token mean, the same average as the kl metric
    assert loss == pytest.approx(m["pg_loss"] + 0.5 * m["kl"], rel=1e-5)


# ----------------------------------------------------------------------------- padding safety


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_nan_inf_in_padding_do_not_leak(name, ratio_level):
    logp, old, adv, mask, ref = make_batch(seed=7)
    cfg = LossConfig(name=name, ratio_level=ratio_level, beta=0.1, max_len=8)
    clean_loss, clean_m = run(cfg, logp, old, adv, mask, ref)
    dirty = [x.copy() for x in (logp, old, ref)]
    poison = np.array([np.nan, np.inf, -np.inf])
    for x in dirty:
        pad = ~mask
        x[pad] = poison[np.arange(pad.sum()) % 3]
    adv_dirty = adv.copy()
    adv_dirty[2] = np.nan  # row 2 is fully padded
    loss, m = run(cfg, dirty[0], dirty[1], adv_dirty, mask, dirty[2])
    assert loss == pytest.approx(clean_loss, rel=1e-6)
    for k in clean_m:
        assert m[k] == pytest.approx(clean_m[k], rel=1e-6, abs=1e-7), k

    def f(lp):
        return policy_loss(lp, jnp.asarray(dirty[1], jnp.float32), jnp.asarray(adv_dirty, jnp.float32),
                           jnp.asarray(mask), cfg, jnp.asarray(dirty[2], jnp.float32))[0]

    g = np.asarray(jax.grad(f)(jnp.asarray(dirty[0], jnp.float32)))
    assert np.all(np.isfinite(g))
    assert np.all(g[~mask] == 0.0)
    assert np.any(g[mask] != 0.0)


def test_float_mask_and_all_masked_batch():
    logp, old, adv, mask, ref = make_batch(seed=8)
    a = run(LossConfig(), logp, old, adv, mask.astype(np.float32), ref)
    b = run(LossConfig(), logp, old, adv, mask, ref)
    assert a[0] == pytest.approx(b[0])
    loss, m = run(LossConfig(), logp, old, adv, np.zeros_like(mask), ref)
    assert loss == 0.0 and all(v == 0.0 for v in m.values())


# ----------------------------------------------------------------------------- gradients


def test_grad_token_level_matches_numpy_analytic():
    logp, old, adv, mask, ref = make_batch(seed=9)
    cfg = LossConfig(name="grpo", beta=0.2, kl_estimator="k3", epsilon_low=0.2, epsilon_high=0.28)
    B, T = logp.shape
    # analytic d loss / d logp with loops (grpo aggregation over non-empty rows)
    rows = [i for i in range(B) if mask[i].any()]
    want = np.zeros((B, T))
    for i in rows:
        n = mask[i].sum()
        for t in range(T):
            if not mask[i, t]:
                continue
            r = math.exp(logp[i, t] - old[i, t])
            A = adv[i]
            rc = min(max(r, 0.8), 1.28)
            d_pg = -A * r if r * A <= rc * A else 0.0  # the unclipped branch carries the gradient
            d_kl = 1.0 - math.exp(ref[i, t] - logp[i, t])
            want[i, t] = (d_pg + cfg.beta * d_kl) / n / len(rows)

    def f(lp):
        return policy_loss(lp, jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32), jnp.asarray(mask),
                           cfg, jnp.asarray(ref, jnp.float32))[0]

    g = np.asarray(jax.grad(f)(jnp.asarray(logp, jnp.float32)))
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["grpo", "dapo"])
def test_grad_sequence_level_matches_finite_difference(name):
    """GSPO-token stop-gradient structure must give the true sequence-level gradient."""
    rng = np.random.default_rng(10)
    B, T = 3, 5
    logp = -rng.uniform(0.2, 2.0, size=(B, T))
    old = logp + rng.normal(0.0, 0.02, size=(B, T))  # sequence ratios well inside the clip range
    ref = logp + rng.normal(0.0, 0.3, size=(B, T))
    adv = np.array([0.8, -1.2, 0.5])
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=bool)
    cfg = LossConfig(name=name, ratio_level="sequence", beta=0.1, kl_estimator="k2", epsilon_low=0.2, epsilon_high=0.2)

    def f(lp):
        return policy_loss(lp, jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32), jnp.asarray(mask),
                           cfg, jnp.asarray(ref, jnp.float32))[0]

    g = np.asarray(jax.grad(f)(jnp.asarray(logp, jnp.float32)))
    h = 1e-6
    fd = np.zeros((B, T))
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            up, dn = logp.copy(), logp.copy()
            up[i, t] += h
            dn[i, t] -= h
            fd[i, t] = (ref_policy_loss(up, old, adv, mask, cfg, ref)[0] - ref_policy_loss(dn, old, adv, mask, cfg, ref)[0]) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-6)
    # and a clipped sequence passes no policy-gradient: push row 0's ratio well above 1 + eps
    old_far = old.copy()
    old_far[0] -= 1.0
    cfg_nokl = LossConfig(name=name, ratio_level="sequence", beta=0.0)
    g0 = jax.grad(lambda lp: policy_loss(lp, jnp.asarray(old_far, jnp.float32), jnp.asarray(adv, jnp.float32),
                                         jnp.asarray(mask), cfg_nokl)[0])(jnp.asarray(logp, jnp.float32))
    assert np.all(np.asarray(g0)[0] == 0.0) and np.any(np.asarray(g0)[1] != 0.0)


def test_jit_matches_eager_and_compiles_once():
    logp, old, adv, mask, ref = make_batch(seed=11)
    cfg = LossConfig(name="dapo", ratio_level="sequence", epsilon_high=0.28)
    args = [jnp.asarray(x, jnp.float32) for x in (logp, old, adv)] + [jnp.asarray(mask)]
    eager_loss, eager_m = policy_loss(*args, cfg, jnp.asarray(ref, jnp.float32))
    traces = []

    def counted(lp, old_lp, a, msk, ref_lp, cfg):
        traces.append(1)
        return policy_loss(lp, old_lp, a, msk, cfg, ref_lp)

    jitted = jax.jit(counted, static_argnames="cfg")
    for _ in range(3):
        loss, m = jitted(*args, jnp.asarray(ref, jnp.float32), cfg=cfg)
    assert len(traces) == 1
    np.testing.assert_allclose(float(loss), float(eager_loss), rtol=1e-6)
    for k in m:
        np.testing.assert_allclose(float(m[k]), float(eager_m[k]), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- config errors and registry


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "ppo_magic"}, r"unknown loss 'ppo_magic'; registered losses: .*dapo.*dr_grpo.*grpo"),
        ({"ratio_level": "word"}, "ratio_level"),
        ({"epsilon_low": 1.0}, "epsilon_low"),
        ({"epsilon_low": -0.1}, "epsilon_low"),
        ({"epsilon_high": -0.2}, "epsilon_high"),
        ({"beta": -1.0}, "beta"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"name": "dr_grpo"}, "max_len"),
        ({"max_len": 0}, "max_len"),
        ({"delta": 1.1}, "delta"),
    ],
)
def test_bad_config_raises_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        LossConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_shape_mismatch_errors():
    logp, old, adv, mask, ref = make_batch(seed=12)
    cfg = LossConfig()
    with pytest.raises(ValueError, match="old_logp_BT has shape"):
        run(cfg, logp, old[:, :-1], adv, mask, ref)
    with pytest.raises(ValueError, match="mask_BT has shape"):
        run(cfg, logp, old, adv, mask[:-1], ref)
    with pytest.raises(ValueError, match="adv_B must have shape"):
        run(cfg, logp, old, adv[:-1], mask, ref)
    with pytest.raises(ValueError, match="ref_logp_BT has shape"):
        run(cfg, logp, old, adv, mask, ref[:, :2])
    with pytest.raises(ValueError, match="exceeds LossConfig.max_len"):
        run(LossConfig(name="dr_grpo", max_len=3), logp, old, adv, mask, ref)


@L.register_loss("test_sum_per_sequence")
def _sum_per_sequence(per_token_BT, mask_BT, cfg):
    return jnp.sum(per_token_BT) / per_token_BT.shape[0]


def test_register_your_own_loss():
    assert {"grpo", "dr_grpo", "dapo", "test_sum_per_sequence"} <= set(L.available_losses())
    assert L.get_loss("test_sum_per_sequence") is _sum_per_sequence
    logp, old, adv, mask, ref = make_batch(seed=13)
    loss, m = run(LossConfig(name="test_sum_per_sequence", beta=0.0), logp, old, adv, mask)
    want = 0.0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t]:
                r = math.exp(logp[i, t] - old[i, t])
                want += -min(r * adv[i], min(max(r, 0.8), 1.2) * adv[i])
    assert loss == pytest.approx(want / logp.shape[0], rel=1e-5)
    with pytest.raises(ValueError, match="already registered"):
        L.register_loss("grpo")(_sum_per_sequence)
    with pytest.raises(ValueError, match="unknown loss"):
        L.get_loss("nope")


# ----------------------------------------------------------------------------- logits helpers


def _np_log_softmax_row(row):
    m = max(row)
    s = sum(math.exp(v - m) for v in row)
    return [v - m - math.log(s) for v in row]


def test_token_logprobs_matches_numpy():
    rng = np.random.default_rng(14)
    B, T, V = 2, 4, 7
    logits = rng.normal(0, 3, size=(B, T, V)).astype(np.float32)
    logits[0, 0, 3] = 60.0  # large logit: must stay stable
    tokens = rng.integers(0, V, size=(B, T))
    got = np.asarray(token_logprobs(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), jnp.asarray(tokens)))
    got32 = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
    assert got32.dtype == np.float32 and got.dtype == np.float32
    for b in range(B):
        for t in range(T):
            want = _np_log_softmax_row([float(v) for v in logits[b, t]])[tokens[b, t]]
            assert got32[b, t] == pytest.approx(want, rel=1e-5, abs=1e-5)
    bf16 = token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(tokens))
    assert bf16.dtype == jnp.float32
    with pytest.raises(ValueError, match="tokens_BT has shape"):
        token_logprobs(jnp.asarray(logits), jnp.asarray(tokens[:, :2]))


def _entropy_case(rng):
    """Logits [2, 5, 6] with a masked-out vocab entry and a near one-hot row of large values, and
    a padding mask."""
    B, T, V = 2, 5, 6
    logits = rng.normal(0, 2, size=(B, T, V)).astype(np.float32)
    logits[0, 1, 2] = -np.inf  # a vocab entry masked out
    logits[1, 0, :] = 80.0 * np.arange(V)  # near one-hot, large values
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=bool)
    return logits, mask


def _np_entropy(row) -> float:
    lp = _np_log_softmax_row([float(v) for v in row])
    return -sum(math.exp(v) * v for v in lp if v != -math.inf)


def test_token_entropy_matches_numpy_and_is_safe():
    logits, mask = _entropy_case(np.random.default_rng(15))
    logits[~mask] = np.nan  # padded positions hold garbage
    ents = [_np_entropy(logits[b, t]) for b, t in zip(*np.nonzero(mask))]
    got = float(token_entropy(jnp.asarray(logits), jnp.asarray(mask)))
    assert got == pytest.approx(sum(ents) / len(ents), rel=1e-5)
    g = np.asarray(jax.grad(lambda x: token_entropy(x, jnp.asarray(mask)))(jnp.asarray(logits)))
    assert np.all(np.isfinite(g))
    assert np.all(g[~mask] == 0.0)


def test_fused_logprobs_and_entropy_match_numpy_and_the_separate_functions():
    rng = np.random.default_rng(16)
    logits, mask = _entropy_case(rng)
    B, T, V = logits.shape
    tokens = rng.integers(0, V, size=(B, T))
    tokens[0, 1] = 1
    logp, ent = token_logprobs_and_entropy(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
    for b in range(B):
        for t in range(T):
            lp = _np_log_softmax_row([float(v) for v in logits[b, t]])
            assert float(logp[b, t]) == pytest.approx(lp[tokens[b, t]], rel=1e-5, abs=1e-5)
    ents = [_np_entropy(logits[b, t]) for b, t in zip(*np.nonzero(mask))]
    assert float(ent) == pytest.approx(sum(ents) / len(ents), rel=1e-5)
    # same gradient as token_logprobs; the entropy carries none
    w = jnp.asarray(rng.normal(size=(B, T)).astype(np.float32))
    g_fused = jax.grad(lambda x: jnp.sum(w * token_logprobs_and_entropy(x, jnp.asarray(tokens), jnp.asarray(mask))[0]))(jnp.asarray(logits))
    g_ref = jax.grad(lambda x: jnp.sum(w * token_logprobs(x, jnp.asarray(tokens))))(jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(g_fused), np.asarray(g_ref), rtol=1e-5, atol=1e-6)
    g_ent = jax.grad(lambda x: token_logprobs_and_entropy(x, jnp.asarray(tokens), jnp.asarray(mask))[1])(jnp.asarray(logits))
    assert np.all(np.asarray(g_ent) == 0.0)
    with pytest.raises(ValueError, match="mask_BT"):
        token_logprobs_and_entropy(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask[:, :2]))
