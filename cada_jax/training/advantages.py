"""Advantage estimators over groups of sampled completions, and DAPO dynamic sampling.

Layout convention, everywhere: the ``group_size`` completions of one prompt are contiguous, so a
batch of ``B = num_groups * group_size`` rewards reshapes to ``[num_groups, group_size]``. A batch
whose size is not a multiple of ``group_size`` is refused with an error: reshaping it anyway (or
truncating) silently mixes samples of different prompts into one group, a bug that other
libraries have shipped.

Estimators are registered functions ``fn(rewards_B, group_size, **opts) -> adv_B`` (pure ``jnp``,
jittable with ``group_size`` static):

    grpo   r_i - mean(group), divided by (std(group) + eps) when ``normalize_std`` (GRPO); Dr. GRPO
           sets ``normalize_std=False``.
    rloo   r_i - mean of the other G - 1 rewards of its group (leave-one-out baseline; G >= 2).

Dynamic sampling (DAPO) lives on the host, in numpy: ``group_has_signal`` flags groups whose
rewards are not all equal (a zero-variance group has zero advantage everywhere, so contributes no
gradient), and ``DynamicSampler`` accumulates groups with signal across extra sampling rounds.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cada_jax.registry import Registry

__all__ = [
    "register_advantage",
    "get_advantage",
    "available_advantages",
    "compute_advantages",
    "grpo_advantages",
    "rloo_advantages",
    "group_has_signal",
    "DynamicSampler",
    "SamplerExhaustedError",
]

AdvantageFn = Callable[..., jax.Array]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator", decorator="register_advantage", listed="registered")


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator registering ``fn(rewards_B, group_size, **opts) -> adv_B`` as the estimator ``name``."""
    return ADVANTAGES.register(name)


def available_advantages() -> tuple[str, ...]:
    """Names of the registered advantage estimators, sorted."""
    return tuple(ADVANTAGES.names())


def get_advantage(name: str) -> AdvantageFn:
    """The estimator registered as ``name``; a one-line error listing the registered ones otherwise."""
    return ADVANTAGES.get(name)


def compute_advantages(name: str, rewards_B: jax.Array, group_size: int, **opts: Any) -> jax.Array:
    """Look up ``name`` and apply it: ``get_advantage(name)(rewards_B, group_size, **opts)``."""
    return get_advantage(name)(rewards_B, group_size, **opts)


def _check_grouping(shape: tuple[int, ...], group_size: int) -> int:
    """Validate a [B] rewards shape against group_size; returns num_groups."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if len(shape) != 1:
        raise ValueError(f"rewards_B must be 1-D [num_groups * group_size], got shape {tuple(shape)}")
    B = shape[0]
    if B == 0 or B % group_size != 0:
        raise ValueError(
            f"rewards_B has {B} entries, not a positive multiple of group_size={group_size}: each prompt's "
            f"{group_size} samples must be contiguous with B = num_groups * group_size (refusing to "
            f"silently regroup samples of different prompts)"
        )
    return B // group_size


def _grouped(rewards_B: jax.Array, group_size: int) -> jax.Array:
    """[B] -> [num_groups, group_size] float32, refusing any B that is not a multiple of group_size."""
    num_groups = _check_grouping(tuple(jnp.shape(rewards_B)), group_size)
    return jnp.asarray(rewards_B, jnp.float32).reshape(num_groups, group_size)


@register_advantage("grpo")
def grpo_advantages(
    rewards_B: jax.Array,
    group_size: int,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
    ddof: int = 0,
) -> jax.Array:
    """Group-relative advantage: r - mean(group), over (std(group) + eps) when ``normalize_std``.

    ``ddof=0`` is the population std; ``ddof=1`` the unbiased one (what torch.std and so TRL use).
    A zero-variance group gets advantage 0 either way.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    if ddof == 1 and normalize_std and group_size < 2:
        raise ValueError(f"the unbiased std (ddof=1) needs group_size >= 2, got {group_size}")
    r_NG = _grouped(rewards_B, group_size)
    centred_NG = r_NG - jnp.mean(r_NG, axis=-1, keepdims=True)
    if normalize_std:
        centred_NG = centred_NG / (jnp.std(r_NG, axis=-1, keepdims=True, ddof=ddof) + eps)
    return centred_NG.reshape(-1)


@register_advantage("rloo")
def rloo_advantages(rewards_B: jax.Array, group_size: int) -> jax.Array:
    """Leave-one-out: r_i - mean of the other group_size - 1 rewards of the group."""
    r_NG = _grouped(rewards_B, group_size)
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2 (the baseline is the other samples' mean), got {group_size}")
    others_mean_NG = (jnp.sum(r_NG, axis=-1, keepdims=True) - r_NG) / (group_size - 1)
    return (r_NG - others_mean_NG).reshape(-1)


# ----------------------------------------------------------------------------- dynamic sampling


def group_has_signal(rewards_B: Any, group_size: int, tol: float = 1e-6) -> np.ndarray:
    """bool[num_groups]: True where the group's rewards are not all equal (max - min > tol).

    Host-side numpy. Non-finite rewards are refused (a reward function bug, not a zero signal).
    """
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    r = np.asarray(rewards_B, dtype=np.float64)
    num_groups = _check_grouping(r.shape, group_size)
    r_NG = r.reshape(num_groups, group_size)
    if not np.all(np.isfinite(r_NG)):
        raise ValueError("rewards contain NaN or inf; fix the reward function before dynamic sampling")
    return (r_NG.max(axis=1) - r_NG.min(axis=1)) > tol


class SamplerExhaustedError(RuntimeError):
    """Raised by ``DynamicSampler`` when the extra-round budget ran out before enough groups had signal."""


class DynamicSampler:
    """Host-side accumulator of groups with reward signal, for DAPO dynamic sampling.

    A *group* is any Python object (e.g. a dict of token arrays for one prompt's samples); the
    sampler only looks at its rewards, which ``add`` receives alongside it or reads from the group
    (``group.rewards`` or ``group["rewards"]``). Groups whose rewards are all equal are dropped.

    Typical trainer loop::

        sampler = DynamicSampler(max_rounds=3)
        while not sampler.ready(num_groups):
            groups, rewards = generate_and_score(next_prompts())
            sampler.add(groups, rewards)
        batch = sampler.take(num_groups)

    One step may use the first sampling round plus ``max_rounds`` extra ones. When they are spent
    without ``target_groups`` groups with signal, ``on_exhausted="error"`` makes ``ready`` (and
    ``take``) raise ``SamplerExhaustedError``; ``"partial"`` makes ``ready`` return True and ``take``
    return the groups it has (possibly none); ``"pad"`` (what the GRPO trainer uses, so an update
    keeps its static shape) makes ``take`` fill the batch with the latest flat groups of the step
    (advantage 0: they add only the KL term), which then count as padded, not dropped. Groups left over after ``take`` are discarded by
    default (they were sampled by an older policy); ``keep_surplus=True`` carries them to the next
    step instead.
    """

    def __init__(
        self,
        max_rounds: int = 3,
        on_exhausted: str = "error",
        tol: float = 1e-6,
        keep_surplus: bool = False,
    ) -> None:
        if isinstance(max_rounds, bool) or not isinstance(max_rounds, (int, np.integer)) or max_rounds < 0:
            raise ValueError(f"max_rounds (extra sampling rounds per step) must be an int >= 0, got {max_rounds!r}")
        if on_exhausted not in ("error", "partial", "pad"):
            raise ValueError(f"on_exhausted must be 'error', 'partial' or 'pad', got {on_exhausted!r}")
        if tol < 0:
            raise ValueError(f"tol must be >= 0, got {tol!r}")
        self.max_rounds = int(max_rounds)
        self.on_exhausted = on_exhausted
        self.tol = float(tol)
        self.keep_surplus = bool(keep_surplus)
        self._kept: list[Any] = []
        self._flat: list[Any] = []  # this step's zero-signal groups, kept only for on_exhausted="pad"
        self.rounds = 0  # add() calls since the last take()
        self.total_rounds = 0
        self.groups_seen = 0
        self.groups_kept = 0
        self.groups_dropped = 0  # zero-signal groups (not used as padding)
        self.groups_padded = 0  # zero-signal groups that filled a batch (on_exhausted="pad")
        self.surplus_dropped = 0  # groups with signal discarded by take() (keep_surplus=False)
        self.partial_takes = 0

    def __len__(self) -> int:
        return len(self._kept)

    @staticmethod
    def _rewards_of(group: Any) -> Any:
        if isinstance(group, dict) and "rewards" in group:
            return group["rewards"]
        if hasattr(group, "rewards"):
            return group.rewards
        raise ValueError(
            f"cannot find rewards of group {type(group).__name__}: pass rewards to add() or give each group "
            f"a 'rewards' attribute or key"
        )

    def add(self, batch_groups: Sequence[Any], rewards: Any = None) -> int:
        """Count one sampling round; keep the groups with signal. Returns how many were kept.

        ``rewards`` is one reward array per group (a list, or a 2-D array [num_groups, group_size]),
        or None to read each group's own ``rewards``.
        """
        groups = list(batch_groups)
        if rewards is None:
            per_group = [self._rewards_of(g) for g in groups]
        else:
            arr = rewards if isinstance(rewards, (list, tuple)) else np.asarray(rewards)
            if isinstance(arr, np.ndarray) and arr.ndim != 2:
                raise ValueError(
                    f"rewards must be one array per group or a 2-D array [num_groups, group_size], got shape {arr.shape}"
                )
            per_group = list(arr)
        if len(per_group) != len(groups):
            raise ValueError(f"add() got {len(groups)} groups but {len(per_group)} reward arrays")
        kept = 0
        for group, r in zip(groups, per_group):
            r = np.asarray(r, dtype=np.float64).reshape(-1)
            if r.size == 0:
                raise ValueError("a group has no rewards")
            if group_has_signal(r, r.size, self.tol)[0]:
                self._kept.append(group)
                kept += 1
            elif self.on_exhausted == "pad":
                self._flat.append(group)
        self.rounds += 1
        self.total_rounds += 1
        self.groups_seen += len(groups)
        self.groups_kept += kept
        self.groups_dropped += len(groups) - kept
        return kept

    @property
    def exhausted(self) -> bool:
        """True once the first round and all ``max_rounds`` extra rounds of this step were used."""
        return self.rounds >= 1 + self.max_rounds

    def _exhausted_message(self, target_groups: int) -> str:
        return (
            f"dynamic sampling: only {len(self._kept)} of {target_groups} groups had reward signal after "
            f"{self.rounds} sampling rounds (1 + max_rounds={self.max_rounds}); raise max_rounds, sample more "
            f"prompts per round, or set on_exhausted='partial'"
        )

    @staticmethod
    def _check_target(target_groups: int) -> None:
        if isinstance(target_groups, bool) or not isinstance(target_groups, (int, np.integer)) or target_groups < 1:
            raise ValueError(f"target_groups must be a positive int, got {target_groups!r}")

    def ready(self, target_groups: int) -> bool:
        """Whether to stop sampling: enough groups, or (``partial``) the round budget is spent.

        Raises ``SamplerExhaustedError`` in ``error`` mode when the budget is spent without enough.
        """
        self._check_target(target_groups)
        if len(self._kept) >= target_groups:
            return True
        if self.exhausted:
            if self.on_exhausted == "error":
                raise SamplerExhaustedError(self._exhausted_message(target_groups))
            return True
        return False

    def take(self, target_groups: int) -> list[Any]:
        """The first ``target_groups`` kept groups (fewer only in ``partial`` mode); starts a new step."""
        if not self.ready(target_groups):
            raise RuntimeError(
                f"dynamic sampling: take({target_groups}) with only {len(self._kept)} groups after {self.rounds} "
                f"of {1 + self.max_rounds} rounds; call add() until ready()"
            )
        out = self._kept[:target_groups]
        rest = self._kept[target_groups:]
        short = target_groups - len(out)
        if short and self._flat:
            pad = self._flat[max(len(self._flat) - short, 0):]
            out += pad
            self.groups_padded += len(pad)
            self.groups_dropped -= len(pad)
        self._flat = []
        if len(out) < target_groups:
            self.partial_takes += 1
        if self.keep_surplus:
            self._kept = rest
        else:
            self.surplus_dropped += len(rest)
            self._kept = []
        self.rounds = 0
        return out

    def stats(self) -> dict[str, int]:
        """Counters for logging."""
        return {
            "rounds": self.rounds,
            "total_rounds": self.total_rounds,
            "groups_seen": self.groups_seen,
            "groups_kept": self.groups_kept,
            "groups_dropped": self.groups_dropped,
            "groups_padded": self.groups_padded,
            "surplus_dropped": self.surplus_dropped,
            "partial_takes": self.partial_takes,
            "buffered": len(self._kept),
        }
