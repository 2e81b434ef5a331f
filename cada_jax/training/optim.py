"""Optimizer, learning-rate schedule, train state and the jitted update with non-finite skipping.

`make_optimizer` builds ``clip_by_global_norm -> AdamW(schedule)`` (decay only on kernels, not on
norm scales or biases), wrapped in ``optax.MultiSteps`` when ``grad_accum > 1``. The schedule is
indexed by *optimizer updates*: with accumulation, `total_steps` train steps make
``total_steps // grad_accum`` updates.

Schedule (u = optimizer update index, 0-based; W = warmup_steps; U = number of updates):

    warm(u)   = min(1, (u + 1) / W)                      (1 when W = 0)
    cosine(u) = m + (1 - m) * 0.5 * (1 + cos(pi * clip((u - W) / (U - W), 0, 1)))
    lr(u)     = lr * warm(u) * (cosine(u) if schedule == "cosine" else 1)

so the first update already uses lr / W (no wasted step at lr = 0) and the decay approaches m * lr
at update U (the last update, U - 1, still takes a small non-zero step when m = 0).

`make_train_step(loss_fn)` returns ``train_step(state, batch, rng=None, frozen=None)``, jitted with
the state donated. ``loss_fn(params, batch, rng, frozen) -> (loss, aux)`` differentiates only with
respect to ``params`` (the trainable pytree: all weights, or LoRA adapters with the base weights
passed as ``frozen``). When the loss or the global gradient norm is not finite the update is
dropped: params and optimizer state come back unchanged (a ``lax.cond`` on device, no Python
control flow), ``metrics["skipped"] = 1``, and ``state.step`` still advances (it counts batches
consumed, so a resumed run stays aligned with its data). The per-step key, when ``rng`` is not
given, is ``fold_in(state.rng, state.step)``: a resumed run draws the same keys.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from cada_jax.config import OptimSection

__all__ = ["TrainState", "make_schedule", "make_optimizer", "optimizer_for", "make_train_step", "decay_mask", "num_updates"]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: train steps (batches) done
    params: Any  # the trainable pytree
    opt_state: Any
    rng: jax.Array  # base key of the run; per-step keys are fold_in(rng, step)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng, tx=tx)

    def arrays(self) -> dict:
        """The checkpointable part (everything but the optimizer's functions)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng}

    def with_arrays(self, arrays: dict) -> "TrainState":
        return self.replace(step=arrays["step"], params=arrays["params"], opt_state=arrays["opt_state"], rng=arrays["rng"])


def num_updates(optim_cfg: OptimSection, total_steps: int) -> int:
    """Optimizer updates made by `total_steps` train steps."""
    return max(1, int(total_steps) // int(optim_cfg.grad_accum))


def make_schedule(optim_cfg: OptimSection, total_steps: int) -> Callable[[Any], jax.Array]:
    """Learning rate as a function of the optimizer update count (see the module doc)."""
    lr = float(optim_cfg.lr)
    W = int(optim_cfg.warmup_steps)
    U = num_updates(optim_cfg, total_steps)
    m = float(optim_cfg.min_lr_ratio)
    cosine = optim_cfg.schedule == "cosine"
    if optim_cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule {optim_cfg.schedule!r}: use 'constant' or 'cosine'")

    def schedule(count):
        u = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum(1.0, (u + 1.0) / W) if W > 0 else jnp.float32(1.0)
        factor = jnp.float32(1.0)
        if cosine:
            progress = jnp.clip((u - W) / max(U - W, 1), 0.0, 1.0)
            factor = m + (1.0 - m) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return lr * warm * factor

    return schedule


def decay_mask(params):
    """True for leaves that get weight decay: everything but norm scales and biases."""

    def keep(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", str(last)))
        return not (str(name) == "scale" or str(name).endswith("bias"))

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim_cfg: OptimSection, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping + AdamW on the schedule; MultiSteps accumulation when grad_accum > 1."""
    parts = []
    if optim_cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.max_grad_norm)))
    parts.append(
        optax.adamw(
            make_schedule(optim_cfg, total_steps),
            b1=float(optim_cfg.b1),
            b2=float(optim_cfg.b2),
            eps=float(optim_cfg.eps),
            weight_decay=float(optim_cfg.weight_decay),
            mask=decay_mask,
        )
    )
    tx = optax.chain(*parts)
    if optim_cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(optim_cfg.grad_accum))
    return tx


def optimizer_for(optim_cfg: OptimSection, total_steps: int) -> optax.GradientTransformation:
    """`make_optimizer`, one object per (config, run length): the train state's treedef holds the
    transformation, so equal configs reuse the compiled update (a resumed run in the same process
    compiles nothing). Only the cosine schedule depends on the run length."""
    return _cached_optimizer(optim_cfg, int(total_steps) if optim_cfg.schedule == "cosine" else 0)


@functools.lru_cache(maxsize=8)
def _cached_optimizer(optim_cfg: OptimSection, total_steps: int) -> optax.GradientTransformation:
    return make_optimizer(optim_cfg, total_steps)


def make_train_step(loss_fn: Callable, *, donate: bool = True, out_shardings: Any = None) -> Callable:
    """A jitted ``(state, batch, rng=None, frozen=None) -> (state, metrics)``; see the module doc.

    metrics: loss, grad_norm (before clipping), skipped (0/1 int32) and every scalar in the
    loss function's aux dict. `out_shardings` (e.g. ``(state shardings, replicated)`` on a mesh)
    pins where the new state lives, so it keeps the layout of the state it replaces; the inputs
    keep the shardings they arrive with.
    """

    def step(state: TrainState, batch, rng=None, frozen=None):
        key = jax.random.fold_in(state.rng, state.step) if rng is None else rng
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key, frozen)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(operand):
            grads, opt_state, params = operand
            updates, new_opt = state.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt

        def skip(operand):
            return operand[2], operand[1]

        # A branch, not a select: a skipped step computes nothing from the non-finite grads, and a
        # taken one costs no extra pass over params and optimizer state.
        params, opt_state = jax.lax.cond(ok, apply, skip, (grads, state.opt_state, state.params))
        metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": (~ok).astype(jnp.int32)}
        for k, v in (aux or {}).items():
            metrics[k] = v
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    kw = {} if out_shardings is None else {"out_shardings": out_shardings}
    return jax.jit(step, donate_argnums=(0,) if donate else (), **kw)
