"""Supervised fine-tuning for context distillation: learn the completions without the spec in context.

Records are ``{"prompt_messages": [{"role", "content"}, ...], "completion": str}`` or
``{"prompt": str, "completion": str}`` (the string becomes one user turn); the field names come
from ``sft.prompt_field`` / ``sft.completion_field`` (a record without ``prompt_field`` may use
``prompt``). Each is rendered with the tokenizer's chat template:

    prompt     = template(messages, add_generation_prompt=True)
    completion = template(messages + [assistant: completion])[len(prompt):]

and tokenised as ``ids = encode(prompt) + encode(completion)``, cut right after the first
end-of-turn / EOS token of the completion (appended when the template emits none). Only the
completion tokens and that end-of-turn token carry loss; the prompt tokens have weight zero.

Rows. An example of n ids becomes n - 1 (input, target, weight) slots: ``input = ids[:-1]``,
``target = ids[1:]``, ``weight[t] = 1`` iff ``target[t]`` is a completion token. Without packing a
row holds one example, and a batch is padded to the smallest of a few fixed length buckets, so jit
compiles one program per bucket. With ``sft.packing`` several examples share a ``max_len`` row
(best-fit in a seeded order); each carries its own segment id, its positions restart at 0, and the
attention mask is block-diagonal-causal (token t of segment k sees only earlier tokens of segment
k), so a packed example gets exactly the logits it gets alone. That mask is built here and handed
to the decoder module directly (`Decoder.apply` takes a [B, T, S] mask); `decoder.forward` only
knows padding masks.

Loss: mean negative log-likelihood over all weighted tokens of the batch (token-level mean, so a
long completion weighs by its length, as in context-distillation SFT).

`train_sft(cfg)` runs `SFTTask` in the training loop (`cada_jax.training.loop`): resolved config
to ``<run>/config.yaml``; automatic resume from the newest complete checkpoint in
``checkpoint.dir`` (train state + data iterator position); metrics to ``<run>/metrics.jsonl``,
TensorBoard and a progress bar; SIGTERM/SIGINT save a checkpoint and return at the next step
boundary; at the end the model (LoRA merged in) is written as a HF directory to ``<run>/final``.

Devices: the config's ``mesh`` section lays the run out over every device of every process
(`cada_jax.training.placement`): weights and LoRA base in their `param_shardings`, the train state in
`train_state_shardings` (the update's ``out_shardings``), each batch split over data x fsdp. The
default on one device is a 1x1x1 mesh: plain single-device jit. With several processes the grain
pipeline is sharded: a process loads only the rows of its devices (`sharding.data_shard`; its
share of ``sft.batch_size``), the processes agree on each step's padded length, and the rows are
assembled into one global batch. Checkpoints are written collectively by orbax; process 0 alone
writes metrics, the summary and the exported model.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cada_jax.config import Config, ConfigError, to_dict
from cada_jax.files import read_jsonl_objects
from cada_jax.models.config import ModelConfig
from cada_jax.models.decoder import Decoder
from cada_jax.sharding import data_shard, mesh_from_config, place_process_rows, to_host
from cada_jax.training import placement
from cada_jax.training.checkpointing import Checkpointer, records_digest
from cada_jax.training.data import make_iterator, prompt_dataset, prompt_of
from cada_jax.training.loop import Hook, Trainer, start_state
from cada_jax.training.losses import token_logprobs
from cada_jax.training.lora import merge_lora
from cada_jax.training.optim import make_schedule, optimizer_for

__all__ = [
    "Example",
    "SFTDataError",
    "read_records",
    "encode_records",
    "pack_examples",
    "default_buckets",
    "collate",
    "segment_forward",
    "sft_loss",
    "sft_update",
    "SFTTask",
    "train_sft",
]


class SFTDataError(ValueError):
    """A record that cannot be turned into a training example; the message names it."""


@dataclasses.dataclass(frozen=True)
class Example:
    ids: np.ndarray  # int32 [n]: prompt + completion + end of turn
    n_prompt: int  # the first n_prompt ids carry no loss

    def slots(self):
        """(inputs, targets, weights), each of length n - 1."""
        inputs = self.ids[:-1]
        targets = self.ids[1:]
        weights = (np.arange(1, len(self.ids)) >= self.n_prompt).astype(np.float32)
        return inputs, targets, weights


# ----------------------------------------------------------------------------- records -> examples


def read_records(path: str) -> list[dict]:
    """JSON objects of a JSONL file; a bad line is an error naming file:line."""
    if not path:
        raise ConfigError("sft.data is empty: set sft.data=path/to/records.jsonl (or pass records to train_sft)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: SFT data file not found (sft.data)")
    out = read_jsonl_objects(path, SFTDataError, what="prompt and completion fields")
    if not out:
        raise SFTDataError(f"{path}: no records; the SFT data file is empty")
    return out


def _messages(rec: dict, prompt_field: str, where: str) -> list[dict]:
    if prompt_field in rec:
        field = prompt_field
    elif "prompt" in rec:
        field = "prompt"
    else:
        raise SFTDataError(f"{where}: missing field '{prompt_field}' (or 'prompt'); set sft.prompt_field to the prompt's field name")
    prompt = prompt_of(rec, field, where, SFTDataError)
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def encode_records(records: Sequence[dict], tokenizer, *, prompt_field: str = "prompt_messages",
                   completion_field: str = "completion", max_len: int = 1024, drop_long: bool = False,
                   source: str = "records") -> tuple[list[Example], int]:
    """Tokenise records into Examples (see the module doc). Returns (examples, number dropped)."""
    eos = sorted(tokenizer.eos_ids)
    if not eos:
        raise SFTDataError(f"{tokenizer.model_dir}: the tokenizer has no EOS / end-of-turn id; set eos_token in tokenizer_config.json")
    eos_set = set(eos)
    prompts, completions = [], []
    for i, rec in enumerate(records):
        where = f"{source} record {i}"
        if not isinstance(rec, dict):
            raise SFTDataError(f"{where}: expected an object with prompt and completion fields, got {type(rec).__name__}")
        msgs = _messages(rec, prompt_field, where)
        comp = rec.get(completion_field)
        if not isinstance(comp, str) or not comp.strip():
            raise SFTDataError(f"{where}: field '{completion_field}' must be a non-empty string; set sft.completion_field")
        prompt_text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": comp}], add_generation_prompt=False)
        if not full_text.startswith(prompt_text):
            raise SFTDataError(
                f"{where}: the chat template does not render the prompt as a prefix of the full conversation, so the "
                f"completion cannot be separated; use a template without history rewriting"
            )
        prompts.append(prompt_text)
        completions.append(full_text[len(prompt_text):])
    prompt_ids = tokenizer.encode_batch(prompts)
    comp_ids = tokenizer.encode_batch(completions)
    examples, dropped = [], 0
    for i, (p, c) in enumerate(zip(prompt_ids, comp_ids)):
        cut = next((j for j, t in enumerate(c) if t in eos_set), None)
        c = list(c[: cut + 1]) if cut is not None else list(c) + [eos[0]]
        ids = np.asarray(list(p) + c, np.int32)
        if len(ids) > max_len:
            if drop_long:
                dropped += 1
                continue
            raise SFTDataError(
                f"{source} record {i}: {len(ids)} tokens exceed sft.max_len={max_len}; raise sft.max_len or set sft.drop_long=true"
            )
        examples.append(Example(ids=ids, n_prompt=len(p)))
    if not examples:
        raise SFTDataError(f"{source}: every record is longer than sft.max_len={max_len}; raise sft.max_len")
    return examples, dropped


# ----------------------------------------------------------------------------- rows, buckets, batches


def default_buckets(max_len: int) -> tuple[int, ...]:
    """Powers of two from 64 below max_len, then max_len itself."""
    out, b = [], 64
    while b < max_len:
        out.append(b)
        b *= 2
    out.append(max_len)
    return tuple(out)


def pack_examples(examples: Sequence[Example], row_len: int, seed: int) -> list[list[int]]:
    """Group example indices into rows of at most `row_len` slots (n - 1 per example).

    Best fit over a seeded permutation: each example goes into the open row with the least room
    that still fits it, else a new row. Deterministic in (lengths, row_len, seed).
    """
    order = np.random.default_rng(seed).permutation(len(examples))
    rows: list[list[int]] = []
    room_keys: list[tuple[int, int]] = []  # sorted (room left, row index)
    for idx in order:
        need = len(examples[idx].ids) - 1
        if need > row_len:
            raise SFTDataError(f"example {idx}: {need} slots do not fit a row of {row_len}; raise sft.max_len")
        pos = bisect.bisect_left(room_keys, (need, -1))
        if pos < len(room_keys):
            room, r = room_keys.pop(pos)
            rows[r].append(int(idx))
            room -= need
        else:
            r = len(rows)
            rows.append([int(idx)])
            room = row_len - need
        if room > 0:
            bisect.insort(room_keys, (room, r))
    return rows


def collate(examples: Sequence[Example], rows: Sequence[Sequence[int]], length: int) -> dict:
    """Host arrays [B, length] for rows of example indices.

    tokens_BT / targets_BT (int32), weights_BT (float32 loss weights), positions_BT (restart at 0
    per example), segment_ids_BT (1, 2, ... per example in the row; 0 on padding).
    """
    B = len(rows)
    out = {
        "tokens_BT": np.zeros((B, length), np.int32),
        "targets_BT": np.zeros((B, length), np.int32),
        "weights_BT": np.zeros((B, length), np.float32),
        "positions_BT": np.zeros((B, length), np.int32),
        "segment_ids_BT": np.zeros((B, length), np.int32),
    }
    for b, row in enumerate(rows):
        t = 0
        for seg, idx in enumerate(row, 1):
            inputs, targets, weights = examples[idx].slots()
            n = len(inputs)
            if t + n > length:
                raise SFTDataError(f"row {b}: {t + n} slots exceed the padded length {length}")
            out["tokens_BT"][b, t:t + n] = inputs
            out["targets_BT"][b, t:t + n] = targets
            out["weights_BT"][b, t:t + n] = weights
            out["positions_BT"][b, t:t + n] = np.arange(n)
            out["segment_ids_BT"][b, t:t + n] = seg
            t += n
    return out


def _row_slots(examples, row) -> int:
    return sum(len(examples[i].ids) - 1 for i in row)


# ----------------------------------------------------------------------------- model + loss


def segment_forward(params, tokens_BT, positions_BT, segment_ids_BT, *, cfg: ModelConfig):
    """Logits [B, T, V] with block-diagonal causal attention: token t attends to token s iff both
    belong to the same (non-zero) segment and s <= t."""
    seg = jnp.asarray(segment_ids_BT, jnp.int32)
    T = seg.shape[1]
    causal_TS = jnp.tril(jnp.ones((T, T), bool))
    mask_BTS = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0) & causal_TS[None]
    logits, _ = Decoder(cfg).apply({"params": params}, jnp.asarray(tokens_BT, jnp.int32),
                                   jnp.asarray(positions_BT, jnp.int32), mask_BTS)
    return logits


def sft_loss(params, batch: dict, *, cfg: ModelConfig):
    """(mean NLL over weighted tokens, aux) for a collated batch."""
    logits_BTV = segment_forward(params, batch["tokens_BT"], batch["positions_BT"], batch["segment_ids_BT"], cfg=cfg)
    w_BT = jnp.asarray(batch["weights_BT"], jnp.float32)
    live_BT = w_BT > 0
    logp_BT = jnp.where(live_BT, token_logprobs(logits_BTV, batch["targets_BT"]), 0.0)
    n_tokens = jnp.sum(w_BT)
    loss = -jnp.sum(w_BT * logp_BT) / jnp.maximum(n_tokens, 1.0)
    correct = (jnp.argmax(logits_BTV, axis=-1) == batch["targets_BT"]) & live_BT
    accuracy = jnp.sum(correct) / jnp.maximum(n_tokens, 1.0)
    return loss, {"tokens": n_tokens, "accuracy": accuracy}


# ----------------------------------------------------------------------------- trainer


@functools.lru_cache(maxsize=8)
def sft_update(model_cfg: ModelConfig, lora_cfg, mesh, tx):
    """The jitted SFT update for a model config (and LoRA config, or None for full fine-tuning);
    the new state comes back in `placement.train_state_shardings`, the metrics replicated."""
    return placement.make_update(functools.partial(sft_loss, cfg=model_cfg), model_cfg, lora_cfg, mesh, tx)


def _agree_max(n: int) -> int:
    """The largest `n` over all processes (every process must call this at the same point)."""
    if jax.process_count() == 1:
        return int(n)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(n))))


class SFTTask:
    """SFT as a `loop.Task`: the examples, the train state (resumed or fresh) and the step.

    Building it checks the config against the model and the mesh, reads and tokenises the records,
    and restores the newest checkpoint of the run (`loop.start_state`)."""

    name = "SFT"
    show_keys = ("loss", "accuracy", "lr")
    resumable_errors = ()
    resume_hint = ""

    def __init__(self, cfg: Config, records: Sequence[dict] | None = None):
        sft = self.sft = cfg.sft
        self.cfg = cfg
        if sft.max_len > cfg.model.max_seq_len:
            raise ConfigError(f"sft.max_len={sft.max_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; lower sft.max_len or raise model.max_seq_len")
        run_dir = os.path.abspath(cfg.run.dir)
        os.makedirs(run_dir, exist_ok=True)

        from cada_jax.tokenizer import Tokenizer

        self.model_dir, self.model_cfg = placement.model_config(cfg)
        if sft.max_len > self.model_cfg.max_position_embeddings:
            raise ConfigError(
                f"sft.max_len={sft.max_len} exceeds the model's max_position_embeddings={self.model_cfg.max_position_embeddings} ({self.model_dir}/config.json)"
            )
        self.mesh = mesh_from_config(cfg.mesh, self.model_cfg)
        rows_split = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if sft.batch_size % rows_split:
            raise ConfigError(
                f"sft.batch_size={sft.batch_size} rows cannot be split over mesh data*fsdp = {rows_split} devices; "
                f"use a multiple of {rows_split}"
            )
        shard, n_shards = data_shard(self.mesh)  # this process loads slice `shard` of `n_shards` of every batch
        source = sft.data or "records"
        if records is None:
            records = read_records(sft.data)
        self.examples, self.dropped = encode_records(records, Tokenizer(self.model_dir), prompt_field=sft.prompt_field,
                                                     completion_field=sft.completion_field, max_len=sft.max_len,
                                                     drop_long=sft.drop_long, source=source)

        # Rows of example indices; for unpacked rows the padded length is chosen per batch.
        if sft.packing:
            self.rows = pack_examples(self.examples, sft.max_len, sft.seed)
            self.buckets = (sft.max_len,)
        else:
            self.rows = [[i] for i in range(len(self.examples))]
            self.buckets = tuple(sft.length_buckets) or default_buckets(sft.max_len)
        if len(self.rows) < sft.batch_size:
            raise ConfigError(f"{source}: {len(self.rows)} rows cannot fill one batch of sft.batch_size={sft.batch_size}; lower it or add data")
        self.total_steps = sft.steps or max(1, math.ceil(sft.epochs * len(self.rows) / sft.batch_size))
        ds = prompt_dataset(self.rows, seed=sft.seed, shuffle=True, num_epochs=None, batch_size=sft.batch_size // n_shards,
                            name=source, process_index=shard, process_count=n_shards)
        self.iterator = make_iterator(ds)

        lora_key, state_key = jax.random.split(jax.random.PRNGKey(cfg.run.seed))
        tx = optimizer_for(cfg.optim, self.total_steps)
        self.schedule = make_schedule(cfg.optim, self.total_steps)
        self.lora_cfg = cfg.lora if cfg.lora.enabled else None
        self._update = sft_update(self.model_cfg, self.lora_cfg, self.mesh, tx)
        self.ckpt = Checkpointer.from_config(cfg.checkpoint, run_dir)
        self.data_digest = records_digest(records)
        start = start_state(cfg, self.ckpt, self.iterator, tx, lora_key=lora_key, state_key=state_key,
                            model_dir=self.model_dir, model_cfg=self.model_cfg, mesh=self.mesh,
                            data_digest=self.data_digest, data_key="sft.data")
        self.state, self.step, self.frozen = start.state, start.step, start.frozen
        self.shapes: set[int] = set()
        self.losses = (None, None)  # (first, last) logged loss of this invocation

    def train_step(self, log_now: bool) -> dict | None:
        """One update on the next batch, padded to the smallest bucket that fits its longest row
        (agreed over processes); host metrics only on logged steps (no device sync otherwise)."""
        batch_rows = next(self.iterator)
        longest = _agree_max(max(_row_slots(self.examples, r) for r in batch_rows))
        length = next(b for b in self.buckets if b >= longest)
        self.shapes.add(length)
        batch = place_process_rows(collate(self.examples, batch_rows, length), self.mesh, self.sft.batch_size)
        self.state, metrics = self._update(self.state, batch, None, self.frozen)
        self.step += 1
        if not log_now:
            return None
        return dict(jax.tree.map(to_host, metrics), lr=self.schedule((self.step - 1) // self.cfg.optim.grad_accum))

    def meta(self) -> dict:
        return {"total_steps": self.total_steps, "examples": len(self.examples), "rows": len(self.rows),
                "model_dir": self.model_dir, "config": to_dict(self.cfg), "data_sha256": self.data_digest}

    def observe(self, metrics: dict) -> None:
        self.losses = (metrics["loss"] if self.losses[0] is None else self.losses[0], metrics["loss"])

    def describe(self) -> dict:
        return {"examples": len(self.examples), "dropped": self.dropped, "rows": len(self.rows),
                "first_loss": self.losses[0], "last_loss": self.losses[1], "padded_lengths": sorted(self.shapes)}

    def export(self, out_dir: str) -> str:
        """Write the model (LoRA merged) as a HF directory (process 0 writes; every process calls this)."""
        params = self.state.params if self.lora_cfg is None else merge_lora(self.frozen, self.state.params, self.lora_cfg)
        return placement.export(params, self.model_cfg, out_dir, tokenizer_dir=self.model_dir,
                                dtype=self.cfg.model.param_dtype)

    def close(self) -> None:
        pass


def train_sft(cfg: Config, records: Sequence[dict] | None = None, *, hooks: Sequence[Hook] = ()) -> dict:
    """Run (or resume) SFT as configured; returns a summary dict (see the module doc).

    The run folder is locked for the duration: a second run in it is refused. `hooks` run after
    every step (`loop.Trainer`)."""
    with Trainer(cfg, hooks=hooks) as loop:
        return loop.run(SFTTask(cfg, records))
