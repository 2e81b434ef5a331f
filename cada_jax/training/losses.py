"""GRPO-family policy losses: clipped surrogate, KL to a reference, and the loss aggregation modes.

One per-token objective, many ways to reduce it. For every valid completion token t of sequence i

    r_it    = pi(y_t) / pi_old(y_t)                       (token ratio), or GSPO's sequence ratio
    pg_it   = -min(r_it * A_i, clip(r_it, 1 - eps_low, 1 + eps_high) * A_i)
    loss_it = pg_it + beta * KL_it(pi || pi_ref)

and the registered *aggregation* (the loss "name") turns the [B, T] token losses into a scalar:

    grpo     mean over the valid tokens of each sequence, then mean over sequences (DeepSeekMath).
             Sequences with no valid token at all (batch padding rows) are left out of the mean.
    dr_grpo  sum over all valid tokens / (B * max_len), a constant normaliser (Dr. GRPO): no
             length bias, and the gradient scale does not depend on how long the answers were.
    dapo     sum over all valid tokens / number of valid tokens in the batch (DAPO token-level).

Users add their own mode with ``@register_loss("name")`` on a function
``fn(per_token_BT, mask_BT, cfg) -> scalar`` (``mask_BT`` is boolean; ``per_token_BT`` is already 0
wherever ``mask_BT`` is False).

Options beyond vanilla GRPO:

* ``ratio_level="sequence"`` is GSPO: the ratio is the geometric mean of the token ratios of the
  sequence, ``s_i = exp(mean_t(logp - old_logp))``, clipped once per sequence. It is applied in
  the GSPO-token form ``s_it = sg(s_i) * pi(y_t) / sg(pi(y_t))``: its value is ``s_i`` on every
  token and its gradient flows through each token's log-prob, which equals the gradient of the
  sequence-level objective under every aggregation above.
* ``epsilon_low != epsilon_high`` is DAPO's clip-higher.
* ``delta`` is dual-clip: for negative advantages the ratio is capped at ``delta`` so one very
  unlikely-under-old-policy token cannot produce an unbounded loss.
* ``beta = 0`` removes the KL term entirely; the reference log-probs may then be ``None``.

Masked (padding) positions contribute exactly nothing to the loss, the metrics and the gradient,
even when the padded log-probs or advantages are NaN or inf: inputs are sanitised with
``jnp.where`` before any arithmetic, never multiplied by a 0/1 mask.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from cada_jax.registry import Registry

__all__ = [
    "LossConfig",
    "register_loss",
    "get_loss",
    "available_losses",
    "policy_loss",
    "token_entropy",
    "token_logprobs",
    "KL_ESTIMATORS",
    "RATIO_LEVELS",
]

KL_ESTIMATORS = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")

AggregateFn = Callable[[jax.Array, jax.Array, "LossConfig"], jax.Array]
LOSSES: Registry[AggregateFn] = Registry("loss", decorator="register_loss", listed="registered losses")


def register_loss(name: str) -> Callable[[AggregateFn], AggregateFn]:
    """Decorator registering an aggregation ``fn(per_token_BT, mask_BT, cfg) -> scalar`` as ``name``."""
    return LOSSES.register(name)


def available_losses() -> tuple[str, ...]:
    """Names of the registered loss aggregations, sorted."""
    return tuple(LOSSES.names())


def get_loss(name: str) -> AggregateFn:
    """The aggregation registered as ``name``; a one-line error listing the registered ones otherwise."""
    return LOSSES.get(name)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of the policy loss. Frozen (hashable), so it can be a static jit argument."""

    name: str = "grpo"
    """Aggregation mode, a registered loss: ``grpo``, ``dr_grpo``, ``dapo`` or one of your own."""
    ratio_level: str = "token"
    """``token``: per-token importance ratio (GRPO/PPO). ``sequence``: GSPO's length-normalised sequence ratio."""
    epsilon_low: float = 0.2
    """Lower clip: the ratio is clipped below at ``1 - epsilon_low``; in [0, 1)."""
    epsilon_high: float = 0.2
    """Upper clip: the ratio is clipped above at ``1 + epsilon_high``; >= 0 (DAPO clip-higher: e.g. 0.28)."""
    beta: float = 0.04
    """KL coefficient towards the frozen reference policy; 0 disables KL (reference log-probs may be None)."""
    kl_estimator: str = "k3"
    """Per-token KL estimator with d = ref - logp: ``k1`` = -d, ``k2`` = d^2 / 2, ``k3`` = exp(d) - d - 1."""
    max_len: int | None = None
    """Maximum completion length, the constant normaliser of ``dr_grpo`` (required there)."""
    delta: float | None = None
    """Dual-clip: cap on the ratio for negative advantages; must exceed ``1 + epsilon_high``. None = off."""

    def __post_init__(self) -> None:
        get_loss(self.name)
        if self.ratio_level not in RATIO_LEVELS:
            raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {self.ratio_level!r}")
        if not (isinstance(self.epsilon_low, (int, float)) and 0.0 <= self.epsilon_low < 1.0):
            raise ValueError(f"epsilon_low must be in [0, 1) so that 1 - epsilon_low > 0, got {self.epsilon_low!r}")
        if not (isinstance(self.epsilon_high, (int, float)) and self.epsilon_high >= 0.0):
            raise ValueError(f"epsilon_high must be >= 0, got {self.epsilon_high!r}")
        if not (isinstance(self.beta, (int, float)) and self.beta >= 0.0):
            raise ValueError(f"beta (KL coefficient) must be >= 0, got {self.beta!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.max_len is not None and (
            isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 1
        ):
            raise ValueError(f"max_len must be a positive int or None, got {self.max_len!r}")
        if self.name == "dr_grpo" and self.max_len is None:
            raise ValueError("loss 'dr_grpo' needs max_len (the maximum completion length) in LossConfig")
        if self.delta is not None and not (
            isinstance(self.delta, (int, float)) and self.delta > 1.0 + self.epsilon_high
        ):
            raise ValueError(
                f"delta (dual-clip) must be > 1 + epsilon_high = {1.0 + self.epsilon_high}, or None; got {self.delta!r}"
            )


# ----------------------------------------------------------------------------- aggregations


@register_loss("grpo")
def _aggregate_grpo(per_token_BT: jax.Array, mask_BT: jax.Array, cfg: LossConfig) -> jax.Array:
    """Mean over each sequence's valid tokens, then mean over the sequences that have any."""
    n_tok_B = jnp.sum(mask_BT, axis=-1).astype(jnp.float32)
    per_seq_B = jnp.sum(per_token_BT, axis=-1) / jnp.maximum(n_tok_B, 1.0)
    has_tok_B = n_tok_B > 0
    n_seq = jnp.sum(has_tok_B).astype(jnp.float32)
    return jnp.sum(jnp.where(has_tok_B, per_seq_B, 0.0)) / jnp.maximum(n_seq, 1.0)


@register_loss("dr_grpo")
def _aggregate_dr_grpo(per_token_BT: jax.Array, mask_BT: jax.Array, cfg: LossConfig) -> jax.Array:
    """Sum over valid tokens divided by the constant B * max_len."""
    if cfg.max_len is None:
        raise ValueError("loss 'dr_grpo' needs max_len (the maximum completion length) in LossConfig")
    B, T = per_token_BT.shape
    if T > cfg.max_len:
        raise ValueError(f"completion length T={T} exceeds LossConfig.max_len={cfg.max_len} for dr_grpo")
    return jnp.sum(per_token_BT) / float(B * cfg.max_len)


@register_loss("dapo")
def _aggregate_dapo(per_token_BT: jax.Array, mask_BT: jax.Array, cfg: LossConfig) -> jax.Array:
    """Sum over all valid tokens of the batch divided by their number (token-level mean)."""
    n_tok = jnp.sum(mask_BT).astype(jnp.float32)
    return jnp.sum(per_token_BT) / jnp.maximum(n_tok, 1.0)


# ----------------------------------------------------------------------------- the loss


def _check_shapes(logp_BT, old_logp_BT, adv_B, mask_BT, ref_logp_BT) -> None:
    if jnp.ndim(logp_BT) != 2:
        raise ValueError(f"logp_BT must be 2-D [batch, time], got shape {jnp.shape(logp_BT)}")
    shape = jnp.shape(logp_BT)
    for label, x in (("old_logp_BT", old_logp_BT), ("mask_BT", mask_BT), ("ref_logp_BT", ref_logp_BT)):
        if x is not None and jnp.shape(x) != shape:
            raise ValueError(f"{label} has shape {jnp.shape(x)} but logp_BT has shape {shape}")
    if jnp.shape(adv_B) != shape[:1]:
        raise ValueError(f"adv_B must have shape ({shape[0]},) (one advantage per sequence), got {jnp.shape(adv_B)}")


def _kl_per_token(logp_BT: jax.Array, ref_logp_BT: jax.Array, estimator: str) -> jax.Array:
    d_BT = ref_logp_BT - logp_BT
    if estimator == "k1":
        return -d_BT
    if estimator == "k2":
        return 0.5 * d_BT * d_BT
    return jnp.exp(d_BT) - d_BT - 1.0


def _masked_mean(x_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    n = jnp.maximum(jnp.sum(mask_BT).astype(jnp.float32), 1.0)
    return jnp.sum(jnp.where(mask_BT, x_BT, 0.0)) / n


def policy_loss(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    adv_B: jax.Array,
    mask_BT: jax.Array,
    cfg: LossConfig,
    ref_logp_BT: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped-surrogate GRPO-family loss and its metrics.

    Args:
      logp_BT: log-probs of the sampled completion tokens under the policy being trained.
      old_logp_BT: the same under the policy that sampled them (equal to ``logp_BT`` values on the
        first, fully on-policy step; pass ``jax.lax.stop_gradient(logp_BT)`` then).
      adv_B: one advantage per sequence.
      mask_BT: True (or non-zero) on completion tokens that count; padding is False.
      cfg: a ``LossConfig`` (static under jit).
      ref_logp_BT: log-probs under the frozen reference; required when ``cfg.beta > 0``. When given
        with ``beta == 0`` the KL is still reported in the metrics but not added to the loss.

    Returns:
      ``(loss, metrics)``; metrics are scalars: ``pg_loss`` (the aggregated surrogate alone),
      ``kl`` (mean per-token KL estimate over valid tokens, 0 without a reference),
      ``clip_frac_low`` / ``clip_frac_high`` (share of valid tokens where the lower / upper clip
      binds, i.e. r < 1 - eps_low with A < 0 / r > 1 + eps_high with A > 0), ``clip_frac_dual``
      (share where the dual-clip cap binds; 0 when ``delta`` is None), ``ratio_mean``.
    """
    if not isinstance(cfg, LossConfig):
        raise TypeError(f"cfg must be a LossConfig, got {type(cfg).__name__}")
    aggregate = get_loss(cfg.name)
    _check_shapes(logp_BT, old_logp_BT, adv_B, mask_BT, ref_logp_BT)
    if cfg.beta > 0 and ref_logp_BT is None:
        raise ValueError(f"LossConfig.beta={cfg.beta} > 0 needs ref_logp_BT; pass it or set beta=0")

    mask_BT = jnp.asarray(mask_BT) != 0
    # Sanitise every input at padded positions first: nothing non-finite survives into arithmetic,
    # so neither the value nor the gradient can pick up NaN from padding.
    logp_BT = jnp.where(mask_BT, jnp.asarray(logp_BT, jnp.float32), 0.0)
    old_logp_BT = jnp.where(mask_BT, jnp.asarray(old_logp_BT, jnp.float32), 0.0)
    adv_BT = jnp.where(mask_BT, jnp.asarray(adv_B, jnp.float32)[:, None], 0.0)

    log_ratio_BT = logp_BT - old_logp_BT
    if cfg.ratio_level == "sequence":
        n_tok_B = jnp.maximum(jnp.sum(mask_BT, axis=-1).astype(jnp.float32), 1.0)
        seq_log_ratio_B = jnp.sum(log_ratio_BT, axis=-1) / n_tok_B
        # GSPO-token: value = the sequence ratio, gradient through each token's own log-prob.
        log_ratio_BT = jax.lax.stop_gradient(seq_log_ratio_B)[:, None] + logp_BT - jax.lax.stop_gradient(logp_BT)
        log_ratio_BT = jnp.where(mask_BT, log_ratio_BT, 0.0)
    ratio_BT = jnp.exp(log_ratio_BT)

    lo, hi = 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high
    clipped_BT = jnp.clip(ratio_BT, lo, hi)
    unclipped_BT = ratio_BT
    if cfg.delta is not None:
        unclipped_BT = jnp.where(adv_BT < 0, jnp.minimum(ratio_BT, cfg.delta), ratio_BT)
    pg_BT = -jnp.minimum(unclipped_BT * adv_BT, clipped_BT * adv_BT)
    pg_BT = jnp.where(mask_BT, pg_BT, 0.0)

    if ref_logp_BT is not None:
        ref_BT = jnp.where(mask_BT, jnp.asarray(ref_logp_BT, jnp.float32), 0.0)
        kl_BT = jnp.where(mask_BT, _kl_per_token(logp_BT, ref_BT, cfg.kl_estimator), 0.0)
        kl = _masked_mean(kl_BT, mask_BT)
    else:
        kl_BT = None
        kl = jnp.zeros((), jnp.float32)

    per_token_BT = pg_BT + cfg.beta * kl_BT if (cfg.beta > 0) else pg_BT
    loss = aggregate(per_token_BT, mask_BT, cfg)

    ratio_sg_BT = jax.lax.stop_gradient(ratio_BT)
    adv_sg_BT = jax.lax.stop_gradient(adv_BT)
    low_BT = (ratio_sg_BT < lo) & (adv_sg_BT < 0)
    high_BT = (ratio_sg_BT > hi) & (adv_sg_BT > 0)
    if cfg.delta is not None:
        dual_BT = (ratio_sg_BT > cfg.delta) & (adv_sg_BT < 0)
    else:
        dual_BT = jnp.zeros_like(mask_BT)
    metrics = {
        "pg_loss": jax.lax.stop_gradient(aggregate(pg_BT, mask_BT, cfg)),
        "kl": jax.lax.stop_gradient(kl),
        "clip_frac_low": _masked_mean(low_BT.astype(jnp.float32), mask_BT),
        "clip_frac_high": _masked_mean(high_BT.astype(jnp.float32), mask_BT),
        "clip_frac_dual": _masked_mean(dual_BT.astype(jnp.float32), mask_BT),
        "ratio_mean": _masked_mean(ratio_sg_BT, mask_BT),
    }
    return loss, metrics


# ----------------------------------------------------------------------------- logits helpers


def token_logprobs(logits_BTV: jax.Array, tokens_BT: jax.Array) -> jax.Array:
    """log softmax(logits)[token] per position, in float32.

    Computed as ``logit[token] - logsumexp(logits)`` so no second [B, T, V] array is materialised.
    Token ids must lie in [0, V); an id >= V gives NaN (which ``policy_loss`` ignores where masked).
    """
    if jnp.ndim(logits_BTV) != 3:
        raise ValueError(f"logits_BTV must be 3-D [batch, time, vocab], got shape {jnp.shape(logits_BTV)}")
    if jnp.shape(tokens_BT) != jnp.shape(logits_BTV)[:2]:
        raise ValueError(
            f"tokens_BT has shape {jnp.shape(tokens_BT)} but logits_BTV has shape {jnp.shape(logits_BTV)}"
        )
    logits_BTV = jnp.asarray(logits_BTV, jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, jnp.asarray(tokens_BT)[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked_BT - lse_BT


def token_logprobs_and_entropy(logits_BTV: jax.Array, tokens_BT: jax.Array, mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(`token_logprobs`, `token_entropy` with no gradient), sharing one exp pass over the logits.

    The policy update needs both; computed apart they read and write the [B, T, V] logits several
    times (the largest arrays of the step). Entropy = log Z - sum(p * (logit - max)), with
    p = exp(logit - max) / Z; -inf logits contribute nothing, padded positions are ignored.
    """
    if jnp.ndim(logits_BTV) != 3:
        raise ValueError(f"logits_BTV must be 3-D [batch, time, vocab], got shape {jnp.shape(logits_BTV)}")
    if jnp.shape(tokens_BT) != jnp.shape(logits_BTV)[:2] or jnp.shape(mask_BT) != jnp.shape(logits_BTV)[:2]:
        raise ValueError(f"tokens_BT {jnp.shape(tokens_BT)} and mask_BT {jnp.shape(mask_BT)} must both have the "
                         f"shape of logits_BTV without its vocabulary axis, {jnp.shape(logits_BTV)[:2]}")
    logits_BTV = jnp.asarray(logits_BTV, jnp.float32)
    max_BT1 = jax.lax.stop_gradient(jnp.max(logits_BTV, axis=-1, keepdims=True))
    z_BTV = logits_BTV - max_BT1
    e_BTV = jnp.exp(z_BTV)
    sum_BT = jnp.sum(e_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(z_BTV, jnp.asarray(tokens_BT)[..., None].astype(jnp.int32), axis=-1)[..., 0]
    logp_BT = picked_BT - jnp.log(sum_BT)
    e_BTV, z_BTV, sum_BT = (jax.lax.stop_gradient(a) for a in (e_BTV, z_BTV, sum_BT))
    ez_BT = jnp.sum(jnp.where(e_BTV > 0, e_BTV * z_BTV, 0.0), axis=-1)
    mask_BT = jnp.asarray(mask_BT) != 0
    ent_BT = jnp.where(mask_BT, jnp.log(sum_BT) - ez_BT / sum_BT, 0.0)
    return logp_BT, _masked_mean(ent_BT, mask_BT)


def token_entropy(logits_BTV: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Mean entropy (nats) of the next-token distribution over valid positions, float32.

    Stable through ``log_softmax``; ``-inf`` logits (masked vocabulary entries) are fine, and padded
    positions are replaced by zeros before any arithmetic, so NaN there cannot leak.
    """
    if jnp.ndim(logits_BTV) != 3:
        raise ValueError(f"logits_BTV must be 3-D [batch, time, vocab], got shape {jnp.shape(logits_BTV)}")
    if jnp.shape(mask_BT) != jnp.shape(logits_BTV)[:2]:
        raise ValueError(f"mask_BT has shape {jnp.shape(mask_BT)} but logits_BTV has shape {jnp.shape(logits_BTV)}")
    mask_BT = jnp.asarray(mask_BT) != 0
    logits_BTV = jnp.where(mask_BT[..., None], jnp.asarray(logits_BTV, jnp.float32), 0.0)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    p_BTV = jnp.exp(logp_BTV)
    live_BTV = p_BTV > 0
    safe_logp_BTV = jnp.where(live_BTV, logp_BTV, 0.0)
    ent_BT = -jnp.sum(jnp.where(live_BTV, p_BTV * safe_logp_BTV, 0.0), axis=-1)
    return _masked_mean(ent_BT, mask_BT)
