"""Orbax train-state checkpoints (round trip, keep-N, only complete steps) and the preemption guard."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cada_jax.config import CheckpointSection, OptimSection
from cada_jax.training.checkpointing import Checkpointer, PreemptionGuard
from cada_jax.training.optim import TrainState, make_optimizer, make_train_step


def loss_fn(params, batch, rng, frozen):
    return jnp.sum((params["w"] @ params["v"] - batch["y"]) ** 2), {}


def fresh_state(seed=0, accum=1):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
              "v": jnp.asarray(rng.standard_normal(4), jnp.float32), "norm": {"scale": jnp.ones(3)}}
    tx = make_optimizer(OptimSection(lr=0.01, weight_decay=0.1, grad_accum=accum), 20)
    return TrainState.create(params, tx, jax.random.PRNGKey(seed))


def trained_state(steps=3, accum=1):
    state = fresh_state(accum=accum)
    step = make_train_step(loss_fn)
    for i in range(steps):
        state, _ = step(state, {"y": jnp.full((3,), float(i))})
    return state


def as_np(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_is_bit_exact_with_optax_structure(tmp_path, async_save):
    state = trained_state(accum=2)  # MultiSteps state: nested namedtuples
    with Checkpointer(str(tmp_path / "ck"), every_steps=1, keep=2, async_save=async_save) as ck:
        assert ck.restore_latest(fresh_state(accum=2)) is None
        assert ck.save(3, state, {"next_index": 3}, {"note": "x", "n": [1, 2]})
        want = as_np(state.arrays())
    with Checkpointer(str(tmp_path / "ck"), every_steps=1, keep=2) as ck:
        got = ck.restore_latest(fresh_state(seed=1, accum=2))
    assert got is not None and got.step == 3
    assert got.data_state == {"next_index": 3} and got.meta == {"note": "x", "n": [1, 2]}
    jax.tree.map(np.testing.assert_array_equal, as_np(got.state.arrays()), want)
    # the live tree structure (optax namedtuples, static tx) is restored, so the jitted step accepts it
    assert jax.tree.structure(got.state.arrays()) == jax.tree.structure(state.arrays())
    assert isinstance(got.state.opt_state, optax.MultiStepsState)
    step = make_train_step(loss_fn)
    a, _ = step(got.state, {"y": jnp.ones(3)})
    b, _ = step(state, {"y": jnp.ones(3)})
    jax.tree.map(np.testing.assert_array_equal, as_np(a.arrays()), as_np(b.arrays()))


def test_every_steps_keep_and_force(tmp_path):
    state = fresh_state()
    ck = Checkpointer.from_config(CheckpointSection(every_steps=2, keep=2, async_save=True), str(tmp_path))
    saved = [s for s in range(1, 8) if ck.save(s, state, {"next_index": s})]
    assert saved == [2, 4, 6]
    assert ck.save(7, state, {"next_index": 7}, force=True)
    assert not ck.save(7, state, {"next_index": 7}, force=True)  # a step is written once
    ck.close()
    assert ck.directory == os.path.join(str(tmp_path), "checkpoints")
    assert sorted(int(n) for n in os.listdir(ck.directory) if n.isdigit()) == [6, 7]


def test_incomplete_checkpoint_is_ignored(tmp_path):
    state = trained_state(steps=2)
    with Checkpointer(str(tmp_path), every_steps=1, keep=3, async_save=False) as ck:
        ck.save(2, state, {"next_index": 2})
    # a save killed mid-write leaves orbax's temporary directory behind, never a bare step dir
    partial = tmp_path / "5.orbax-checkpoint-tmp-1712345678"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
    with Checkpointer(str(tmp_path), every_steps=1, keep=3) as ck:
        assert ck.all_steps() == [2]
        got = ck.restore_latest(fresh_state())
    assert got.step == 2 and got.data_state == {"next_index": 2}


def test_restore_into_a_different_state_is_refused(tmp_path):
    with Checkpointer(str(tmp_path), every_steps=1, keep=1, async_save=False) as ck:
        ck.save(1, fresh_state(), {})
        other = fresh_state().replace(params={"w": jnp.zeros((3, 5)), "v": jnp.zeros(5), "norm": {"scale": jnp.ones(3)}})
        other = TrainState.create(other.params, other.tx, other.rng)
        with pytest.raises(ValueError, match=r"checkpoint array \S*\bv is float32\(4,\) but the train state needs float32\(5,\).*use a new checkpoint.dir"):
            ck.restore_latest(other)


def test_preemption_guard_sets_a_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        assert guard.installed and not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # handled synchronously in the main thread
        assert guard.should_stop() and guard.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second signal stops for real
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
