"""The rollout engine: jitted prefill + on-device decode loop over a preallocated KV cache.

- Prompts are left-padded to a length bucket (and the batch to a batch bucket) so only a handful
  of programs compile; explicit positions and masks keep padding out of RoPE and attention.
- One prefill per prompt; for `n` samples per prompt the prefilled cache is repeated n times
  on device (a GRPO group shares its prefill).
- Prompts that open with the same tokens (a chat template's system turn, a shared instruction)
  share that prefix's prefill: it runs once at batch 1, its cache is broadcast to every row, and
  only each prompt's own suffix is prefilled per row (`SamplingParams.share_prefix`).
- The decode loop is a `lax.while_loop` whose carry holds the cache (updated in place with
  dynamic_update_slice), the last logits, the output buffers and the done flags; it exits as
  soon as every sequence has finished. With stop strings, the loop runs in chunks and the host
  checks the decoded text between chunks.
- On CPU the programs run the decoder's unrolled path (`unrolled.forward_unrolled`): per-layer
  [out, in] weight buffers, made once per set of params and kept (`Sampler.decode_params`),
  feature-major activations, keys in blocks of 64 slots, and vocabulary-major logits [V, S] for
  the draw. GPU/TPU run the scanned decoder over the stacked weights and cache.
- Returned log-probs are those of the sampled tokens under the model's unmodified distribution
  (log-softmax of the raw logits, before temperature / top-k / top-p), as RL needs.
- With a `mesh` the prompt batch and the KV cache are split over (data, fsdp) and the weights
  stay in their shardings. Across several processes every process passes the same prompts; each
  fills only its own shards and reads the results back whole (a gather), so all get the same output.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cada_jax.models.config import ModelConfig
from cada_jax.models.decoder import forward, init_cache
from cada_jax.models.layers import rope_tables
from cada_jax.models.unrolled import chunk_keys, key_chunk, per_layer_weights, split_layers
from cada_jax.sharding import place_rows, shard_params, to_host
from cada_jax.tokenizer import Tokenizer, bucket, length_bucket


class SamplingError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256  # tokens generated per sample at most
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    n: int = 1  # samples per prompt (a GRPO group); they share one prefill
    seed: int = 0  # one seed -> per-sequence keys
    stop_strings: tuple = ()  # stop when the decoded completion contains any of these
    eos_ids: tuple | None = None  # None = the tokenizer's / generation config's EOS set
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens
    cache_dtype: str | None = None  # "float32" | "bfloat16"; None = the model's compute dtype
    truncate_prompt: str = "error"  # "error" | "left": what to do with prompts that do not fit
    stop_check_every: int = 32  # decode steps between host-side stop-string checks
    share_prefix: bool = True  # prefill the prompts' common leading tokens once (see `shared_prefix_len`)

    def validate(self):
        if self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise SamplingError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise SamplingError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.n < 1:
            raise SamplingError(f"n={self.n}: must be >= 1")
        if self.truncate_prompt not in ("error", "left"):
            raise SamplingError(f"truncate_prompt={self.truncate_prompt!r}: use 'error' or 'left'")


@dataclasses.dataclass
class SampleOutput:
    """Samples in prompt-major order: sample j of prompt i is row i * n + j."""

    prompt_ids: list  # [num_prompts] lists of prompt token ids
    completion_ids: list  # [num_samples] lists of completion token ids (stop/EOS token included)
    logprobs: list  # [num_samples] float32 arrays, one per completion token
    texts: list  # [num_samples] decoded completions (special tokens and stop strings removed)
    finish_reasons: list  # [num_samples] "stop" | "length"
    n: int
    timings: dict = dataclasses.field(default_factory=dict)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(c) for c in self.completion_ids], np.int32)

    @property
    def group_index(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.prompt_ids)), self.n)


# --------------------------------------------------------------------------- device programs


PREFIX_MULTIPLE = 8  # shared prefixes are cut to a multiple of this (few distinct programs)
SLOT_MULTIPLE = 32  # the unrolled decode cache holds a multiple of this many slots (key blocks)
MIN_SHARED_PREFIX = 16  # shorter common prefixes are not worth a second prefill pass


def shared_prefix_len(ids: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt shares, as the sampler uses them: cut down to a
    multiple of PREFIX_MULTIPLE, leaving every prompt at least one token of its own (the last
    position's logits come from the per-row pass), and 0 when under MIN_SHARED_PREFIX or for a
    single prompt."""
    if len(ids) < 2:
        return 0
    common = min(len(os.path.commonprefix([list(p) for p in ids])), min(len(p) for p in ids) - 1)
    common -= common % PREFIX_MULTIPLE
    return common if common >= MIN_SHARED_PREFIX else 0


def _prefill(params, tokens_BP, mask_BP, prefix_1p=None, *, cfg: ModelConfig, cache_dtype: str, unroll: bool):
    """Prefill a cache of exactly the prompt's slots; returns (last logits [B, V], cache, next
    position [B]). `_start_state` widens the cache to the decode loop's slots.

    Without `prefix_1p` the left-padded prompts fill slots [0, P). With it, the shared prefix
    [1, p] is run once into slots [0, p), that cache is broadcast to the B rows, and the
    left-padded suffixes fill slots [p, p + P) at positions p, p + 1, ... (the padding between
    prefix and suffix is masked out and takes no position). The prompt's attention reads only
    these p + P slots, not the empty ones the decode loop will fill (at B=64 and 128 new tokens
    that was a third of the prefill).
    """
    B, P = tokens_BP.shape
    if unroll:
        params = split_layers(params, cfg)
    if prefix_1p is None:
        cache = init_cache(cfg, B, P, cache_dtype, per_layer=unroll)
        offset = 0
    else:
        p = prefix_1p.shape[1]
        one = init_cache(cfg, 1, p + P, cache_dtype, per_layer=unroll)
        positions_1p = jnp.arange(p, dtype=jnp.int32)[None]
        _, one = forward(params, prefix_1p, positions_1p, jnp.ones_like(prefix_1p), one, cfg=cfg, last_only=True)

        def rows(x):
            return tuple(rows(a) for a in x) if isinstance(x, tuple) else jnp.repeat(x, B, axis=1 if x.ndim == 5 else 0)

        cache = {"k": rows(one["k"]), "v": rows(one["v"]), "mask": rows(one["mask"]), "index": one["index"]}
        offset = p
    positions = offset + jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0)
    logits, cache = forward(params, tokens_BP, positions, mask_BP, cache, cfg=cfg, last_only=True)
    next_pos_B = offset + jnp.sum(mask_BP, axis=1).astype(jnp.int32)
    return logits[:, -1, :], cache, next_pos_B


def _widen(x, axis: int, slots: int):
    """Zero-pad the slot axis of a cache buffer to `slots`."""
    extra = slots - x.shape[axis]
    if extra < 0:
        raise ValueError(f"cache buffer {x.shape} has more than {slots} slots on axis {axis}")
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _split_weights(params, cfg):
    """`split_layers` without the embedding, which a jitted function would return as a copy."""
    head = jnp.swapaxes(params["lm_head"], 0, 1) if "lm_head" in params else None
    return per_layer_weights(params["layers"], cfg), head


def _expand(x, n, axis):
    return x if n == 1 else jnp.repeat(x, n, axis=axis)


def _filter_logits(logits_BV, temperature, top_k: int, use_top_p: bool, top_p):
    x = logits_BV / jnp.maximum(temperature, 1e-6)
    neg = jnp.finfo(x.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(x, top_k)[0][:, -1:]
        x = jnp.where(x < kth, neg, x)
    if use_top_p:
        sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_x, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always keep the top token)
        keep_sorted = (cum - probs) < top_p
        cutoff = jnp.min(jnp.where(keep_sorted, sorted_x, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, neg, x)
    return x


def _categorical_vocab_major(keys_S, weights_VS, block: int = 256):
    """One categorical draw per column, with probabilities proportional to `weights_VS` (>= 0).

    Inverts the CDF with a single uniform per column, which is exact like Gumbel-max but needs S
    random numbers per step instead of S x V (on CPU ~0.5 ms against ~15 ms per step for a 49k
    vocabulary). The CDF is searched in two levels: the vocabulary is cut into blocks of `block`
    weights, a cumulative sum over the block totals picks the block, and a cumulative sum inside
    that one block picks the token. A full-vocabulary cumulative sum is the slowest op XLA:CPU
    runs per token (a reduce-window); block totals are one cheap reduction. A token of weight 0
    is never drawn. The weights are vocabulary-major ([V, S], the decode loop's logits layout).
    """
    V, S = weights_VS.shape
    w = weights_VS.astype(jnp.float32)
    nb = -(-V // block)
    if nb * block != V:
        w = jnp.pad(w, ((0, nb * block - V), (0, 0)))
    w = w.reshape(nb, block, S)
    totals = jnp.sum(w, axis=1)  # [nb, S]
    cum = jnp.cumsum(totals, axis=0)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, 1e-7, 1.0))(keys_S) * cum[-1]
    j = jnp.minimum(jnp.sum(cum < u[None], axis=0), nb - 1)  # first block whose cum reaches u
    before = jnp.take_along_axis(jnp.pad(cum, ((1, 0), (0, 0)))[:-1], j[None], axis=0)[0]
    inner = jnp.take_along_axis(w, j[None, None], axis=0)[0]  # [block, S]
    inner_cum = jnp.cumsum(inner, axis=0)
    rest = jnp.minimum(u - before, inner_cum[-1])
    i = jnp.minimum(jnp.sum(inner_cum < rest[None], axis=0), block - 1)
    return (j * block + i).astype(jnp.int32)


def _decode(params, state, keys_S, eos_ids, temperature, top_p, *, cfg, steps: int, max_new: int,
            greedy: bool, top_k: int, use_top_p: bool, unroll: bool, unit_temperature: bool = False):
    """Run up to `steps` decode steps (or until all sequences are done) from `state`."""
    eos = jnp.asarray(eos_ids, jnp.int32)
    start = state["step"]
    # Per-layer weight buffers, split once here (outside the loop) rather than sliced out of
    # the stacked arrays on every step: see unrolled.forward_unrolled.
    if unroll:
        params = split_layers(params, cfg)
    # RoPE tables for every position a new token can take (< cache slots), built once per call;
    # each step gathers its rows.
    cos_SH, sin_SH = (t[0] for t in rope_tables(cfg, jnp.arange(state["cache"]["mask"].shape[1])[None]))

    def cond(s):
        return (s["step"] < jnp.minimum(start + steps, max_new)) & ~jnp.all(s["done"])

    def body(s):
        logits = s["logits"]  # [V, S]: vocabulary-major (see unrolled.forward_unrolled)
        # One max and one exp pass over the vocabulary give both the draw and the sampled token's
        # log-prob under the unmodified distribution (log-softmax of the raw logits).
        m = jnp.max(logits, axis=0, keepdims=True)
        raw = jnp.exp(logits - m)
        lse = m[0] + jnp.log(jnp.sum(raw, axis=0))
        if greedy:
            tok = jnp.argmax(logits, axis=0).astype(jnp.int32)
        else:
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_S, s["step"])
            if top_k > 0 or use_top_p:
                filtered = _filter_logits(jnp.swapaxes(logits, 0, 1), temperature, top_k, use_top_p, top_p)
                weights = jnp.swapaxes(jnp.exp(filtered - jnp.max(filtered, axis=-1, keepdims=True)), 0, 1)
            elif unit_temperature:
                weights = raw
            else:
                weights = jnp.exp((logits - m) / jnp.maximum(temperature, 1e-6))
            tok = _categorical_vocab_major(step_keys, weights)
        tok_logp = jnp.take_along_axis(logits, tok[None], axis=0)[0] - lse
        live = ~s["done"]
        tok = jnp.where(live, tok, 0)
        t = s["step"]
        out_tok = jax.lax.dynamic_update_slice(s["tokens"], tok[:, None], (0, t))
        out_lp = jax.lax.dynamic_update_slice(s["logp"], jnp.where(live, tok_logp, 0.0)[:, None], (0, t))
        hit_eos = jnp.any(tok[:, None] == eos[None, :], axis=-1) & live
        lengths = s["lengths"] + live.astype(jnp.int32)
        done = s["done"] | hit_eos
        rope = (jnp.take(cos_SH, s["pos"], axis=0)[:, None], jnp.take(sin_SH, s["pos"], axis=0)[:, None])
        logits, cache = forward(
            params, tok[:, None], s["pos"][:, None], live[:, None].astype(jnp.int32), s["cache"], cfg=cfg, rope=rope,
            vocab_major=unroll,
        )
        return {
            "step": t + 1,
            "cache": cache,
            "logits": logits if unroll else jnp.swapaxes(logits[:, 0, :], 0, 1),
            "pos": s["pos"] + live.astype(jnp.int32),
            "tokens": out_tok,
            "logp": out_lp,
            "lengths": lengths,
            "done": done,
            "eos_hit": s["eos_hit"] | hit_eos,
        }

    return jax.lax.while_loop(cond, body, state)


@functools.partial(jax.jit, static_argnames=("n", "max_new", "slots"))
def _start_state(last_logits_BV, cache, next_pos_B, valid_B, *, n: int, max_new: int, slots: int | None = None):
    """The decode loop's state after a prefill: each prompt's cache and logits repeated `n`
    times, the cache widened to `slots` (default: prompt + max_new), logits vocabulary-major
    [V, S], per-layer keys in blocks of slots (`chunk_keys`)."""
    S = last_logits_BV.shape[0] * n
    slots = int(slots or cache["mask"].shape[1] + max_new)
    if isinstance(cache["k"], tuple):
        # per-layer buffers, batch first (unrolled path): keys [B,K,H,S], values [B,K,S,H]
        c = key_chunk(slots)
        keys = tuple(_widen(_expand(k, n, 0), 3, slots) for k in cache["k"])
        keys = tuple(chunk_keys(k, c) for k in keys) if c else keys
        values = tuple(_widen(_expand(v, n, 0), 2, slots) for v in cache["v"])
    else:  # one stacked [L,B,K,S,H] array each
        keys, values = (_widen(_expand(x, n, 1), 3, slots) for x in (cache["k"], cache["v"]))
    cache = {
        "k": keys,
        "v": values,
        "mask": _widen(_expand(cache["mask"], n, 0), 1, slots),
        "index": cache["index"],
    }
    return {
        "step": jnp.zeros((), jnp.int32),
        "cache": cache,
        "logits": jnp.swapaxes(_expand(last_logits_BV, n, 0), 0, 1),
        "pos": _expand(next_pos_B, n, 0),
        "tokens": jnp.zeros((S, max_new), jnp.int32),
        "logp": jnp.zeros((S, max_new), jnp.float32),
        "lengths": jnp.zeros((S,), jnp.int32),
        # padding rows of the batch bucket start finished
        "done": ~_expand(valid_B, n, 0),
        "eos_hit": jnp.zeros((S,), bool),
    }


# ------------------------------------------------------------------------------- the engine


class Sampler:
    """Holds the compiled prefill/decode programs for one model config; params are per call."""

    def __init__(self, cfg: ModelConfig, tokenizer: Tokenizer, *, max_seq_len: int | None = None,
                 length_buckets: Sequence[int] | None = None, batch_buckets: Sequence[int] | None = None,
                 mesh=None, unroll_layers: bool | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_seq_len = int(max_seq_len or cfg.max_position_embeddings)
        self.length_buckets = tuple(length_buckets) if length_buckets else None
        self.batch_buckets = tuple(batch_buckets) if batch_buckets else None
        self.mesh = mesh
        self.stats = {"prefill_calls": 0, "decode_calls": 0, "prompts": 0, "samples": 0}
        # Unrolled layers over per-layer weight/cache buffers (see unrolled.forward_unrolled) pay
        # off where XLA copies each scanned layer's weights out of the stacked arrays: on CPU.
        # On GPU/TPU the scan's slices fuse into the matmuls, and splitting would hold the weights
        # twice, so the scanned path with the stacked cache is used there.
        self.unroll_layers = (jax.default_backend() == "cpu") if unroll_layers is None else bool(unroll_layers)
        self._prefill = jax.jit(_prefill, static_argnames=("cfg", "cache_dtype", "unroll"))
        self._split = None  # (ids of the params' arrays, those arrays, their split_layers copy)
        self._split_layers = jax.jit(_split_weights, static_argnames=("cfg",))
        self._decode = jax.jit(
            _decode,
            static_argnames=("cfg", "steps", "max_new", "greedy", "top_k", "use_top_p", "unroll", "unit_temperature"),
            donate_argnums=(1,),
        )

    def decode_params(self, params):
        """`params` as the programs read them: on the unrolled path, the per-layer [out, in]
        weight buffers of `split_layers`.

        The copy is kept for the next call with the same arrays (an evaluation loop, a GRPO step's
        sampling rounds): it is 538 MB for SmolLM2-135M in f32, and making it inside every prefill
        and decode program cost two fresh copies per `generate`. The entry holds the stacked
        arrays it was made from, so their ids cannot be reused by other arrays while it lives; it
        is dropped before a copy of other weights is made, and ignored once they are deleted
        (donated to an update).
        """
        if not self.unroll_layers or isinstance(params["layers"], (tuple, list)):
            return params
        leaves = jax.tree.leaves(params)
        key = tuple(id(x) for x in leaves)
        if self._split is not None and self._split[0] == key and not any(x.is_deleted() for x in leaves):
            return self._split[2]
        self._split = None
        layers, head = self._split_layers({k: v for k, v in params.items() if k != "embed"}, self.cfg)
        split = {"embed": params["embed"], "final_norm": params["final_norm"], "layers": layers,
                 "head_VD": params["embed"] if head is None else head}
        self._split = (key, leaves, split)
        return split

    def release_weights(self):
        """Drop the kept per-layer weight copy (`decode_params`), e.g. before a training update
        that donates the weights it was made from: the memory is free again right away."""
        self._split = None

    # -- prompts -> ids
    def encode_prompts(self, prompts) -> list[list[int]]:
        if prompts is None or len(prompts) == 0:
            raise SamplingError("no prompts given: pass at least one prompt (str, chat messages or token ids)")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = self.tokenizer.encode(self.tokenizer.apply_chat_template([{"role": "user", "content": p}]))
            elif isinstance(p, (list, tuple)) and p and isinstance(p[0], dict):
                ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(list(p)))
            elif isinstance(p, (list, tuple, np.ndarray)) and len(p) and np.issubdtype(np.asarray(p).dtype, np.integer):
                ids = [int(x) for x in p]
            else:
                raise SamplingError(f"prompt {i}: expected a string, a list of chat messages or token ids, got {type(p).__name__}")
            if not ids:
                raise SamplingError(f"prompt {i} is empty after tokenization")
            out.append(ids)
        return out

    def generate(self, params, prompts, sp: SamplingParams = SamplingParams(), *, prompt_ids=None) -> SampleOutput:
        sp.validate()
        t0 = time.perf_counter()
        if prompt_ids is not None:
            ids = [list(map(int, p)) for p in prompt_ids]
            if not ids or any(len(p) == 0 for p in ids):
                raise SamplingError("prompt_ids: give at least one non-empty list of token ids")
        else:
            ids = self.encode_prompts(prompts)
        budget = self.max_seq_len - sp.max_new_tokens
        if budget < 1:
            raise SamplingError(f"max_new_tokens={sp.max_new_tokens} leaves no room for the prompt in the {self.max_seq_len}-token context")
        for i, p in enumerate(ids):
            if len(p) > budget:
                if sp.truncate_prompt == "left":
                    ids[i] = p = p[-budget:]
                else:
                    raise SamplingError(
                        f"prompt {i} has {len(p)} tokens; with max_new_tokens={sp.max_new_tokens} the context of "
                        f"{self.max_seq_len} allows {budget}; shorten it, lower max_new_tokens or set truncate_prompt='left'"
                    )
        B = len(ids)
        Bp = bucket(B, self.batch_buckets)
        shared = shared_prefix_len(ids) if sp.share_prefix else 0
        longest = max(len(p) for p in ids) - shared
        if self.length_buckets:
            P = min(bucket(longest, self.length_buckets, minimum=16), budget - shared)
        else:
            P = min(length_bucket(longest), budget - shared)
        tokens, mask = self.tokenizer.pad([p[shared:] for p in ids], side="left", length=P, batch=Bp)
        valid = np.arange(Bp) < B
        slots = shared + P + sp.max_new_tokens
        if self.unroll_layers:  # whole blocks of keys for the decode loop (see unrolled.chunk_keys)
            slots = -(-slots // SLOT_MULTIPLE) * SLOT_MULTIPLE
        cache_dtype = sp.cache_dtype or self.cfg.dtype
        tokens, mask = self._place(tokens), self._place(mask)
        prefix = jnp.asarray(np.asarray(ids[0][:shared], np.int32)[None]) if shared else None
        multi = jax.process_count() > 1
        # Host values that every process holds alike enter the programs as numpy (replicated) when
        # the mesh spans processes; a process-local jax.Array cannot.
        host_arg = np.asarray if multi else (lambda x: x)

        params = self.decode_params(params)
        last, cache, next_pos = self._prefill(params, tokens, mask, host_arg(prefix) if shared else None, cfg=self.cfg,
                                              cache_dtype=cache_dtype, unroll=self.unroll_layers)
        self.stats["prefill_calls"] += 1
        state = _start_state(last, cache, next_pos, valid if multi else jnp.asarray(valid), n=sp.n,
                             max_new=sp.max_new_tokens, slots=slots)
        jax.block_until_ready(state)  # so prefill_s / decode_s time what they name (dispatch is async)
        t_prefill = time.perf_counter()

        eos = tuple(sp.eos_ids) if sp.eos_ids is not None else tuple(sorted(self.tokenizer.eos_ids))
        if sp.ignore_eos or not eos:
            eos = (-1,)
        S = Bp * sp.n
        keys = host_arg(jax.random.split(jax.random.PRNGKey(sp.seed), S))
        greedy = sp.temperature == 0
        chunk = sp.max_new_tokens if not sp.stop_strings else max(1, sp.stop_check_every)
        stopped = np.zeros(S, bool)
        while True:
            state = self._decode(
                params, state, keys, eos, host_arg(jnp.float32(sp.temperature)), host_arg(jnp.float32(sp.top_p)), cfg=self.cfg,
                steps=chunk, max_new=sp.max_new_tokens, greedy=greedy, top_k=int(sp.top_k), use_top_p=sp.top_p < 1.0,
                unroll=self.unroll_layers, unit_temperature=sp.temperature == 1.0,
            )
            self.stats["decode_calls"] += 1
            step = int(to_host(state["step"]))
            done = to_host(state["done"])
            if step >= sp.max_new_tokens or done.all():
                break
            if sp.stop_strings:
                toks = to_host(state["tokens"])
                lens = to_host(state["lengths"])
                for i in np.nonzero(~done)[0]:
                    text = self.tokenizer.decode(toks[i, : lens[i]], skip_special_tokens=False)
                    if any(s in text for s in sp.stop_strings):
                        stopped[i] = True
                if stopped.any():
                    new_done = done | stopped
                    state["done"] = shard_params(new_done, state["done"].sharding) if multi else jnp.asarray(new_done)
        toks = to_host(state["tokens"])
        lps = to_host(state["logp"])
        lens = to_host(state["lengths"])
        eos_hit = to_host(state["eos_hit"])
        t_decode = time.perf_counter()

        out_ids, out_lp, texts, reasons = [], [], [], []
        for i in range(B * sp.n):
            c = toks[i, : lens[i]].tolist()
            lp = lps[i, : lens[i]]
            reason = "stop" if eos_hit[i] else "length"
            if sp.stop_strings:
                c, lp, hit = self._cut_at_stop(c, lp, sp.stop_strings)
                reason = "stop" if (hit or eos_hit[i]) else reason
            text = self.tokenizer.decode(c, skip_special_tokens=True)
            for s in sp.stop_strings:
                k = text.find(s)
                if k >= 0:
                    text = text[:k]
            out_ids.append(c)
            out_lp.append(np.asarray(lp, np.float32))
            texts.append(text)
            reasons.append(reason)
        self.stats["prompts"] += B
        self.stats["samples"] += B * sp.n
        timings = {
            "prefill_s": t_prefill - t0,
            "decode_s": t_decode - t_prefill,
            "total_s": time.perf_counter() - t0,
            "decode_steps": int(to_host(state["step"])),
            "shared_prefix": shared,  # leading prompt tokens prefilled once for the whole batch
        }
        return SampleOutput(ids, out_ids, out_lp, texts, reasons, sp.n, timings)

    def _cut_at_stop(self, ids, lp, stops):
        """Shortest prefix of `ids` whose text contains a stop string (kept, like an EOS token)."""
        full = self.tokenizer.decode(ids, skip_special_tokens=False)
        if not any(s in full for s in stops):
            return ids, lp, False
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in self.tokenizer.decode(ids[:mid], skip_special_tokens=False) for s in stops):
                hi = mid
            else:
                lo = mid + 1
        return ids[:lo], lp[:lo], True

    def _place(self, x):
        """A host batch array on the mesh as the trainers place theirs (`sharding.place_rows`)."""
        return jnp.asarray(x) if self.mesh is None else place_rows(x, self.mesh)
