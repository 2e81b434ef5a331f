"""Decoder-only transformer (Llama / Qwen2 / Qwen3 families) as Flax linen modules.

The parameters are a plain nested dict; every leaf carries logical axis names (see
`param_logical_axes`), which `cada_jax.sharding` maps onto a device mesh. Layers are stacked on a
leading `layers` axis and run with `nn.scan`, so compile time does not grow with depth.

The KV cache lives in the scan carry as whole `[layers, batch, kv_heads, slots, head_dim]` buffers
and each layer writes its new keys/values with `dynamic_update_slice` at (layer, slot); inside a
jitted decode loop XLA updates those buffers in place instead of copying them per layer.

Shapes in names: B batch, T new tokens, S cache slots, D model width, N query heads, K kv heads,
G = N / K query heads per kv head, H head dim, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cada_jax.models.config import ModelConfig

Cache = dict  # {"k": [L,B,K,S,H], "v": [L,B,K,S,H], "mask": [B,S] bool, "index": int32 scalar}

_NEG = -0.7 * float(np.finfo(np.float32).max)


def _dt(name: str):
    return jnp.dtype(name)


def _param(module, name, shape, axes, cfg, init=None):
    init = init or nn.initializers.normal(0.02)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, _dt(cfg.param_dtype))


class RMSNorm(nn.Module):
    cfg: ModelConfig
    size: int
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (self.size,), (self.axis_name,), self.cfg, nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        return (y * scale.astype(jnp.float32)).astype(_dt(self.cfg.dtype))


def _mm(x_MK, w_KN, dt):
    """[M, K] @ [K, N] in the compute dtype."""
    return jnp.dot(x_MK.astype(dt), w_KN.astype(dt))


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
    return _mm(x_BTD.reshape(B * T, D), w.reshape(D, -1), dt).reshape(B, T, *out)


def rope(x_BTNH, cos_BTH, sin_BTH):
    """Rotary embedding, HF 'rotate_half' layout (first half / second half of head_dim)."""
    half = x_BTNH.shape[-1] // 2
    x32 = x_BTNH.astype(jnp.float32)
    rot = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos_BTH[:, :, None, :] + rot * sin_BTH[:, :, None, :]
    return out.astype(x_BTNH.dtype)


def rope_tables(cfg: ModelConfig, positions_BT):
    inv = jnp.asarray(cfg.rope_inv_freq(), jnp.float32)
    freqs = positions_BT.astype(jnp.float32)[..., None] * inv  # [B,T,H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, cos, sin, mask_BTS, kv, layer, index):
        cfg = self.cfg
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt = _dt(cfg.dtype)
        wq = _param(self, "q_proj", (D, N, H), ("embed", "heads", "head_dim"), cfg)
        wk = _param(self, "k_proj", (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
        wv = _param(self, "v_proj", (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
        wo = _param(self, "o_proj", (N, H, D), ("heads", "head_dim", "embed"), cfg)
        x = x_BTD.astype(dt)
        B, T = x.shape[:2]
        q = _project(x, wq, dt)
        k = _project(x, wk, dt)
        v = _project(x, wv, dt)
        if cfg.attention_bias:
            zeros = nn.initializers.zeros
            q = q + _param(self, "q_bias", (N, H), ("heads", "head_dim"), cfg, zeros).astype(dt)
            k = k + _param(self, "k_bias", (K, H), ("kv_heads", "head_dim"), cfg, zeros).astype(dt)
            v = v + _param(self, "v_bias", (K, H), ("kv_heads", "head_dim"), cfg, zeros).astype(dt)
        if cfg.qk_norm:
            q = RMSNorm(cfg, H, "head_dim", name="q_norm")(q)
            k = RMSNorm(cfg, H, "head_dim", name="k_norm")(k)
        q = rope(q, cos, sin)
        k = rope(k, cos, sin)

        # Keys/values in [B, K, S, H] layout: both attention einsums are then plain batched
        # matmuls over (b, k) with no transposes of the cache.
        k = jnp.swapaxes(k, 1, 2)
        v = jnp.swapaxes(v, 1, 2)
        keys_transposed = False
        if kv is not None and kv[0].ndim == 4:
            # One layer's own buffers (unrolled decode path): keys [B, K, H, S], values
            # [B, K, S, H]. With the keys' slots last, q.k is a plain matmul: XLA:CPU repacks a
            # [S, H] right-hand side on every call (at B=64 that repack was 2/3 of the attention).
            cdt = kv[0].dtype
            k_all = jax.lax.dynamic_update_slice(kv[0], jnp.swapaxes(k, 2, 3).astype(cdt), (0, 0, 0, index))
            v_all = jax.lax.dynamic_update_slice(kv[1], v.astype(cdt), (0, 0, index, 0))
            keys, values, keys_transposed = k_all.astype(dt), v_all.astype(dt), True
            kv = (k_all, v_all)
        elif kv is not None:
            k_all, v_all = kv
            cdt = k_all.dtype
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(cdt), (layer, 0, 0, index, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(cdt), (layer, 0, 0, index, 0))
            keys = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(dt)
            values = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(dt)
            kv = (k_all, v_all)
        else:
            keys, values = k, v

        if cfg.attention_impl == "dot_product_attention":
            keys_BSKH = keys.transpose(0, 3, 1, 2) if keys_transposed else jnp.swapaxes(keys, 1, 2)
            out = jax.nn.dot_product_attention(q, keys_BSKH, jnp.swapaxes(values, 1, 2), mask=mask_BTS[:, None, :, :])
        elif cfg.attention_impl == "einsum":
            qg = q.reshape(B, T, K, cfg.num_groups, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
            spec = "bkgth,bkhs->bkgts" if keys_transposed else "bkgth,bksh->bkgts"
            scores = jnp.einsum(spec, qg, keys, preferred_element_type=jnp.float32)
            scores = scores * (1.0 / np.sqrt(H))
            scores = jnp.where(mask_BTS[:, None, None, :, :], scores, _NEG)
            probs = jax.nn.softmax(scores, axis=-1).astype(dt)
            # batch dims (b, k) leading in the output too: a plain batched matmul (XLA:CPU runs the
            # "->btkgh" form as a slow generic dot); the transpose after it is cheap
            out = jnp.einsum("bkgts,bksh->bkgth", probs, values).transpose(0, 3, 1, 2, 4)
        else:
            raise ValueError(f"attention_impl {cfg.attention_impl!r}: use 'einsum' or 'dot_product_attention'")
        # (n, h) flattened so the output projection is one matmul against a bitcast of wo.
        y = _project(out.reshape(B, T, N * H), wo.reshape(N * H, D), dt)
        return y, kv


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        D, F = cfg.hidden_size, cfg.intermediate_size
        dt = _dt(cfg.dtype)
        wg = _param(self, "gate_proj", (D, F), ("embed", "mlp"), cfg)
        wu = _param(self, "up_proj", (D, F), ("embed", "mlp"), cfg)
        wd = _param(self, "down_proj", (F, D), ("mlp", "embed"), cfg)
        g = _project(x, wg, dt)
        u = _project(x, wu, dt)
        if cfg.mlp_bias:
            zeros = nn.initializers.zeros
            g = g + _param(self, "gate_bias", (F,), ("mlp",), cfg, zeros).astype(dt)
            u = u + _param(self, "up_bias", (F,), ("mlp",), cfg, zeros).astype(dt)
        y = _project(nn.silu(g) * u, wd, dt)
        if cfg.mlp_bias:
            y = y + _param(self, "down_bias", (D,), ("embed",), cfg, nn.initializers.zeros).astype(dt)
        return y


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


class Decoder(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT, mask_BTS, kv=None, index=0, last_only=False, rope=None):
        cfg = self.cfg
        dt = _dt(cfg.dtype)
        embedding = _param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
        x = jnp.take(embedding, tokens_BT, axis=0).astype(dt)
        cos, sin = rope_tables(cfg, positions_BT) if rope is None else rope

        layer_cls = DecoderLayer
        if cfg.remat != "none":
            if cfg.remat not in _REMAT_POLICIES:
                raise ValueError(f"remat {cfg.remat!r}: use one of none, {', '.join(_REMAT_POLICIES)}")
            layer_cls = nn.remat(DecoderLayer, prevent_cse=False, policy=_REMAT_POLICIES[cfg.remat])
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
        head = None
        if not cfg.tie_word_embeddings:
            head = _param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg)
        return _logits(cfg, x, embedding, head), kv


def _logits(cfg: ModelConfig, x_BTD, embedding_VD, head_DV=None):
    dt = _dt(cfg.dtype)
    B, T, D = x_BTD.shape
    if T == 1:  # see _project
        if head_DV is None:
            logits = jnp.einsum("btd,vd->btv", x_BTD, embedding_VD.astype(dt), preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("btd,dv->btv", x_BTD, head_DV.astype(dt), preferred_element_type=jnp.float32)
        return logits.astype(jnp.float32)
    x2 = x_BTD.reshape(B * T, D).astype(dt)
    if head_DV is None:
        logits = jax.lax.dot_general(x2, embedding_VD.astype(dt), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    else:
        logits = jnp.dot(x2, head_DV.astype(dt), preferred_element_type=jnp.float32)
    return logits.astype(jnp.float32).reshape(B, T, -1)


def _forward_unrolled(params, tokens_BT, positions_BT, mask_BTS, kv, index, cfg: ModelConfig, last_only: bool = False,
                      rope=None):
    """The same network as `Decoder`, with the layer loop unrolled over per-layer parameters.

    Used by the sampler: a scanned layer loop slices every layer's weights out of the stacked
    arrays on each decode step, which XLA:CPU materialises as copies (a full pass over the
    weights per token). With per-layer buffers (split once per generate call by `split_layers`)
    and per-layer cache buffers, a decode step reads each weight once and copies nothing.
    """
    x = jnp.take(params["embed"], tokens_BT, axis=0).astype(_dt(cfg.dtype))
    cos, sin = rope_tables(cfg, positions_BT) if rope is None else rope
    layer = DecoderLayer(cfg)
    new_k, new_v = [], []
    for i, lp in enumerate(params["layers"]):
        kv_i = None if kv is None else (kv[0][i], kv[1][i])
        (x, kv_i, _), _ = layer.apply({"params": lp}, (x, kv_i, 0), cos, sin, mask_BTS, index)
        if kv_i is not None:
            new_k.append(kv_i[0])
            new_v.append(kv_i[1])
    if last_only:
        x = x[:, -1:]
    x = RMSNorm(cfg, cfg.hidden_size).apply({"params": params["final_norm"]}, x)
    logits = _logits(cfg, x, params["embed"], params.get("lm_head"))
    return logits, (None if kv is None else (tuple(new_k), tuple(new_v)))


def split_layers(params, cfg: ModelConfig) -> dict:
    """Params with `layers` as a tuple of per-layer dicts (for the unrolled decode path)."""
    if isinstance(params["layers"], (tuple, list)):
        return params
    layers = tuple(jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(cfg.num_layers))
    return {**params, "layers": layers}


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
    dt = _dt(dtype or cfg.dtype)
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
            last_only: bool = False, rope=None):
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
    """
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    positions_BT = jnp.asarray(positions_BT, jnp.int32)
    valid_BT = jnp.asarray(attention_mask_BT).astype(bool)
    T = tokens_BT.shape[1]
    unrolled = isinstance(params["layers"], (tuple, list))
    model = Decoder(cfg)
    if cache is None:
        causal_TS = jnp.tril(jnp.ones((T, T), bool))
        mask_BTS = causal_TS[None] & valid_BT[:, None, :]
        if unrolled:
            return _forward_unrolled(params, tokens_BT, positions_BT, mask_BTS, None, 0, cfg, last_only, rope)[0], None
        logits, _ = model.apply({"params": params}, tokens_BT, positions_BT, mask_BTS, last_only=last_only, rope=rope)
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
        logits, (k, v) = _forward_unrolled(params, tokens_BT, positions_BT, mask_BTS, kv, index, cfg, last_only, rope)
    else:
        logits, (k, v) = model.apply({"params": params}, tokens_BT, positions_BT, mask_BTS, kv, index, last_only=last_only,
                                     rope=rope)
    return logits, {"k": k, "v": v, "mask": slot_mask_BS, "index": index + T}


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward_jit(params, tokens_BT, positions_BT, attention_mask_BT, cache=None, *, cfg: ModelConfig):
    """`forward` compiled once per (cfg, shapes)."""
    return forward(params, tokens_BT, positions_BT, attention_mask_BT, cache, cfg=cfg)


def positions_from_mask(attention_mask_BT):
    """RoPE positions for a (left- or right-) padded batch: running count of real tokens - 1."""
    m = jnp.asarray(attention_mask_BT).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)
