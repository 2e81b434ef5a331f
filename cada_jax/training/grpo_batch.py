"""GRPO's pure pieces: prompt records, the update batch, the loss, and the compiled update and
reference programs (the trainer that drives them is `cada_jax.training.grpo`).

Update batch layout, with each prompt run once per group (as in sampling): the N = B / G prompts
are left-padded to P slots, ``prompt_tokens_NP``; the B completions right-padded to C slots,
``completion_tokens_BC``. The log-probs of a group's completions come from one scan over the
layers that carries the prompts and the completions side by side (`decoder.grouped_logits`): in
every layer a completion attends to its prompt's keys and to its own earlier tokens, and gradients
flow back into the prompt rows. Against B full rows this saves (G - 1) / G of the prompt compute
in the reference and the update. The trainer rounds P and C up to `length_bucket`s (C capped at
``rl.max_new_tokens``), so jit compiles one program per (P, C) pair, and micro-batches hold whole
groups.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cada_jax.config import ConfigError
from cada_jax.files import read_jsonl_objects
from cada_jax.models import decoder as _decoder
from cada_jax.models.config import ModelConfig
from cada_jax.sharding import fit_sharding
from cada_jax.training import placement
from cada_jax.training.advantages import get_advantage
from cada_jax.training.data import prompt_of
from cada_jax.training.losses import LossConfig, policy_loss, token_logprobs, token_logprobs_and_entropy

__all__ = [
    "RLDataError",
    "read_prompt_records",
    "record_prompt",
    "prompt_text",
    "build_update_batch",
    "completion_logprobs",
    "completion_logits",
    "grpo_loss",
    "loss_config",
    "advantage_options",
    "grpo_update",
    "reference_logprob_fn",
]


class RLDataError(ValueError):
    """A prompt record or prompt set that cannot be used; the message names it and the fix."""


# ----------------------------------------------------------------------------- records


def read_prompt_records(path: str, *, key: str = "rl.data") -> list[dict]:
    """JSON objects of a JSONL file of prompt records; a bad line is an error naming file:line."""
    if not path:
        raise ConfigError(f"{key} is empty: set {key}=path/to/prompts.jsonl (or pass records to train_grpo)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: prompt file not found ({key})")
    return read_jsonl_objects(path, RLDataError, what="a prompt field")


def record_prompt(rec: Any, field: str, where: str):
    """The validated prompt of a record: a non-empty string or a non-empty list of chat messages."""
    if not isinstance(rec, dict):
        raise RLDataError(f"{where}: expected an object with a '{field}' field, got {type(rec).__name__}")
    if field not in rec:
        raise RLDataError(f"{where}: missing field '{field}'; set rl.prompt_field to the prompt's field name")
    return prompt_of(rec, field, where, RLDataError)


def prompt_text(prompt) -> str:
    """What reward functions see as the prompt: the string, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


# ----------------------------------------------------------------------------- pure pieces


def build_update_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                       behaviour_logp: Sequence[np.ndarray], advantages_B, *, group_size: int, pad_id: int,
                       prompt_len: int, completion_len: int) -> dict:
    """Host arrays of one update batch (see the module doc for the layout).

    prompt_ids: one list per group; completion_ids / behaviour_logp: one per sample, sample i
    belonging to group i // group_size. Returns prompt_tokens_NP / prompt_mask_NP [N, P] (int32,
    left-padded), completion_tokens_BC / completion_mask_BC [B, C] (int32, right-padded),
    old_logp_BC [B, C] and advantages_B [B] (float32).
    """
    N, B = len(prompt_ids), len(completion_ids)
    if B != N * group_size:
        raise ValueError(f"{B} completions for {N} prompts x group_size {group_size}")
    P, C = int(prompt_len), int(completion_len)
    ptok = np.full((N, P), int(pad_id), np.int32)
    pmask = np.zeros((N, P), np.int32)
    for n, p in enumerate(prompt_ids):
        if not 0 < len(p) <= P:
            raise ValueError(f"prompt {n} has {len(p)} tokens; it must have 1 to prompt_len={P}")
        ptok[n, P - len(p):] = p
        pmask[n, P - len(p):] = 1
    ctok = np.full((B, C), int(pad_id), np.int32)
    cmask = np.zeros((B, C), np.int32)
    old = np.zeros((B, C), np.float32)
    for i, c in enumerate(completion_ids):
        if len(c) > C:
            raise ValueError(f"completion {i} has {len(c)} tokens > completion_len {C}")
        ctok[i, :len(c)] = c
        cmask[i, :len(c)] = 1
        old[i, :len(c)] = np.asarray(behaviour_logp[i], np.float32)[:len(c)]
    adv = np.asarray(advantages_B, np.float32).reshape(-1)
    if adv.shape != (B,):
        raise ValueError(f"advantages_B has shape {adv.shape}, expected ({B},)")
    return {"prompt_tokens_NP": ptok, "prompt_mask_NP": pmask, "completion_tokens_BC": ctok,
            "completion_mask_BC": cmask, "old_logp_BC": old, "advantages_B": adv}


def completion_logprobs(params, prompt_tokens_NP, prompt_mask_NP, completion_tokens_BC, completion_mask_BC, *,
                        cfg: ModelConfig, mesh=None):
    """(log-probs [B, C] of every completion token, their logits [B, C, V]); see `completion_logits`."""
    logits_BCV = completion_logits(params, prompt_tokens_NP, prompt_mask_NP, completion_tokens_BC, completion_mask_BC,
                                   cfg=cfg, mesh=mesh)
    return token_logprobs(logits_BCV, jnp.asarray(completion_tokens_BC, jnp.int32)), logits_BCV


def completion_logits(params, prompt_tokens_NP, prompt_mask_NP, completion_tokens_BC, completion_mask_BC, *,
                      cfg: ModelConfig, mesh=None):
    """The logits [B, C, V] predicting every completion token; G = B / N samples per prompt.

    `decoder.grouped_logits`: one scan over the layers carries the N prompts and the B
    completions, each prompt's work done once per group. Values equal a full causal pass over
    [prompt | completion] rows up to float rounding. With a `mesh` the logits stay split over batch
    and vocabulary through the log-softmax.
    """
    logits_BCV = _decoder.grouped_logits(params, prompt_tokens_NP, prompt_mask_NP, completion_tokens_BC,
                                         completion_mask_BC, cfg=cfg)
    if mesh is not None:
        logits_BCV = jax.lax.with_sharding_constraint(
            logits_BCV, fit_sharding(mesh, logits_BCV.shape, ("act_batch", "act_seq", "act_vocab"), cfg))
    return logits_BCV


def grpo_loss(params, batch: dict, *, cfg: ModelConfig, loss_cfg: LossConfig, mesh=None):
    """(loss, metrics) of `policy_loss` on an update batch, plus the policy's token entropy."""
    logits_BCV = completion_logits(params, batch["prompt_tokens_NP"], batch["prompt_mask_NP"],
                                   batch["completion_tokens_BC"], batch["completion_mask_BC"], cfg=cfg, mesh=mesh)
    mask_BC = batch["completion_mask_BC"]
    logp_BC, entropy = token_logprobs_and_entropy(logits_BCV, jnp.asarray(batch["completion_tokens_BC"], jnp.int32), mask_BC)
    loss, metrics = policy_loss(logp_BC, batch["old_logp_BC"], batch["advantages_B"], mask_BC, loss_cfg,
                                batch.get("ref_logp_BC"))
    return loss, dict(metrics, entropy=entropy)


def loss_config(rl, max_len: int | None = None) -> LossConfig:
    """The `LossConfig` of an `RLSection` (dr_grpo's constant normaliser is rl.max_new_tokens)."""
    try:
        return LossConfig(name=rl.loss, ratio_level=rl.ratio_level, epsilon_low=rl.epsilon_low,
                          epsilon_high=rl.epsilon_high, beta=rl.beta, kl_estimator=rl.kl_estimator,
                          max_len=int(max_len or rl.max_new_tokens), delta=rl.delta)
    except ValueError as e:
        raise ConfigError(f"rl.loss: {e}") from None


def advantage_options(rl) -> dict:
    """Keyword options of the configured estimator: the grpo options it accepts; a non-default
    option it does not accept is an error rather than silently ignored."""
    fn = get_advantage(rl.advantage)
    params = inspect.signature(fn).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    wanted = {"normalize_std": (rl.normalize_std, True), "eps": (rl.advantage_eps, 1e-6), "ddof": (rl.advantage_ddof, 0)}
    out = {}
    for name, (value, default) in wanted.items():
        if var_kw or name in params:
            out[name] = value
        elif value != default:
            key = {"eps": "rl.advantage_eps", "ddof": "rl.advantage_ddof"}.get(name, f"rl.{name}")
            raise ConfigError(f"{key}={value}: advantage estimator {rl.advantage!r} takes no '{name}' option; leave it at {default}")
    return out

# ----------------------------------------------------------------------------- compiled programs


def _constraint_mesh(mesh):
    """The mesh for activation constraints: None on one device (nothing to constrain)."""
    return mesh if mesh is not None and mesh.size > 1 else None


@functools.lru_cache(maxsize=8)
def grpo_update(model_cfg: ModelConfig, lora_cfg, loss_cfg: LossConfig, mesh, tx):
    """The jitted, state-donating GRPO update (full fine-tuning, or LoRA over frozen base weights);
    the new state comes back in `placement.train_state_shardings`, the metrics replicated."""
    loss = functools.partial(grpo_loss, cfg=model_cfg, loss_cfg=loss_cfg, mesh=_constraint_mesh(mesh))
    return placement.make_update(loss, model_cfg, lora_cfg, mesh, tx)


@functools.lru_cache(maxsize=8)
def reference_logprob_fn(model_cfg: ModelConfig, mesh=None):
    """Jitted ``(params, prompt_tokens_NP, prompt_mask_NP, completion_tokens_BC, completion_mask_BC) -> logp_BC``
    (inputs keep the shardings they arrive with)."""
    cm = _constraint_mesh(mesh)

    def fn(params, prompt_tokens_NP, prompt_mask_NP, completion_tokens_BC, completion_mask_BC):
        logp, _ = completion_logprobs(params, prompt_tokens_NP, prompt_mask_NP, completion_tokens_BC,
                                      completion_mask_BC, cfg=model_cfg, mesh=cm)
        return jnp.where(completion_mask_BC != 0, logp, 0.0)

    return jax.jit(fn)
