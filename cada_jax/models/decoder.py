"""Decoder-only transformer (Llama / Qwen2 / Qwen3 families) as Flax linen modules.

The parameters are a plain nested dict; every leaf carries logical axis names (see
`param_logical_axes`), which `cada_jax.sharding` maps onto a device mesh. Layers are stacked on a
leading `layers` axis and run with `nn.scan`, so compile time does not grow with depth.

The KV cache lives in the scan carry as whole `[layers, batch, kv_heads, slots, head_dim]` buffers
and each layer writes its new keys/values with `dynamic_update_slice` at (layer, slot); inside a
jitted decode loop XLA updates those buffers in place instead of copying them per layer.

Three paths run the same layer math (`cada_jax.models.layers`: norm, rotary, MLP and one attention
core): these Flax modules (training, the scanned cached forward), `grouped_logits` (scoring sampled
groups for a policy update) and `cada_jax.models.unrolled` (the CPU sampler's feature-major path,
reached through `forward` with per-layer params).

Shapes in names: B batch, T new tokens, S cache slots, D model width, N query heads, K kv heads,
G = N / K query heads per kv head, H head dim, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from cada_jax.models.config import ModelConfig
from cada_jax.models.layers import (
    attend,
    group_heads,
    ungroup_heads,
    attention,
    attention_probs,
    attention_scores,
    attention_values,
    check_attention_impl,
    dtype_of,
    gated_mlp,
    logits as _logits_of,
    matmul,
    positions_from_mask,
    rms_norm,
    rope,
    rope_tables,
)
from cada_jax.models.unrolled import forward_unrolled

Cache = dict  # {"k": [L,B,K,S,H], "v": [L,B,K,S,H], "mask": [B,S] bool, "index": int32 scalar}


def _param(module, name, shape, axes, cfg, init=None):
    init = init or nn.initializers.normal(0.02)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype_of(cfg.param_dtype))


class RMSNorm(nn.Module):
    cfg: ModelConfig
    size: int
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (self.size,), (self.axis_name,), self.cfg, nn.initializers.ones)
        return rms_norm(x, scale, self.cfg.rms_norm_eps, dtype_of(self.cfg.dtype), axis=-1)


def _project(x_BTD, w, dt):
    """x [B, T, D] times a weight [D, ...] -> [B, T, ...].

    With T > 1 (prefill, training) the rows are flattened into one 2-D matmul against a bitcast
    of the weight: the same math as an einsum, but XLA:CPU's backward of the 3-D einsum transposes
    whole activations around its weight-gradient dots (measured: forward+backward of SmolLM2 on
    16 x 104 tokens 13.1 s -> 9.8 s). For one-token decode steps the einsum form is the faster one
    (~10% per step), so it is kept there.
    """
    B, T, D = x_BTD.shape
    out = w.shape[1:]
    if T == 1:
        letters = "nhk"[: len(out)]
        return jnp.einsum(f"btd,d{letters}->bt{letters}", x_BTD.astype(dt), w.astype(dt))
    return matmul(x_BTD.reshape(B * T, D), w.reshape(D, -1), dt).reshape(B, T, *out)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, cos, sin, mask_BTS, kv, layer, index):
        cfg = self.cfg
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt = dtype_of(cfg.dtype)
        wq = _param(self, "q_proj", (D, N, H), ("embed", "heads", "head_dim"), cfg)
        wk = _param(self, "k_proj", (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
        wv = _param(self, "v_proj", (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
        wo = _param(self, "o_proj", (N, H, D), ("heads", "head_dim", "embed"), cfg)
        x = x_BTD.astype(dt)
        B, T = x.shape[:2]
        q_BTNH = _project(x, wq, dt)
        k_BTKH = _project(x, wk, dt)
        v_BTKH = _project(x, wv, dt)
        if cfg.attention_bias:
            zeros = nn.initializers.zeros
            q_BTNH = q_BTNH + _param(self, "q_bias", (N, H), ("heads", "head_dim"), cfg, zeros).astype(dt)
            k_BTKH = k_BTKH + _param(self, "k_bias", (K, H), ("kv_heads", "head_dim"), cfg, zeros).astype(dt)
            v_BTKH = v_BTKH + _param(self, "v_bias", (K, H), ("kv_heads", "head_dim"), cfg, zeros).astype(dt)
        if cfg.qk_norm:
            q_BTNH = RMSNorm(cfg, H, "head_dim", name="q_norm")(q_BTNH)
            k_BTKH = RMSNorm(cfg, H, "head_dim", name="k_norm")(k_BTKH)
        q_BTNH = rope(q_BTNH, cos, sin)
        k_BTKH = rope(k_BTKH, cos, sin)

        # Keys/values in [B, K, S, H] layout: both attention einsums are then plain batched
        # matmuls over (b, k) with no transposes of the cache.
        k_BKTH = jnp.swapaxes(k_BTKH, 1, 2)
        v_BKTH = jnp.swapaxes(v_BTKH, 1, 2)
        if kv is not None:
            # the stacked [L, B, K, S, H] cache in the scan carry (the per-layer CPU path is
            # models/unrolled.py's)
            k_all, v_all = kv
            cdt = k_all.dtype
            k_all = jax.lax.dynamic_update_slice(k_all, k_BKTH[None].astype(cdt), (layer, 0, 0, index, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, v_BKTH[None].astype(cdt), (layer, 0, 0, index, 0))
            keys_BKSH = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(dt)
            values_BKSH = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(dt)
            kv = (k_all, v_all)
        else:
            keys_BKSH, values_BKSH = k_BKTH, v_BKTH

        out_BTNH = attention(q_BTNH, keys_BKSH, values_BKSH, mask_BTS, cfg.attention_impl, dt)
        # (n, h) flattened so the output projection is one matmul against a bitcast of wo.
        y = _project(out_BTNH.reshape(B, T, N * H), wo.reshape(N * H, D), dt)
        return y, kv


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        D, F = cfg.hidden_size, cfg.intermediate_size
        dt = dtype_of(cfg.dtype)
        zeros = nn.initializers.zeros
        wg = _param(self, "gate_proj", (D, F), ("embed", "mlp"), cfg)
        wu = _param(self, "up_proj", (D, F), ("embed", "mlp"), cfg)
        wd = _param(self, "down_proj", (F, D), ("mlp", "embed"), cfg)
        biases = (None, None, None)
        if cfg.mlp_bias:
            biases = (_param(self, "gate_bias", (F,), ("mlp",), cfg, zeros),
                      _param(self, "up_bias", (F,), ("mlp",), cfg, zeros),
                      _param(self, "down_bias", (D,), ("embed",), cfg, zeros))

        def project(h, w, bias):
            y = _project(h, w, dt)
            return y if bias is None else y + bias.astype(dt)

        return gated_mlp(x, project, wg, wu, wd, *biases)


class DecoderLayer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, cos, sin, mask_BTS, index):
        x, kv, layer = carry
        cfg = self.cfg
        h, kv = Attention(cfg, name="attn")(
            RMSNorm(cfg, cfg.hidden_size, name="input_norm")(x), cos, sin, mask_BTS, kv, layer, index
        )
        x = x + h
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg, cfg.hidden_size, name="post_attn_norm")(x))
        return (x, kv, layer + 1), None


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _remat_policy(cfg: ModelConfig):
    """(whether to rematerialise each layer, the checkpoint policy) for ``cfg.remat``."""
    if cfg.remat == "none":
        return False, None
    if cfg.remat not in _REMAT_POLICIES:
        raise ValueError(f"remat {cfg.remat!r}: use one of none, {', '.join(_REMAT_POLICIES)}")
    return True, _REMAT_POLICIES[cfg.remat]


class Decoder(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT, mask_BTS, kv=None, index=0, last_only=False, rope=None,
                 hidden_only=False):
        cfg = self.cfg
        dt = dtype_of(cfg.dtype)
        embedding = _param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
        x = jnp.take(embedding, tokens_BT, axis=0).astype(dt)
        cos, sin = rope_tables(cfg, positions_BT) if rope is None else rope

        layer_cls = DecoderLayer
        remat, policy = _remat_policy(cfg)
        if remat:
            layer_cls = nn.remat(DecoderLayer, prevent_cse=False, policy=policy)
        stack = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        (x, kv, _), _ = stack(cfg, name="layers")((x, kv, jnp.int32(0)), cos, sin, mask_BTS, index)
        if last_only:
            x = x[:, -1:]
        x = RMSNorm(cfg, cfg.hidden_size, name="final_norm")(x)
        if hidden_only:
            return x, kv
        head = None
        if not cfg.tie_word_embeddings:
            head = _param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg)
        return _logits_of(x, embedding, head, dt), kv


# ----------------------------------------------------------------------------- grouped scoring


def _grouped_layer(cfg: ModelConfig, w: dict, xp_MD, xc_MD, tabs: dict, masks: dict, N: int, P: int, B: int, C: int):
    """One decoder layer over a group batch: xp [N*P, D] prompt rows and xc [B*C, D] completion
    rows, B = N * G. Each completion attends to its own prompt's keys and causally to its own
    earlier tokens; the prompt's keys are never copied per sample (see `grouped_logits`)."""
    D, NH, K, Gq, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
    G = B // N
    dt = dtype_of(cfg.dtype)
    eps = cfg.rms_norm_eps
    a, m = w["attn"], w["mlp"]
    # q, k and v as one matmul against the three weights side by side
    w_qkv = jnp.concatenate([a["q_proj"].reshape(D, NH * H), a["k_proj"].reshape(D, K * H),
                             a["v_proj"].reshape(D, K * H)], axis=1)
    b_qkv = None
    if cfg.attention_bias:
        b_qkv = jnp.concatenate([a["q_bias"].reshape(-1), a["k_bias"].reshape(-1), a["v_bias"].reshape(-1)])

    def qkv(x_MD, cos, sin, lead):
        y = matmul(rms_norm(x_MD, w["input_norm"]["scale"], eps, dt), w_qkv, dt)
        if b_qkv is not None:
            y = y + b_qkv.astype(dt)
        q = y[:, :NH * H].reshape(*lead, NH, H)
        k = y[:, NH * H:(NH + K) * H].reshape(*lead, K, H)
        v = y[:, (NH + K) * H:].reshape(*lead, K, H)
        if cfg.qk_norm:
            q = rms_norm(q, a["q_norm"]["scale"], eps, dt)
            k = rms_norm(k, a["k_norm"]["scale"], eps, dt)
        return rope(q, cos, sin), rope(k, cos, sin), v

    qp_NPKH, kp_NPKH, vp_NPKH = qkv(xp_MD, tabs["cos_p"], tabs["sin_p"], (N, P))
    qc_BCNH, kc_BCKH, vc_BCKH = qkv(xc_MD, tabs["cos_c"], tabs["sin_c"], (B, C))
    if check_attention_impl(cfg.attention_impl) == "dot_product_attention":
        op = jax.nn.dot_product_attention(qp_NPKH, kp_NPKH, vp_NPKH, mask=masks["pp"][:, None])
        keys = jnp.concatenate([jnp.repeat(kp_NPKH, G, axis=0), kc_BCKH], axis=1)
        values = jnp.concatenate([jnp.repeat(vp_NPKH, G, axis=0), vc_BCKH], axis=1)
        oc = jax.nn.dot_product_attention(qc_BCNH, keys, values, mask=masks["c"][:, None])
        op, oc = op.reshape(N * P, NH * H), oc.reshape(B * C, NH * H)
    else:
        kp_NKHP, vp_NKPH = kp_NPKH.transpose(0, 2, 3, 1), vp_NPKH.transpose(0, 2, 1, 3)
        # prompts: causal self-attention
        op = attend(group_heads(qp_NPKH, K), kp_NKHP, vp_NKPH, masks["pp"], dt)
        op = ungroup_heads(op).reshape(N * P, NH * H)
        # completions: the G samples' queries stacked along time against their prompt's keys ...
        qs = qc_BCNH.reshape(N, G, C, K, Gq, H).transpose(0, 3, 4, 1, 2, 5).reshape(N, K, Gq, G * C, H)
        s_p = attention_scores(qs, kp_NKHP)
        s_p = s_p.reshape(N, K, Gq, G, C, P).transpose(0, 3, 1, 2, 4, 5).reshape(B, K, Gq, C, P)
        # ... and each sample's queries against its own keys; one softmax over both
        s_c = attention_scores(group_heads(qc_BCNH, K), kc_BCKH.transpose(0, 2, 3, 1))
        probs = attention_probs(jnp.concatenate([s_p, s_c], axis=-1), masks["c"], H, dt)
        pr_p = probs[..., :P].reshape(N, G, K, Gq, C, P).transpose(0, 2, 3, 1, 4, 5).reshape(N, K, Gq, G * C, P)
        o_p = attention_values(pr_p, vp_NKPH).reshape(N, K, Gq, G, C, H).transpose(0, 3, 1, 2, 4, 5)
        o_c = attention_values(probs[..., P:], vc_BCKH.transpose(0, 2, 1, 3))
        oc = ungroup_heads(o_p.reshape(B, K, Gq, C, H) + o_c).reshape(B * C, NH * H)
    w_o = a["o_proj"].reshape(NH * H, D)

    def project(x_MD, w_, bias=None):
        y = matmul(x_MD, w_, dt)
        return y if bias is None else y + bias.astype(dt)

    mlp_biases = (m["gate_bias"], m["up_bias"], m["down_bias"]) if cfg.mlp_bias else ()

    def rest(x_MD, o_MD):
        x_MD = x_MD + matmul(o_MD, w_o, dt)
        h = rms_norm(x_MD, w["post_attn_norm"]["scale"], eps, dt)
        return x_MD + gated_mlp(h, project, m["gate_proj"], m["up_proj"], m["down_proj"], *mlp_biases)

    return rest(xp_MD, op), rest(xc_MD, oc)


def grouped_logits(params, prompt_tokens_NP, prompt_mask_NP, completion_tokens_BC, completion_mask_BC, *,
                   cfg: ModelConfig, hidden_only: bool = False):
    """Logits [B, C, V] (f32) predicting every completion token of a group batch: N prompts
    (left-padded), B = N * G completions (right-padded), completion i continuing prompt i // G.

    This is how a policy-gradient update and a reference model score sampled groups. One scan over
    the stacked layers (the params' own layout: nothing is split or transposed) carries two row
    blocks, the N prompts and the B completions without their last token, so each prompt's work is
    done once per group rather than once per sample. In every layer a completion attends to its
    prompt's keys and causally to its own earlier tokens, positions continuing the prompt's own
    length; the G samples' queries are stacked along time against one copy of the prompt's keys.
    The last prompt row predicts each sample's first token. Values equal a causal pass over each
    [prompt | completion] row alone, up to float rounding (tests/test_models.py).

    Compared with a prefill into a KV cache that is then repeated G times and extended by a
    second pass (what the update used to run): no cache in the scan carry, whose cotangent a
    backward pass would drag through every layer; the hidden states, not [B, C, V] logits, are
    joined; q/k/v are one matmul. On SmolLM2-135M at 4 prompts x 4 samples x 64 tokens (2-core CPU,
    f32, the two alternating in one process, median of 4) forward and backward take 7.35 s against
    8.10 s, the forward alone 2.16 s against 2.74 s.

    `hidden_only=True` returns the final-normed hidden states [B, C, D] instead.
    """
    ptok = jnp.asarray(prompt_tokens_NP, jnp.int32)
    pvalid = jnp.asarray(prompt_mask_NP).astype(bool)
    ctok = jnp.asarray(completion_tokens_BC, jnp.int32)
    cvalid = jnp.asarray(completion_mask_BC).astype(bool)
    (N, P), (B, C) = ptok.shape, ctok.shape
    if N == 0 or B % N:
        raise ValueError(f"{B} completions do not split into groups over {N} prompts")
    G, Cm = B // N, C - 1  # the last completion token predicts nothing
    D = cfg.hidden_size
    dt = dtype_of(cfg.dtype)
    embed = params["embed"]
    n_prompt_B = jnp.repeat(jnp.sum(pvalid, axis=1, dtype=jnp.int32), G)
    cos_p, sin_p = rope_tables(cfg, positions_from_mask(pvalid))
    cos_c, sin_c = rope_tables(cfg, n_prompt_B[:, None] + jnp.arange(Cm, dtype=jnp.int32)[None])
    tabs = {"cos_p": cos_p, "sin_p": sin_p, "cos_c": cos_c, "sin_c": sin_c}
    causal_P = jnp.tril(jnp.ones((P, P), bool))
    mask_cp = jnp.repeat(pvalid, G, axis=0)[:, None, :]  # [B, 1, P]
    mask_cc = jnp.tril(jnp.ones((Cm, Cm), bool))[None] & cvalid[:, None, :Cm]  # [B, Cm, Cm]
    masks = {"pp": causal_P[None] & pvalid[:, None, :],
             "c": jnp.concatenate([jnp.broadcast_to(mask_cp, (B, Cm, P)), mask_cc], axis=-1)}
    xp = jnp.take(embed, ptok.reshape(-1), axis=0).astype(dt)
    xc = jnp.take(embed, ctok[:, :Cm].reshape(-1), axis=0).astype(dt)

    def body(carry, w):
        return _grouped_layer(cfg, w, *carry, tabs, masks, N, P, B, Cm), None

    remat, policy = _remat_policy(cfg)
    if remat:
        body = jax.checkpoint(body, prevent_cse=False, policy=policy)
    (xp, xc), _ = jax.lax.scan(body, (xp, xc), params["layers"])
    last_N1D = xp.reshape(N, P, D)[:, -1:]  # left padding: the last slot is every prompt's last token
    x = jnp.concatenate([jnp.repeat(last_N1D, G, axis=0), xc.reshape(B, Cm, D)], axis=1)
    x = rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps, dt)
    if hidden_only:
        return x
    return _logits_of(x, embed, params.get("lm_head"), dt)


# ----------------------------------------------------------------------------- pure functions


def init_params(cfg: ModelConfig, rng) -> dict:
    """Random parameters (a plain nested dict of arrays) for `cfg`."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    mask = jnp.ones((1, 1, 1), bool)
    boxed = Decoder(cfg).init(rng, tokens, tokens, mask)["params"]
    return nn.meta.unbox(boxed)


def param_shapes(cfg: ModelConfig) -> dict:
    """ShapeDtypeStruct pytree of the parameters, without allocating them."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def param_logical_axes(cfg: ModelConfig) -> dict:
    """Pytree (same structure as params) of PartitionSpecs holding logical axis names."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    mask = jnp.ones((1, 1, 1), bool)
    boxed = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(0), tokens, tokens, mask)["params"])
    return nn.get_partition_spec(boxed)


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype: str | None = None, *, per_layer: bool = False) -> Cache:
    """An empty KV cache with `slots` positions per sequence.

    `per_layer=True` holds one buffer per layer (tuples under "k"/"v"): keys `[B, K, H, S]`, values
    `[B, K, S, H]`, the layout the unrolled decode path updates in place; otherwise one stacked
    `[L, B, K, S, H]` each.
    """
    dt = dtype_of(dtype or cfg.dtype)
    if per_layer:
        k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, slots)
        v_shape = (batch, cfg.num_kv_heads, slots, cfg.head_dim)
        k = tuple(jnp.zeros(k_shape, dt) for _ in range(cfg.num_layers))
        v = tuple(jnp.zeros(v_shape, dt) for _ in range(cfg.num_layers))
    else:
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, slots, cfg.head_dim)
        k, v = jnp.zeros(shape, dt), jnp.zeros(shape, dt)
    return {"k": k, "v": v, "mask": jnp.zeros((batch, slots), bool), "index": jnp.zeros((), jnp.int32)}


def forward(params, tokens_BT, positions_BT, attention_mask_BT, cache: Cache | None = None, *, cfg: ModelConfig,
            last_only: bool = False, rope=None, vocab_major: bool = False, hidden_only: bool = False):
    """Logits [B,T,V] (f32) for `tokens_BT` and the updated cache (None without one).

    `last_only=True` computes the logits of the last position only ([B,1,V]): a prefill needs no
    more, and the vocabulary projection is the largest single matmul of a short sequence.

    `attention_mask_BT` is 1 for real tokens and 0 for padding; `positions_BT` are the RoPE
    positions (with left padding: cumulative count of real tokens minus one). Without a cache,
    attention is causal over the T tokens. With a cache, the T tokens are written to slots
    [index, index+T) and attend to every valid slot up to their own.

    `rope` optionally gives the rotary tables (cos, sin) `[B, T, head_dim]` for `positions_BT`,
    precomputed by the caller (see `rope_tables`); the sampler's decode loop looks them up in a
    table built once outside the loop, so XLA cannot fuse cos/sin into every layer and recompute
    them there (twice per layer per step).

    `vocab_major=True` (per-layer params from `split_layers`, one token per row) returns the
    logits as [V, B] instead.

    `hidden_only=True` (stacked params) returns the final-normed hidden states [B, T, D] in the
    compute dtype instead of the logits (text embeddings, cada_jax.cada.embedding).
    """
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    positions_BT = jnp.asarray(positions_BT, jnp.int32)
    valid_BT = jnp.asarray(attention_mask_BT).astype(bool)
    T = tokens_BT.shape[1]
    unrolled = isinstance(params["layers"], (tuple, list))
    model = Decoder(cfg)
    if vocab_major and not unrolled:
        raise ValueError("vocab_major logits need per-layer params (split_layers)")
    if hidden_only and unrolled:
        raise ValueError("hidden_only needs the stacked params (as loaded), not per-layer params from split_layers")
    if cache is None:
        causal_TS = jnp.tril(jnp.ones((T, T), bool))
        mask_BTS = causal_TS[None] & valid_BT[:, None, :]
        if unrolled:
            return forward_unrolled(params, tokens_BT, positions_BT, mask_BTS, None, 0, cfg, last_only, rope,
                                     vocab_major)[0], None
        logits, _ = model.apply({"params": params}, tokens_BT, positions_BT, mask_BTS, last_only=last_only, rope=rope,
                                hidden_only=hidden_only)
        return logits, None
    index = cache["index"]
    S = cache["mask"].shape[1]
    slot_mask_BS = jax.lax.dynamic_update_slice(cache["mask"], valid_BT, (0, index))
    slots_S = jnp.arange(S)
    query_slot_T = index + jnp.arange(T)
    mask_BTS = slot_mask_BS[:, None, :] & (slots_S[None, None, :] <= query_slot_T[None, :, None])
    kv = (cache["k"], cache["v"])
    if unrolled != isinstance(cache["k"], (tuple, list)):
        raise ValueError("per-layer params (split_layers) need a per-layer cache (init_cache(per_layer=True)) and vice versa")
    if unrolled:
        logits, (k, v) = forward_unrolled(params, tokens_BT, positions_BT, mask_BTS, kv, index, cfg, last_only, rope,
                                           vocab_major)
    else:
        logits, (k, v) = model.apply({"params": params}, tokens_BT, positions_BT, mask_BTS, kv, index, last_only=last_only,
                                     rope=rope, hidden_only=hidden_only)
    return logits, {"k": k, "v": v, "mask": slot_mask_BS, "index": index + T}


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward_jit(params, tokens_BT, positions_BT, attention_mask_BT, cache=None, *, cfg: ModelConfig):
    """`forward` compiled once per (cfg, shapes)."""
    return forward(params, tokens_BT, positions_BT, attention_mask_BT, cache, cfg=cfg)
