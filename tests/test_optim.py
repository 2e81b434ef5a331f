"""Optimizer + jitted update: AdamW and the schedule against a hand computation, non-finite skips,
gradient accumulation, donation and per-step keys."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cada_jax.config import OptimSection
from cada_jax.training.optim import TrainState, decay_mask, make_optimizer, make_schedule, make_train_step

TARGET = np.array([1.0, -2.0, 0.5], np.float32)


def quad_loss(params, batch, rng, frozen):
    """0.5 * |x * w - y|^2 summed, plus a norm 'scale' leaf (excluded from weight decay)."""
    pred = batch["x"] * params["w"] * params["scale"]
    loss = 0.5 * jnp.sum((pred - batch["y"]) ** 2)
    return loss, {"pred0": pred[0]}


def init_params():
    return {"w": jnp.array([0.3, 0.2, -0.4], jnp.float32), "scale": jnp.array([1.0, 1.5, 0.8], jnp.float32)}


def hand_schedule(cfg: OptimSection, total, u):
    W, U, m = cfg.warmup_steps, max(1, total // cfg.grad_accum), cfg.min_lr_ratio
    warm = min(1.0, (u + 1) / W) if W else 1.0
    factor = 1.0
    if cfg.schedule == "cosine":
        p = min(1.0, max(0.0, (u - W) / max(U - W, 1)))
        factor = m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
    return cfg.lr * warm * factor


def test_schedule_matches_formula():
    cos = OptimSection(lr=2e-3, warmup_steps=3, schedule="cosine", min_lr_ratio=0.1)
    sched = make_schedule(cos, 10)
    got = [float(sched(u)) for u in range(12)]
    want = [hand_schedule(cos, 10, u) for u in range(12)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] == pytest.approx(2e-3 / 3) and got[2] == pytest.approx(2e-3)  # warmup reaches the peak at u = W - 1
    assert got[10] == pytest.approx(2e-4)  # floor from U on
    const = OptimSection(lr=1e-3, warmup_steps=0, schedule="constant")
    assert [float(make_schedule(const, 5)(u)) for u in range(5)] == pytest.approx([1e-3] * 5)


def hand_adamw(cfg: OptimSection, total, params, grads_seq):
    """numpy AdamW with global-norm clipping and a decay mask, one update per gradient."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads_seq, 1):
        g = {k: np.asarray(x, np.float64) for k, x in g.items()}
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        if cfg.max_grad_norm and norm > cfg.max_grad_norm:
            g = {k: x * cfg.max_grad_norm / norm for k, x in g.items()}
        lr = hand_schedule(cfg, total, t - 1)
        for k in p:
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g[k]
            v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * g[k] ** 2
            mhat = m[k] / (1 - cfg.b1 ** t)
            vhat = v[k] / (1 - cfg.b2 ** t)
            upd = mhat / (np.sqrt(vhat) + cfg.eps)
            if k != "scale":
                upd = upd + cfg.weight_decay * p[k]
            p[k] = p[k] - lr * upd
    return p


def quad_grads(params, batch):
    x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
    w, s = np.asarray(params["w"], np.float64), np.asarray(params["scale"], np.float64)
    r = x * w * s - y
    return {"w": r * x * s, "scale": r * x * w}


BATCHES = [
    {"x": np.array([1.0, 2.0, 3.0], np.float32), "y": TARGET},
    {"x": np.array([0.5, -1.0, 2.0], np.float32), "y": TARGET * 2},
]


def test_adamw_two_steps_match_hand_computation():
    cfg = OptimSection(lr=0.05, warmup_steps=2, schedule="cosine", weight_decay=0.1, b1=0.8, b2=0.95, eps=1e-6,
                       max_grad_norm=1.0, min_lr_ratio=0.0)
    total = 4
    tx = make_optimizer(cfg, total)
    state = TrainState.create(init_params(), tx, jax.random.PRNGKey(0))
    step = make_train_step(quad_loss)
    grads_seq, cur = [], {k: np.asarray(v) for k, v in init_params().items()}
    for b in BATCHES:
        grads_seq.append(quad_grads(cur, b))
        state, metrics = step(state, b)
        assert int(metrics["skipped"]) == 0
        cur = hand_adamw(cfg, total, init_params(), grads_seq)
    # the first gradient's norm exceeds max_grad_norm, so clipping is exercised
    assert math.sqrt(sum(float(np.sum(g * g)) for g in grads_seq[0].values())) > cfg.max_grad_norm
    for k in ("w", "scale"):
        np.testing.assert_allclose(np.asarray(state.params[k]), cur[k], rtol=1e-5, atol=1e-7)
    assert int(state.step) == 2
    assert float(metrics["grad_norm"]) == pytest.approx(math.sqrt(sum(float(np.sum(g * g)) for g in grads_seq[1].values())), rel=1e-5)


def test_decay_mask_skips_norm_scales_and_biases():
    mask = decay_mask({"layers": {"attn": {"q_proj": 1, "q_bias": 1}, "input_norm": {"scale": 1}}, "embed": 1})
    assert mask == {"layers": {"attn": {"q_proj": True, "q_bias": False}, "input_norm": {"scale": False}}, "embed": True}


def nan_loss(params, batch, rng, frozen):
    loss, aux = quad_loss(params, batch, rng, frozen)
    return loss * batch["factor"], aux


def inf_grad_loss(params, batch, rng, frozen):
    # finite loss (0 at w = 0) whose gradient is infinite: d/dw sqrt(|w|) at w = 0
    return jnp.sum(jnp.sqrt(jnp.abs(params["w"] * batch["gate"]))), {}


@pytest.mark.parametrize("bad", ["nan_loss", "inf_grad"])
def test_non_finite_update_is_skipped(bad):
    cfg = OptimSection(lr=0.1, grad_accum=1)
    tx = make_optimizer(cfg, 10)
    state = TrainState.create(init_params(), tx, jax.random.PRNGKey(0))
    if bad == "nan_loss":
        step = make_train_step(nan_loss, donate=False)
        good, poison = dict(BATCHES[0], factor=np.float32(1)), dict(BATCHES[0], factor=np.float32(np.nan))
    else:
        step = make_train_step(inf_grad_loss, donate=False)
        good, poison = {"gate": np.array([1, 1, 1], np.float32)}, {"gate": np.array([0, 1, 1], np.float32)}
    state, m = step(state, good)
    assert int(m["skipped"]) == 0
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    state2, m = step(state, poison)
    assert int(m["skipped"]) == 1
    assert not np.isfinite(float(m["loss"])) or not np.isfinite(float(m["grad_norm"]))
    after = jax.tree.map(np.asarray, (state2.params, state2.opt_state))
    jax.tree.map(np.testing.assert_array_equal, before, after)  # bit for bit unchanged
    assert int(state2.step) == int(state.step) + 1  # the batch still counts as consumed
    state3, m = step(state2, good)  # and training goes on
    assert int(m["skipped"]) == 0
    assert np.all(np.isfinite(np.asarray(state3.params["w"])))
    assert not np.array_equal(np.asarray(state3.params["w"]), before[0]["w"])


def test_grad_accumulation_averages_micro_batches():
    cfg = OptimSection(lr=0.05, grad_accum=2, max_grad_norm=0.0, schedule="constant")
    tx = make_optimizer(cfg, 4)
    state = TrainState.create(init_params(), tx, jax.random.PRNGKey(0))
    step = make_train_step(quad_loss)
    state, _ = step(state, BATCHES[0])
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(init_params()["w"]))  # no update yet
    state, _ = step(state, BATCHES[1])
    p0 = {k: np.asarray(v) for k, v in init_params().items()}
    g = [quad_grads(p0, b) for b in BATCHES]
    mean = {k: (g[0][k] + g[1][k]) / 2 for k in g[0]}
    want = hand_adamw(cfg, 4, init_params(), [mean])
    np.testing.assert_allclose(np.asarray(state.params["w"]), want["w"], rtol=1e-5)


def test_state_is_donated_and_step_keys_fold_in_the_step():
    def rng_loss(params, batch, rng, frozen):
        return jnp.sum(params["w"] ** 2), {"u": jax.random.uniform(rng)}

    tx = make_optimizer(OptimSection(lr=0.01), 10)
    key = jax.random.PRNGKey(3)
    state = TrainState.create(init_params(), tx, jnp.array(key))  # a copy: the state's buffers get donated
    step = make_train_step(rng_loss)
    old_w = state.params["w"]
    state, m0 = step(state, {})
    assert old_w.is_deleted()  # the old state's buffers were donated to the update
    state, m1 = step(state, {})
    assert float(m0["u"]) == pytest.approx(float(jax.random.uniform(jax.random.fold_in(key, 0))))
    assert float(m1["u"]) == pytest.approx(float(jax.random.uniform(jax.random.fold_in(key, 1))))
    _, m2 = step(state, {}, jax.random.PRNGKey(9))  # an explicit key wins
    assert float(m2["u"]) == pytest.approx(float(jax.random.uniform(jax.random.PRNGKey(9))))
