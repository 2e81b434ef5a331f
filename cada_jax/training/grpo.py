"""GRPO-family RL trainer: sample groups, score them, and update the policy on its own samples.

One step (``GRPOTrainer.train_step``):

1. **Prompts.** ``rl.prompts_per_step`` records from a resumable grain iterator (records are
   tokenised once, up front, with the tokenizer's chat template).
2. **Rollout.** ``rl.group_size`` completions per prompt from `cada_jax.sampling.Sampler` (one
   prefill per prompt, shared by its group), with the behaviour log-probs of every sampled token.
   The sampling seed of step s, round r is drawn from ``fold_in(fold_in(sample_key, s), r)``.
3. **Rewards.** A `cada_jax.rewards.functions.RewardSet` (TRL signature; record fields as columns).
4. **Dynamic sampling** (``rl.dynamic_sampling``, DAPO; `advantages.DynamicSampler`): groups
   whose rewards are all equal carry no advantage; they are dropped and up to
   ``rl.max_extra_rounds`` more rounds of prompts are sampled to refill the batch. Still short
   after that, the batch is topped up with the latest dropped groups (advantage 0: they add only
   the KL term), so the update keeps a static shape.
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

The update batch (each prompt run once per group), the loss and the compiled programs are in
`cada_jax.training.grpo_batch`; the loop around the step (resume, checkpoints, metrics,
preemption, export) is `cada_jax.training.loop`, which runs a `GRPOTrainer` as its task.

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

Public: `train_grpo(config, records=None, reward_set=None, eval_records=None, hooks=())` and
`GRPOTrainer` (for pipelines that bring their own rewards and records, or drive `train_step`).
"""


from __future__ import annotations

import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cada_jax.config import Config, ConfigError, to_dict
from cada_jax.rewards.build import check_judge_config, judge_from_config
from cada_jax.rewards.functions import RewardError, RewardSet, reward_set_from_config
from cada_jax.sharding import mesh_from_config, place_rows, to_host
from cada_jax.tokenizer import length_bucket
from cada_jax.training import placement
from cada_jax.training.advantages import DynamicSampler, compute_advantages
from cada_jax.training.checkpointing import Checkpointer, records_digest
from cada_jax.training.data import make_iterator, prompt_dataset
from cada_jax.training.grpo_batch import (
    RLDataError,
    advantage_options,
    build_update_batch,
    grpo_update,
    loss_config,
    prompt_text,
    read_prompt_records,
    record_prompt,
    reference_logprob_fn,
)
from cada_jax.training.loop import Hook, Trainer, start_state
from cada_jax.training.lora import merge_lora
from cada_jax.training.optim import make_schedule, optimizer_for

__all__ = ["GRPOTrainer", "train_grpo", "TIMING_KEYS"]

# Wall-clock metrics: they differ between otherwise identical runs.
TIMING_KEYS = ("sampling_s", "reward_s", "reference_s", "update_s", "step_s", "tokens_per_s", "eval_s")


def _seed_of(key) -> int:
    """A non-negative int32 sampling seed drawn from `key`."""
    return int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))


# ----------------------------------------------------------------------------- trainer


class GRPOTrainer:
    """The RL step over explicit state, a `loop.Task`. Build it, then `train()`; or drive
    `train_step()` yourself.

    Args:
      cfg: the run `Config` (sections model, optim, lora, checkpoint, run, rl).
      reward_set: the rewards; None builds them from ``rl.rewards`` / ``rl.reward_module``.
      records: prompt records; None reads ``rl.data``.
      eval_records: held-out records for ``rl.eval_every``; None reads ``rl.eval_data`` when set.
      model_dir: a resolved HF model directory (default: resolve ``model.path``).

    The state lives in attributes: ``state`` (TrainState of the trainable pytree), ``frozen`` (base
    weights under LoRA, else None), ``reference`` (reference params or None when beta == 0),
    ``step`` (RL steps done), ``iterator`` (the data iterator), ``mesh`` (the device mesh every array
    lives on). ``stats`` counts program calls.
    """

    name = "RL"
    show_keys = ("reward_mean", "kl", "lr")
    # A judge that kept failing (after its retries) or a broken reward, raised before the update:
    # the loop keeps the work done so far and stops; nothing is scored as 0 behind the user's back.
    resumable_errors = (RewardError,)
    resume_hint = "fix the judge or reward and rerun the same command to resume"

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
        self.adv_opts = advantage_options(rl)
        if reward_set is None:
            # Judges are built from the config's judge section once the mesh exists (an llm judge's
            # weights go on it, as the policy's do).
            reward_set = reward_set_from_config(rl.rewards, rl.reward_module, default_judge=rl.judge,
                                                judges=lambda name: judge_from_config(cfg, name, self.model_dir, mesh=self.mesh))
            check_judge_config(cfg.judge, reward_set.judge_names.values())
        self.reward_set = reward_set
        if not isinstance(self.reward_set, RewardSet):
            raise TypeError(f"reward_set must be a cada_jax.rewards.functions.RewardSet, got {type(self.reward_set).__name__}")

        from cada_jax.sampling import Sampler
        from cada_jax.tokenizer import Tokenizer

        self.model_dir, self.model_cfg = placement.model_config(cfg, model_dir)
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
        self.iterator = make_iterator(ds)

        root = jax.random.PRNGKey(cfg.run.seed)
        lora_key, state_key, self.sample_key, self.shuffle_key = jax.random.split(root, 4)
        self.total_steps = rl.steps
        self.total_micro = rl.steps * self.micro_per_step
        tx = optimizer_for(cfg.optim, self.total_micro)
        self.schedule = make_schedule(cfg.optim, self.total_micro)
        self.lora_cfg = cfg.lora if cfg.lora.enabled else None
        self._update = grpo_update(self.model_cfg, self.lora_cfg, self.loss_cfg, self.mesh, tx)
        self._ref_logp = reference_logprob_fn(self.model_cfg, self.mesh)
        self.stats = {"reference_calls": 0, "update_calls": 0, "sample_calls": 0, "eval_calls": 0}
        self._timing = {"sampling_s": 0.0, "reward_s": 0.0}
        self.compiled_shapes: set[tuple[int, int]] = set()
        self.groups_dropped, self.rewards = 0, (None, None)  # over this process's steps, for the summary

        self.ckpt = Checkpointer.from_config(cfg.checkpoint, self.run_dir)
        start = start_state(cfg, self.ckpt, self.iterator, tx, lora_key=lora_key, state_key=state_key,
                            model_dir=self.model_dir, model_cfg=self.model_cfg, mesh=self.mesh,
                            data_digest=self.data_digest, data_key="rl.data", micro_per_step=self.micro_per_step,
                            reference=rl.beta > 0)
        self.state, self.step, self.frozen, self.reference = start.state, start.step, start.frozen, start.reference
        self.resumed_from = self.step

    # ------------------------------------------------------------------ records
    def _encode(self, records, source: str):
        records = list(records)
        if not records:
            raise RLDataError(f"{source}: no prompt records; RL needs at least one prompt (check the file and any filters)")
        prompts = [record_prompt(r, self.rl.prompt_field, f"{source} record {i}") for i, r in enumerate(records)]
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
        prompts = [prompt_text(self.prompts[i]) for i in idxs for _ in range(G)]
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
        if rl.dynamic_sampling:
            pool = DynamicSampler(max_rounds=rl.max_extra_rounds, on_exhausted="pad")
            seen: list[dict] = []
            while not pool.ready(target):
                groups = self._sample_groups(params, next(self.iterator), step, pool.rounds)
                seen += groups
                pool.add(groups)
            chosen = pool.take(target)
            counts = pool.stats()
            rounds = counts["total_rounds"]
        else:
            chosen = seen = self._sample_groups(params, next(self.iterator), step, 0)
            rounds = 1
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
            metrics["groups_dropped"] = counts["groups_dropped"]
            metrics["groups_padded"] = counts["groups_padded"]
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
    def train_step(self, log_now: bool = True) -> dict:
        """One RL step at `self.step`; advances it and returns the step's metrics (on the host,
        logged or not: the rollout needed them anyway)."""
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
            raws.append(self._score([prompt_text(self.eval_prompts[i]) for i in idx], out.texts, columns))
            lengths += [len(c) for c in out.completion_ids]
        self.sampler.release_weights()
        raw = np.concatenate(raws, axis=1)
        out = {"eval_reward_mean": float(self.reward_set.combine(raw).mean()),
               **{f"eval_reward/{k}": v for k, v in self.reward_set.means(raw).items()},
               "eval_completion_len_mean": float(np.mean(lengths)), "eval_s": time.perf_counter() - t0}
        return out

    # ------------------------------------------------------------------ the loop's task
    def meta(self) -> dict:
        return {"rl_steps": self.rl.steps, "micro_per_step": self.micro_per_step, "records": len(self.records),
                "model_dir": self.model_dir, "config": to_dict(self.cfg), "data_sha256": self.data_digest}

    def observe(self, metrics: dict) -> None:
        self.groups_dropped += int(metrics.get("groups_dropped", 0))
        self.rewards = (metrics["reward_mean"] if self.rewards[0] is None else self.rewards[0], metrics["reward_mean"])

    def describe(self) -> dict:
        return {"groups_dropped": self.groups_dropped, "first_reward": self.rewards[0], "last_reward": self.rewards[1],
                "update_shapes": sorted(self.compiled_shapes)}

    def train(self, hooks: Sequence[Hook] = ()) -> dict:
        """Run (or resume) to ``rl.steps`` in the training loop (`loop.Trainer`): checkpoints,
        metrics, preemption, export. Returns the run summary. The run folder is locked meanwhile."""
        return Trainer(self.cfg, hooks=hooks).run(self)

    def export(self, out_dir: str) -> str:
        """Write the policy (LoRA merged) as a HF directory (process 0 writes; every process calls this)."""
        return placement.export(self.policy_params(), self.model_cfg, out_dir, tokenizer_dir=self.model_dir,
                                dtype=self.cfg.model.param_dtype)

    def close(self) -> None:
        self.reward_set.close()


def train_grpo(config: Config, records: Sequence[dict] | None = None, reward_set: RewardSet | None = None,
               eval_records: Sequence[dict] | None = None, *, hooks: Sequence[Hook] = ()) -> dict:
    """Run (or resume) GRPO as configured (see the module doc); returns a summary dict. The run
    folder is locked from before the trainer is built; `hooks` run after every step."""
    with Trainer(config, hooks=hooks) as loop:
        return loop.run(GRPOTrainer(config, reward_set, records, eval_records))
