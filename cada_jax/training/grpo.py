"""GRPO-family RL trainer: sample groups, score them, and update the policy on its own samples.

One step (``GRPOTrainer.train_step``):

1. **Prompts.** ``rl.prompts_per_step`` records from a resumable grain iterator (records are
   tokenised once, up front, with the tokenizer's chat template).
2. **Rollout.** ``rl.group_size`` completions per prompt from `cada_jax.sampling.Sampler` (one
   prefill per prompt, shared by its group), with the behaviour log-probs of every sampled token.
   The sampling seed of step s, round r is drawn from ``fold_in(fold_in(sample_key, s), r)``.
3. **Rewards.** A `cada_jax.rewards.functions.RewardSet` (TRL signature; record fields as columns).
4. **Dynamic sampling** (``rl.dynamic_sampling``, DAPO): groups whose rewards are all equal carry
   no advantage; they are dropped and up to ``rl.max_extra_rounds`` more rounds of prompts are
   sampled to refill the batch. Still short after that, the batch is topped up with the latest
   dropped groups (advantage 0: they add only the KL term), so the update keeps a static shape.
5. **Advantages** from the registry (``rl.advantage``), per group.
6. **Reference log-probs** when ``rl.beta > 0``: full fine-tuning keeps a frozen copy of the
   initial weights; with LoRA the reference is the base weights themselves with no adapters (no
   second copy). ``beta == 0`` loads no reference and computes nothing for it.
7. **Update.** ``rl.mu`` epochs over micro-batches of ``rl.minibatch_size`` rows, whole groups
   (groups shuffled with a key of the step when there is more than one micro-batch), each through
   one jitted, state-donating update
   (`cada_jax.training.optim.make_train_step`: AdamW + schedule + clipping, ``optim.grad_accum``
   micro-batches per optimizer update, non-finite loss/gradient -> update skipped and counted).
   The policy log-probs are recomputed under the current params; the "old" log-probs are the
   sampler's behaviour log-probs (the policy that sampled, before this step's first update).

Update batch layout, with each prompt run once per group (as in sampling): the N = B / G prompts
are left-padded to P slots, ``prompt_tokens_NP``; the B completions right-padded to C slots,
``completion_tokens_BC``. The log-probs of a group's completions come from one scan over the
layers that carries the prompts and the completions side by side (`decoder.grouped_logits`): in
every layer a completion attends to its prompt's keys and to its own earlier tokens, and gradients
flow back into the prompt rows. Against B full rows this saves (G - 1) / G of the prompt compute
in the reference and the update. P and
C are rounded up to `length_bucket`s (C capped at ``rl.max_new_tokens``), so jit compiles one
program per (P, C) pair, and micro-batches hold whole groups.

Everything random derives from ``run.seed``; the checkpoint holds the train state (trainable
params, optimizer state, micro-batch counter, key), the data-iterator position and the RL step, so
a resumed run continues bit for bit. Metrics per step go to ``<run>/metrics.jsonl`` (wall-clock
fields: `TIMING_KEYS`). At the end the policy (LoRA merged) is exported as a HF directory.

Devices: the config's ``mesh`` section lays the run out over every device of every process
(`cada_jax.training.placement`): weights, the frozen reference and the LoRA base in their
`param_shardings`, the trainable state and the optimizer state in `train_state_shardings` (the
update's ``out_shardings``), the sampler's batch and KV cache and every update / reference
micro-batch split over data x fsdp, the logits' vocabulary kept split over ``tensor``. The default
(all devices on ``data``) on one device is a 1x1x1 mesh: plain single-device jit.

Several processes (`cada_jax.sharding.initialize_distributed`) run the same loop on the same
prompts: the prompt iterator is global, so sampling seeds, dynamic-sampling decisions, advantages
and micro-batch order are the same everywhere and do not depend on the number of processes. The
device work is split by the mesh; the reward functions (judges included) each score a contiguous
share of the completions and the shares are gathered. Checkpoints are written collectively by
orbax; process 0 alone writes metrics, the summary and the exported model.

Public: `train_grpo(config, records=None, reward_set=None)`, `GRPOTrainer` (for pipelines that
bring their own rewards and records), and the pure pieces `build_update_batch`,
`completion_logprobs`, `grpo_loss`.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cada_jax.config import Config, ConfigError, dump_yaml, to_dict
from cada_jax.models.config import ModelConfig
from cada_jax.models import decoder as _decoder
from cada_jax.training import placement
from cada_jax.training.advantages import compute_advantages, get_advantage, group_has_signal
from cada_jax.files import atomic_write_json, read_jsonl_objects, run_lock
from cada_jax.training.checkpointing import Checkpointer, PreemptionGuard, SkipStreak, check_resume, records_digest
from cada_jax.training.data import iterator_state, make_iterator, prompt_dataset, restore_iterator
from cada_jax.training.logging import MetricsLogger
from cada_jax.training.losses import LossConfig, policy_loss, token_logprobs, token_logprobs_and_entropy
from cada_jax.training.lora import apply_lora, init_lora, merge_lora
from cada_jax.training.optim import make_optimizer, make_schedule, make_train_step
from cada_jax.rewards.build import check_judge_config, judge_from_config
from cada_jax.rewards.functions import RewardError, RewardSet, reward_set_from_config
from cada_jax.sharding import (
    fit_sharding,
    is_main_process,
    mesh_from_config,
    param_shardings,
    place_rows,
    replicated,
    shard_params,
    to_host,
)
from cada_jax.tokenizer import length_bucket

__all__ = [
    "RLDataError",
    "GRPOTrainer",
    "train_grpo",
    "read_prompt_records",
    "build_update_batch",
    "completion_logprobs",
    "grpo_loss",
    "loss_config",
    "length_bucket",
    "TIMING_KEYS",
    "SIGTERM_ENV",
]

# Test-only hook: after this step (and its checkpoint) the trainer sends itself SIGTERM, which its
# PreemptionGuard turns into "save and return" at the step boundary: a deterministic preemption.
SIGTERM_ENV = "CADA_JAX_TEST_SIGTERM_AFTER_STEP"

# Wall-clock metrics: they differ between otherwise identical runs.
TIMING_KEYS = ("sampling_s", "reward_s", "reference_s", "update_s", "step_s", "tokens_per_s", "eval_s")


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


def _record_prompt(rec: Any, field: str, where: str):
    """The validated prompt of a record: a non-empty string or a non-empty list of chat messages."""
    if not isinstance(rec, dict):
        raise RLDataError(f"{where}: expected an object with a '{field}' field, got {type(rec).__name__}")
    if field not in rec:
        raise RLDataError(f"{where}: missing field '{field}'; set rl.prompt_field to the prompt's field name")
    value = rec[field]
    if isinstance(value, str):
        if not value.strip():
            raise RLDataError(f"{where}: field '{field}' is empty; every record needs a prompt")
        return value
    if isinstance(value, list) and value:
        for j, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise RLDataError(f"{where}: {field}[{j}] must be an object with string 'role' and 'content'")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise RLDataError(f"{where}: field '{field}' must be a non-empty string or a non-empty list of chat messages")


def _prompt_text(prompt) -> str:
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


def _advantage_opts(rl) -> dict:
    """Keyword options of the configured estimator: the grpo options it accepts; a non-default
    option it does not accept is an error rather than silently ignored."""
    import inspect

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


def _optimizer(optim_cfg, total_micro_steps: int):
    """One optax transformation per (config, length): the train state's treedef holds it, so equal
    configs reuse the compiled update (a same-process resume compiles nothing). Only the cosine
    schedule depends on the run length."""
    return _optimizer_cached(optim_cfg, total_micro_steps if optim_cfg.schedule == "cosine" else 0)


@functools.lru_cache(maxsize=8)
def _optimizer_cached(optim_cfg, total_micro_steps: int):
    return make_optimizer(optim_cfg, total_micro_steps)


def _constraint_mesh(mesh):
    """The mesh for activation constraints: None on one device (nothing to constrain)."""
    return mesh if mesh is not None and mesh.size > 1 else None


@functools.lru_cache(maxsize=8)
def _update_fn(model_cfg: ModelConfig, lora_cfg, loss_cfg: LossConfig, mesh, tx):
    """The jitted, state-donating GRPO update (full fine-tuning, or LoRA over frozen base weights);
    the new state comes back in `placement.train_state_shardings`, the metrics replicated."""
    cm = _constraint_mesh(mesh)
    if lora_cfg is None:
        def loss_fn(params, batch, rng, frozen):
            return grpo_loss(params, batch, cfg=model_cfg, loss_cfg=loss_cfg, mesh=cm)
    else:
        def loss_fn(lora, batch, rng, frozen):
            return grpo_loss(apply_lora(frozen, lora, lora_cfg), batch, cfg=model_cfg, loss_cfg=loss_cfg, mesh=cm)
    out = (placement.train_state_shardings(model_cfg, lora_cfg, mesh, tx), replicated(mesh))
    return make_train_step(loss_fn, out_shardings=out)


@functools.lru_cache(maxsize=8)
def _logprob_fn(model_cfg: ModelConfig, mesh=None):
    """Jitted ``(params, prompt_tokens_NP, prompt_mask_NP, completion_tokens_BC, completion_mask_BC) -> logp_BC``
    (inputs keep the shardings they arrive with)."""
    cm = _constraint_mesh(mesh)

    def fn(params, prompt_tokens_NP, prompt_mask_NP, completion_tokens_BC, completion_mask_BC):
        logp, _ = completion_logprobs(params, prompt_tokens_NP, prompt_mask_NP, completion_tokens_BC,
                                      completion_mask_BC, cfg=model_cfg, mesh=cm)
        return jnp.where(completion_mask_BC != 0, logp, 0.0)

    return jax.jit(fn)


def _seed_of(key) -> int:
    """A non-negative int32 sampling seed drawn from `key`."""
    return int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))


# ----------------------------------------------------------------------------- trainer


class GRPOTrainer:
    """The RL loop over explicit state. Build it, then `train()`; or drive `train_step()` yourself.

    Args:
      cfg: the run `Config` (sections model, optim, lora, checkpoint, run, rl).
      reward_set: the rewards; None builds them from ``rl.rewards`` / ``rl.reward_module``.
      records: prompt records; None reads ``rl.data``.
      eval_records: held-out records for ``rl.eval_every``; None reads ``rl.eval_data`` when set.
      model_dir: a resolved HF model directory (default: resolve ``model.path``).

    The state lives in attributes: ``state`` (TrainState of the trainable pytree), ``frozen`` (base
    weights under LoRA, else None), ``reference`` (reference params or None when beta == 0),
    ``step`` (RL steps done), ``it`` (the data iterator), ``mesh`` (the device mesh every array lives
    on). ``stats`` counts program calls.
    """

    def __init__(self, cfg: Config, reward_set: RewardSet | None = None, records: Sequence[dict] | None = None,
                 eval_records: Sequence[dict] | None = None, *, model_dir: str | None = None):
        self.cfg = cfg
        rl = self.rl = cfg.rl
        self.run_dir = os.path.abspath(cfg.run.dir)
        G = rl.group_size
        if G < 2:
            raise ConfigError(f"rl.group_size={G}: must be >= 2 (group-relative advantages compare several samples of one prompt)")
        self.batch_size = rl.prompts_per_step * G
        self.minibatch = rl.minibatch_size or self.batch_size
        if self.batch_size % self.minibatch:
            raise ConfigError(
                f"rl.minibatch_size={self.minibatch} does not divide the batch rl.prompts_per_step * rl.group_size = "
                f"{rl.prompts_per_step} * {G} = {self.batch_size}; pick a divisor"
            )
        if self.minibatch % G:
            raise ConfigError(
                f"rl.minibatch_size={self.minibatch} is not a multiple of rl.group_size={G}; micro-batches hold whole "
                f"groups (each prompt runs once per group), pick a multiple"
            )
        self.micro_per_step = rl.mu * (self.batch_size // self.minibatch)
        if self.micro_per_step % cfg.optim.grad_accum:
            raise ConfigError(
                f"optim.grad_accum={cfg.optim.grad_accum} does not divide the {self.micro_per_step} micro-batches of one step "
                f"(rl.mu * batch / rl.minibatch_size); an optimizer update would mix two steps' samples"
            )
        if rl.max_new_tokens >= cfg.model.max_seq_len:
            raise ConfigError(f"rl.max_new_tokens={rl.max_new_tokens} leaves no room for a prompt in model.max_seq_len={cfg.model.max_seq_len}")
        if rl.eval_every and eval_records is None and not rl.eval_data:
            raise ConfigError("rl.eval_every > 0 needs held-out prompts: set rl.eval_data (or pass eval_records)")
        self.loss_cfg = loss_config(rl)
        self.adv_opts = _advantage_opts(rl)
        if reward_set is None:
            # Judges are built from the config's judge section once the mesh exists (an llm judge's
            # weights go on it, as the policy's do).
            reward_set = reward_set_from_config(rl.rewards, rl.reward_module, default_judge=rl.judge,
                                                judges=lambda name: judge_from_config(cfg, name, self.model_dir, mesh=self.mesh))
            check_judge_config(cfg.judge, reward_set.judge_names.values())
        self.reward_set = reward_set
        if not isinstance(self.reward_set, RewardSet):
            raise TypeError(f"reward_set must be a cada_jax.rewards.functions.RewardSet, got {type(self.reward_set).__name__}")

        from cada_jax.checkpoints.gguf_import import resolve_model
        from cada_jax.models.config import load_config as load_model_config
        from cada_jax.sampling import Sampler
        from cada_jax.tokenizer import Tokenizer

        self.model_dir = model_dir or resolve_model(cfg.model.path, progress=cfg.run.progress)
        self.model_cfg = load_model_config(self.model_dir).replace(
            dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
            attention_impl=cfg.model.attention_impl,
        )
        self.mesh = mesh_from_config(cfg.mesh, self.model_cfg)
        rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if self.minibatch % rows:
            raise ConfigError(
                f"rl.minibatch_size={self.minibatch} completions per update cannot be split over mesh data*fsdp = {rows} "
                f"devices; use a multiple of {rows} (with rl.prompts_per_step * rl.group_size a multiple of it)"
            )
        self.max_seq_len = min(cfg.model.max_seq_len, self.model_cfg.max_position_embeddings)
        self.tokenizer = Tokenizer(self.model_dir)
        self.sampler = Sampler(self.model_cfg, self.tokenizer, max_seq_len=self.max_seq_len,
                               mesh=self.mesh if self.mesh.size > 1 else None)
        for name in sorted(set(self.reward_set.judge_names.values())):  # fail before the first step
            self.reward_set.judge(name)

        source = rl.data or "records"
        if records is None:
            records = read_prompt_records(rl.data)
        self.data_digest = records_digest(records)
        self.records, self.prompts, self.prompt_ids = self._encode(records, source)
        self.eval_records = self.eval_prompts = self.eval_prompt_ids = None
        if rl.eval_every:
            if eval_records is None:
                eval_records = read_prompt_records(rl.eval_data, key="rl.eval_data")
            self.eval_records, self.eval_prompts, self.eval_prompt_ids = self._encode(eval_records, rl.eval_data or "eval records")

        # One global prompt order on every process (see the module doc), so process_count=1 here.
        ds = prompt_dataset(list(range(len(self.records))), seed=rl.seed, shuffle=True, num_epochs=None,
                            batch_size=rl.prompts_per_step, name=source, process_index=0, process_count=1)
        self.it = make_iterator(ds)

        root = jax.random.PRNGKey(cfg.run.seed)
        lora_key, state_key, self.sample_key, self.shuffle_key = jax.random.split(root, 4)
        self.total_micro = rl.steps * self.micro_per_step
        tx = _optimizer(cfg.optim, self.total_micro)
        self.schedule = make_schedule(cfg.optim, self.total_micro)
        self.lora_cfg = cfg.lora if cfg.lora.enabled else None
        self._update = _update_fn(self.model_cfg, self.lora_cfg, self.loss_cfg, self.mesh, tx)
        self._ref_logp = _logprob_fn(self.model_cfg, self.mesh)
        self.stats = {"reference_calls": 0, "update_calls": 0, "sample_calls": 0, "eval_calls": 0}
        self._timing = {"sampling_s": 0.0, "reward_s": 0.0}
        self.compiled_shapes: set[tuple[int, int]] = set()

        # State: resume reads arrays straight from the checkpoint into their shards (no second
        # copy of full weights); weights are loaded straight into their shards.
        self.ckpt = Checkpointer.from_config(cfg.checkpoint, self.run_dir)
        where = dict(model_cfg=self.model_cfg, lora_cfg=self.lora_cfg, mesh=self.mesh)
        restored = None
        if self.ckpt.latest_step() is not None:  # the newest healthy checkpoint (damaged ones are set aside)
            restored = self.ckpt.restore_latest(placement.abstract_state(tx, state_key, **where))
        resuming = restored is not None
        need_base = self.lora_cfg is not None or not resuming or rl.beta > 0
        base = None
        if need_base:
            from cada_jax.checkpoints.hf import load_params

            base, _ = load_params(self.model_dir, self.model_cfg, shardings=param_shardings(self.model_cfg, self.mesh))
        self.frozen = base if self.lora_cfg is not None else None
        trainable = None
        if self.lora_cfg is not None:
            if not resuming:
                trainable = shard_params(init_lora(base, self.model_cfg, self.lora_cfg, lora_key),
                                         placement.trainable_shardings(self.model_cfg, self.mesh, self.lora_cfg))
            self.reference = base if rl.beta > 0 else None  # the base weights, no adapters, no copy
        elif resuming:
            self.reference = base if rl.beta > 0 else None
        elif rl.beta > 0:
            trainable = placement.copy_tree(base)  # the frozen reference keeps `base`
            self.reference = base
        else:
            trainable = base  # donated to the first update; nothing else holds it
            self.reference = None
        del base
        self.step = 0
        if resuming:
            check_resume(restored.meta, to_dict(cfg), self.data_digest, run_dir=self.run_dir, data_key="rl.data")
            self.state, self.step = restored.state, restored.step
            if int(self.state.step) != self.step * self.micro_per_step:
                raise ValueError(
                    f"{self.ckpt.directory}/{self.step}: {int(self.state.step)} micro-batches saved for {self.step} steps, "
                    f"expected {self.step * self.micro_per_step}; it was written with other rl.mu/minibatch settings — use a new checkpoint.dir"
                )
            restore_iterator(self.it, restored.data_state, source=f"{self.ckpt.directory}/{self.step}")
        else:
            # Fresh and restored states carry the same shardings, so a resumed run (and the next
            # run in the same process) reuses the compiled sampler and update.
            self.state = placement.create_state(trainable, tx, state_key, **where)
        self.resumed_from = self.step
        del trainable

    # ------------------------------------------------------------------ records
    def _encode(self, records, source: str):
        records = list(records)
        if not records:
            raise RLDataError(f"{source}: no prompt records; RL needs at least one prompt (check the file and any filters)")
        prompts = [_record_prompt(r, self.rl.prompt_field, f"{source} record {i}") for i, r in enumerate(records)]
        ids = self.sampler.encode_prompts(prompts)
        budget = self.max_seq_len - self.rl.max_new_tokens
        for i, p in enumerate(ids):
            if len(p) > budget:
                raise RLDataError(
                    f"{source} record {i}: the prompt has {len(p)} tokens; with rl.max_new_tokens={self.rl.max_new_tokens} "
                    f"the context of {self.max_seq_len} allows {budget}; shorten it, lower rl.max_new_tokens or raise model.max_seq_len"
                )
        return records, prompts, ids

    def _columns(self, records: Sequence[dict], n: int) -> dict:
        """Every record field but the prompt, repeated n times per record (missing -> None)."""
        keys: list[str] = []
        for r in records:
            keys += [k for k in r if k != self.rl.prompt_field and k not in keys]
        return {k: [r.get(k) for r in records for _ in range(n)] for k in keys}

    def _score(self, prompts: list, completions: list, columns: dict) -> np.ndarray:
        """Raw rewards [F, B] of `RewardSet.score`. With several processes each scores a contiguous
        share of the rows (a judge's work is split, not repeated) and the shares are gathered, so
        every process ends with the same array."""
        n_proc = jax.process_count()
        if n_proc == 1:
            return self.reward_set.score(prompts, completions, **columns)
        from jax.experimental import multihost_utils

        B, F = len(completions), len(self.reward_set.names)
        share = -(-B // n_proc)
        lo = min(B, jax.process_index() * share)
        hi = min(B, lo + share)
        part = np.zeros((F, share), np.float64)
        if hi > lo:
            part[:, :hi - lo] = self.reward_set.score(prompts[lo:hi], completions[lo:hi],
                                                      **{k: v[lo:hi] for k, v in columns.items()})
        # float64 travels as uint32 pairs: the gather goes through JAX arrays, which are 32-bit here.
        parts = np.asarray(multihost_utils.process_allgather(part.view(np.uint32)))
        return np.concatenate([p.view(np.float64) for p in parts], axis=1)[:, :B]

    # ------------------------------------------------------------------ policy params
    def policy_params(self):
        """The current policy's full parameters (LoRA merged into the base weights)."""
        if self.lora_cfg is None:
            return self.state.params
        return merge_lora(self.frozen, self.state.params, self.lora_cfg)

    # ------------------------------------------------------------------ rollout
    def _sample_groups(self, params, idxs: Sequence[int], step: int, round_: int) -> list[dict]:
        """Sample and score one round: a dict per prompt with its group's samples and rewards."""
        from cada_jax.sampling import SamplingParams

        rl, G = self.rl, self.rl.group_size
        seed = _seed_of(jax.random.fold_in(jax.random.fold_in(self.sample_key, step), round_))
        sp = SamplingParams(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p,
                            n=G, seed=seed, stop_strings=tuple(rl.stop_strings), ignore_eos=rl.ignore_eos)
        t0 = time.perf_counter()
        out = self.sampler.generate(params, None, sp, prompt_ids=[list(self.prompt_ids[i]) for i in idxs])
        self.stats["sample_calls"] += 1
        t1 = time.perf_counter()
        recs = [self.records[i] for i in idxs]
        columns = self._columns(recs, G)
        columns["completion_ids"] = [list(c) for c in out.completion_ids]
        columns["finish_reason"] = list(out.finish_reasons)
        prompts = [_prompt_text(self.prompts[i]) for i in idxs for _ in range(G)]
        raw_FB = self._score(prompts, out.texts, columns)
        total_B = self.reward_set.combine(raw_FB)
        t2 = time.perf_counter()
        groups = []
        for k, idx in enumerate(idxs):
            sl = slice(k * G, (k + 1) * G)
            groups.append({
                "record": int(idx), "prompt_ids": out.prompt_ids[k], "completion_ids": out.completion_ids[sl],
                "logprobs": out.logprobs[sl], "texts": out.texts[sl], "finish_reasons": out.finish_reasons[sl],
                "rewards": total_B[sl], "raw_rewards": raw_FB[:, sl],
            })
        self._timing["sampling_s"] += t1 - t0
        self._timing["reward_s"] += t2 - t1
        return groups

    def rollout(self, step: int) -> tuple[list[dict], dict]:
        """The groups trained on at `step` (after dynamic sampling) and the rollout metrics."""
        rl, target = self.rl, self.rl.prompts_per_step
        params = self.policy_params()
        seen: list[dict] = []
        kept: list[dict] = []
        zero: list[dict] = []
        rounds = 0
        while True:
            idxs = next(self.it)
            groups = self._sample_groups(params, idxs, step, rounds)
            rounds += 1
            seen += groups
            if not rl.dynamic_sampling:
                kept = groups
                break
            signal_N = group_has_signal(np.concatenate([g["rewards"] for g in groups]), rl.group_size)
            for g, s in zip(groups, signal_N):
                (kept if s else zero).append(g)
            if len(kept) >= target or rounds > rl.max_extra_rounds:
                break
        chosen = kept[:target]
        padded = target - len(chosen)
        if padded:
            chosen += zero[len(zero) - padded:]
        raw = np.concatenate([g["raw_rewards"] for g in seen], axis=1)
        total = np.concatenate([g["rewards"] for g in seen])
        lengths = np.asarray([len(c) for g in seen for c in g["completion_ids"]], np.int64)
        truncated = np.asarray([r == "length" for g in seen for r in g["finish_reasons"]], np.float64)
        metrics = {
            "reward_mean": float(total.mean()), "reward_std": float(total.std()),
            **{f"reward/{k}": v for k, v in self.reward_set.means(raw).items()},
            "completion_len_mean": float(lengths.mean()), "completion_len_max": int(lengths.max()),
            "truncated_frac": float(truncated.mean()), "sampled_tokens": int(lengths.sum()),
            "sampling_rounds": rounds, **self.reward_set.judge_stats(),
        }
        if rl.dynamic_sampling:
            metrics["groups_dropped"] = len(zero) - padded
            metrics["groups_padded"] = padded
        return chosen, metrics

    # ------------------------------------------------------------------ batch
    def make_batch(self, groups: Sequence[dict]) -> tuple[dict, dict]:
        """(update batch with advantages, advantage metrics) for groups from `rollout`."""
        G = self.rl.group_size
        rewards_B = np.concatenate([g["rewards"] for g in groups]).astype(np.float32)
        adv_B = np.asarray(compute_advantages(self.rl.advantage, jnp.asarray(rewards_B), G, **self.adv_opts), np.float32)
        completions = [c for g in groups for c in g["completion_ids"]]
        logps = [lp for g in groups for lp in g["logprobs"]]
        prompt_ids = [g["prompt_ids"] for g in groups]
        P = length_bucket(max(len(p) for p in prompt_ids))
        C = min(length_bucket(max(len(c) for c in completions)), self.rl.max_new_tokens)
        batch = build_update_batch(prompt_ids, completions, logps, adv_B, group_size=G, pad_id=self.tokenizer.pad_id,
                                   prompt_len=P, completion_len=C)
        self.compiled_shapes.add((P, C))
        metrics = {"advantage_mean": float(adv_B.mean()), "advantage_std": float(adv_B.std()),
                   "advantage_min": float(adv_B.min()), "advantage_max": float(adv_B.max())}
        return batch, metrics

    def micro_batch(self, batch: dict, groups: np.ndarray) -> dict:
        """The rows of `batch` that belong to the given group indices (in that order)."""
        G = self.rl.group_size
        rows = (groups[:, None] * G + np.arange(G)[None]).reshape(-1)
        out = {}
        for k, v in batch.items():
            idx = groups if k.endswith("_NP") else rows
            out[k] = v[idx] if isinstance(v, np.ndarray) else jnp.take(v, jnp.asarray(idx), axis=0)
        return out

    def reference_logprobs(self, batch: dict) -> jax.Array:
        """Reference log-probs [B, C] of the batch's completions, in micro-batch-sized chunks."""
        if self.reference is None:
            raise RuntimeError("reference_logprobs needs rl.beta > 0 (with beta == 0 no reference is kept)")
        n_groups = batch["prompt_tokens_NP"].shape[0]
        per_chunk = self.minibatch // self.rl.group_size
        chunks = []
        for s in range(0, n_groups, per_chunk):
            mb = place_rows(self.micro_batch(batch, np.arange(s, min(s + per_chunk, n_groups))), self.mesh)
            chunks.append(self._ref_logp(self.reference, mb["prompt_tokens_NP"], mb["prompt_mask_NP"],
                                         mb["completion_tokens_BC"], mb["completion_mask_BC"]))
            self.stats["reference_calls"] += 1
        # On the host, like the rest of the update batch (gathered from every process's devices).
        return np.concatenate([to_host(c) for c in chunks], axis=0)

    # ------------------------------------------------------------------ update
    def update(self, batch: dict, step: int) -> dict:
        """`rl.mu` epochs of micro-batch updates on `batch`; returns the averaged update metrics."""
        n_groups = self.rl.prompts_per_step
        per_mb = self.minibatch // self.rl.group_size
        n_mb = n_groups // per_mb
        collected = []
        for epoch in range(self.rl.mu):
            if n_mb > 1:
                key = jax.random.fold_in(jax.random.fold_in(self.shuffle_key, step), epoch)
                order = np.asarray(jax.random.permutation(key, n_groups))
            else:
                order = np.arange(n_groups)
            for m in range(n_mb):
                mb = place_rows(self.micro_batch(batch, order[m * per_mb:(m + 1) * per_mb]), self.mesh)
                self.state, metrics = self._update(self.state, mb, None, self.frozen)
                self.stats["update_calls"] += 1
                collected.append(metrics)
        host = jax.tree.map(to_host, collected)  # replicated scalars: readable on every process
        out = {}
        for k in host[0]:
            vals = np.asarray([m[k] for m in host])
            out[k] = int(vals.sum()) if k == "skipped" else float(vals.astype(np.float64).mean())
        if self.loss_cfg.beta == 0:
            out.pop("kl", None)
        updates_done = int(self.state.step) // self.cfg.optim.grad_accum
        out["lr"] = float(self.schedule(max(updates_done - 1, 0)))
        return out

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """One RL step at `self.step`; advances it and returns the step's metrics."""
        step = self.step
        self._timing = {"sampling_s": 0.0, "reward_s": 0.0}
        t0 = time.perf_counter()
        groups, metrics = self.rollout(step)
        self.sampler.release_weights()  # its copy of the policy is stale once the update runs
        batch, adv_metrics = self.make_batch(groups)
        metrics.update(adv_metrics)
        t1 = time.perf_counter()
        reference_s = 0.0
        if self.loss_cfg.beta > 0:
            batch["ref_logp_BC"] = self.reference_logprobs(batch)  # on the host: the work is done
            reference_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        metrics.update(self.update(batch, step))
        t3 = time.perf_counter()
        self.step = step + 1
        metrics.update(self._timing, reference_s=reference_s, update_s=t3 - t2, step_s=t3 - t0,
                       tokens_per_s=metrics["sampled_tokens"] / max(t3 - t0, 1e-9))
        if self.rl.eval_every and self.step % self.rl.eval_every == 0:
            metrics.update(self.evaluate())
        return metrics

    def evaluate(self) -> dict:
        """Greedy completions (one per prompt) of the eval records, scored by the reward set."""
        from cada_jax.sampling import SamplingParams

        t0 = time.perf_counter()
        params = self.policy_params()
        sp = SamplingParams(max_new_tokens=self.rl.max_new_tokens, temperature=0.0, n=1,
                            stop_strings=tuple(self.rl.stop_strings), ignore_eos=self.rl.ignore_eos)
        raws, lengths = [], []
        chunk = self.batch_size
        for s in range(0, len(self.eval_records), chunk):
            idx = range(s, min(s + chunk, len(self.eval_records)))
            out = self.sampler.generate(params, None, sp, prompt_ids=[list(self.eval_prompt_ids[i]) for i in idx])
            self.stats["eval_calls"] += 1
            recs = [self.eval_records[i] for i in idx]
            columns = self._columns(recs, 1)
            columns["completion_ids"] = [list(c) for c in out.completion_ids]
            columns["finish_reason"] = list(out.finish_reasons)
            raws.append(self._score([_prompt_text(self.eval_prompts[i]) for i in idx], out.texts, columns))
            lengths += [len(c) for c in out.completion_ids]
        self.sampler.release_weights()
        raw = np.concatenate(raws, axis=1)
        out = {"eval_reward_mean": float(self.reward_set.combine(raw).mean()),
               **{f"eval_reward/{k}": v for k, v in self.reward_set.means(raw).items()},
               "eval_completion_len_mean": float(np.mean(lengths)), "eval_s": time.perf_counter() - t0}
        return out

    # ------------------------------------------------------------------ the loop
    def _meta(self) -> dict:
        return {"rl_steps": self.rl.steps, "micro_per_step": self.micro_per_step, "records": len(self.records),
                "model_dir": self.model_dir, "config": to_dict(self.cfg), "data_sha256": self.data_digest}

    def save(self, force: bool = False) -> bool:
        return self.ckpt.save(self.step, self.state, iterator_state(self.it), self._meta(), force=force)

    def train(self) -> dict:
        """Run (or resume) to ``rl.steps``; checkpoints, metrics, preemption, export. Returns a summary.

        The run folder is locked for the duration: a second run in it is refused."""
        with run_lock(self.run_dir, enabled=is_main_process()):
            return self._train()

    def _train(self) -> dict:
        cfg, rl = self.cfg, self.rl
        os.makedirs(self.run_dir, exist_ok=True)
        if is_main_process():
            dump_yaml(cfg, os.path.join(self.run_dir, "config.yaml"))
        summary: dict[str, Any] = {
            "run_dir": self.run_dir, "total_steps": rl.steps, "resumed_from": self.resumed_from, "preempted": False,
            "skipped": 0, "groups_dropped": 0, "first_reward": None, "last_reward": None, "export_dir": None,
        }
        logger = MetricsLogger(self.run_dir, rl.steps, resume_step=self.step, show_keys=("reward_mean", "kl", "lr"),
                               progress=cfg.run.progress)
        sigterm_at = os.environ.get(SIGTERM_ENV)
        streak = SkipStreak(cfg.optim.max_skipped_in_a_row)
        try:
            with PreemptionGuard() as guard:
                while self.step < rl.steps:
                    data_state = iterator_state(self.it)
                    try:
                        metrics = self.train_step()
                    except RewardError as e:
                        # A judge that kept failing (after its retries) or a broken reward: keep the
                        # work done so far (the state before this step, with the prompt order rewound
                        # to it), then stop; nothing is scored as 0 behind the user's back.
                        self.ckpt.save(self.step, self.state, data_state, self._meta(), force=True)
                        self.ckpt.wait()
                        raise RewardError(f"RL step {self.step + 1}: {e}; the run is saved at step {self.step} in "
                                          f"{self.ckpt.directory}: fix the judge or reward and rerun the same command to resume") from e
                    summary["skipped"] += int(metrics["skipped"])
                    streak.update(self.step, int(metrics["skipped"]))
                    summary["groups_dropped"] += int(metrics.get("groups_dropped", 0))
                    if summary["first_reward"] is None:
                        summary["first_reward"] = metrics["reward_mean"]
                    summary["last_reward"] = metrics["reward_mean"]
                    if self.step % cfg.run.log_every == 0 or self.step == rl.steps:
                        logger.log(self.step, metrics)
                    self.save()
                    if sigterm_at and int(sigterm_at) == self.step:
                        os.kill(os.getpid(), signal.SIGTERM)
                    if self.step < rl.steps and guard.should_stop():
                        self.save(force=True)
                        summary["preempted"] = True
                        break
                if not summary["preempted"]:
                    self.save(force=True)
            self.ckpt.wait()
        finally:
            logger.close()
            self.ckpt.close()
            self.reward_set.close()
        summary["steps"] = self.step
        summary["update_shapes"] = sorted(self.compiled_shapes)
        if summary["preempted"]:
            return summary
        summary["export_dir"] = self.export(os.path.join(self.run_dir, "final"))
        if is_main_process():
            atomic_write_json(os.path.join(self.run_dir, "summary.json"), summary)
        return summary

    def export(self, out_dir: str) -> str:
        """Write the policy (LoRA merged) as a HF directory (process 0 writes; every process calls this)."""
        return placement.export(self.policy_params(), self.model_cfg, out_dir, tokenizer_dir=self.model_dir,
                                dtype=self.cfg.model.param_dtype)


def train_grpo(config: Config, records: Sequence[dict] | None = None, reward_set: RewardSet | None = None,
               eval_records: Sequence[dict] | None = None) -> dict:
    """Run (or resume) GRPO as configured (see the module doc); returns a summary dict."""
    return GRPOTrainer(config, reward_set, records, eval_records).train()
