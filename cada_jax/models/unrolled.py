"""The decoder's CPU inference path: layers unrolled over per-layer buffers, activations feature-major.

The same network as `cada_jax.models.decoder.Decoder`, on the weights `split_layers` lays out: the
layer loop unrolled over per-layer buffers, activations feature-major [D, tokens], every weight
[out, in]. The layer math is `cada_jax.models.layers`; only the layout is this module's.

Used by the sampler on CPU. A scanned layer loop slices every layer's weights out of the stacked
arrays on each decode step, which XLA:CPU materialises as copies (a full pass over the weights per
token); per-layer buffers and per-layer cache buffers copy nothing. And XLA:CPU streams a weight
through `W[out, in] @ x[in, tokens]` faster than through `x @ W[in, out]`: a chain of SmolLM2's 30
layers of projections at B=64 takes 77 ms against 90-95 ms, the 49152 x 576 vocabulary head 19.1
against 23.4 ms (7.2 against 10.9 ms at B=16).

Shapes in names as in `cada_jax.models.layers`; M = B * T tokens, column b * T + t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cada_jax.models.config import ModelConfig
from cada_jax.models.layers import (
    apply_rope,
    attention_scores,
    dtype_of,
    gated_mlp,
    rms_norm,
    rope_tables,
    weigh_values,
)

KEY_CHUNK = 64  # cache slots per key block in the decode layout (see chunk_keys)


def key_chunk(slots: int) -> int:
    """Slots per key block for a decode cache of `slots` (a multiple of 32), 0 if none fits."""
    for c in (KEY_CHUNK, KEY_CHUNK // 2):
        if slots % c == 0:
            return c
    return 0


def chunk_keys(keys_BKHS, c: int):
    """Per-layer keys [B, K, H, S] -> [B, K, S // c, H, c]: blocks of c slots.

    The decode loop keeps its keys in this layout. XLA:CPU computes q.k against a [H, S] block as
    one matmul whose speed falls off once S passes about 100 slots (at B=64 and S=192: 27 ms per
    step over 30 layers against 14 ms with 64-slot blocks, measured with a chain of layers).
    """
    B, K, H, S = keys_BKHS.shape
    return keys_BKHS.reshape(B, K, H, S // c, c).transpose(0, 1, 3, 2, 4)


def _project_fm(x_IM, w_OI, bias_O, dt):
    """W[out, in] @ x[in, M] (+ bias) in the compute dtype: the `layers.Project` of this layout."""
    y_OM = jnp.dot(w_OI.astype(dt), x_IM.astype(dt))
    return y_OM if bias_O is None else y_OM + bias_O.astype(dt)[:, None]


def _chunked_scores(q_BKGTH, keys_BKCHc):
    """`layers.attention_scores` against keys in blocks of c slots [B, K, C, H, c] (`chunk_keys`):
    one batched matmul per (b, k, block), [G*T, H] x [H, c]; scores [B, K, G, T, C*c]."""
    B, K, G, T, H = q_BKGTH.shape
    C, c = keys_BKCHc.shape[2], keys_BKCHc.shape[4]
    q_BKCQH = jnp.broadcast_to(q_BKGTH.reshape(B, K, 1, G * T, H), (B, K, C, G * T, H))
    scores_BKCQc = jnp.einsum("bkcqh,bkchs->bkcqs", q_BKCQH, keys_BKCHc, preferred_element_type=jnp.float32)
    return jnp.swapaxes(scores_BKCQc, 2, 3).reshape(B, K, G, T, C * c)


def _write_cache(kv, k_BKHT, v_BKTH, index, T: int):
    """Write this call's keys/values at slot `index` of one layer's cache; (keys, values, chunked)."""
    cdt = kv[0].dtype
    values = jax.lax.dynamic_update_slice(kv[1], v_BKTH.astype(cdt), (0, 0, index, 0))
    if kv[0].ndim == 5:  # decode layout: blocks of c slots [B, K, C, H, c] (see chunk_keys)
        if T != 1:
            raise ValueError(f"chunked keys {kv[0].shape} take one token per call, got {T}")
        c = kv[0].shape[-1]
        keys = jax.lax.dynamic_update_slice(kv[0], k_BKHT[:, :, None].astype(cdt), (0, 0, index // c, 0, index % c))
        return keys, values, True
    return jax.lax.dynamic_update_slice(kv[0], k_BKHT.astype(cdt), (0, 0, 0, index)), values, False


def _layer_fm(cfg: ModelConfig, w: dict, x_DM, cos_HM, sin_HM, mask_BTS, kv, index, B: int, T: int):
    """One decoder layer on feature-major activations [D, B*T] (column b*T + t). Named scopes
    (projections / attention / mlp) let profiles attribute the ops (benchmarks/sampler_profile.py)."""
    N, K, G, H = cfg.num_heads, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
    dt = dtype_of(cfg.dtype)
    eps = cfg.rms_norm_eps

    def project(x_IM, w_OI, bias_O=None):
        return _project_fm(x_IM, w_OI, bias_O, dt)

    with jax.named_scope("projections"):
        h_DM = rms_norm(x_DM, w["input_norm"], eps, dt, axis=0)
        q_NHM = project(h_DM, w["q"], w.get("q_bias")).reshape(N, H, B * T)
        k_KHM = project(h_DM, w["k"], w.get("k_bias")).reshape(K, H, B * T)
        v_KHM = project(h_DM, w["v"], w.get("v_bias")).reshape(K, H, B * T)
        if cfg.qk_norm:
            q_NHM = rms_norm(q_NHM, w["q_norm"], eps, dt, axis=1)
            k_KHM = rms_norm(k_KHM, w["k_norm"], eps, dt, axis=1)
        q_NHM = apply_rope(q_NHM, cos_HM[None], sin_HM[None], axis=1)
        k_KHM = apply_rope(k_KHM, cos_HM[None], sin_HM[None], axis=1)
    with jax.named_scope("attention"):
        q_BKGTH = q_NHM.reshape(K, G, H, B, T).transpose(3, 0, 1, 4, 2)
        k_BKHT = k_KHM.reshape(K, H, B, T).transpose(2, 0, 1, 3)
        v_BKTH = v_KHM.reshape(K, H, B, T).transpose(2, 0, 3, 1)
        chunked = False
        if kv is None:
            keys, values = k_BKHT, v_BKTH
        else:
            keys, values, chunked = _write_cache(kv, k_BKHT, v_BKTH, index, T)
            kv = (keys, values)
            keys, values = keys.astype(dt), values.astype(dt)
        scores_BKGTS = _chunked_scores(q_BKGTH, keys) if chunked else attention_scores(q_BKGTH, keys, "BKHS")
        out_BKGTH = weigh_values(scores_BKGTS, values, mask_BTS, dt)
        out_NHM = out_BKGTH.transpose(1, 2, 4, 0, 3).reshape(N * H, B * T)
    with jax.named_scope("projections"):
        x_DM = x_DM + project(out_NHM, w["o"])
    with jax.named_scope("mlp"):
        h_DM = rms_norm(x_DM, w["post_attn_norm"], eps, dt, axis=0)
        x_DM = x_DM + gated_mlp(h_DM, project, w["gate"], w["up"], w["down"],
                                w.get("gate_bias"), w.get("up_bias"), w.get("down_bias"))
    return x_DM, kv


def forward_unrolled(params, tokens_BT, positions_BT, mask_BTS, kv, index, cfg: ModelConfig, last_only: bool = False,
                     rope=None, vocab_major: bool = False):
    """Logits and the per-layer cache (None without one) of the unrolled path; the arguments are
    `decoder.forward`'s after it has built the [B, T, S] mask.

    `vocab_major=True` returns the logits as [V, B] (one token per row, or `last_only`).
    """
    B, T = tokens_BT.shape
    dt = dtype_of(cfg.dtype)
    x_DM = jnp.take(params["embed"], tokens_BT.reshape(-1), axis=0).astype(dt).T
    cos, sin = rope_tables(cfg, positions_BT) if rope is None else rope
    cos_HM, sin_HM = (jnp.moveaxis(t, -1, 0).reshape(cfg.head_dim, B * T) for t in (cos, sin))
    new_k, new_v = [], []
    for i, w in enumerate(params["layers"]):
        kv_i = None if kv is None else (kv[0][i], kv[1][i])
        x_DM, kv_i = _layer_fm(cfg, w, x_DM, cos_HM, sin_HM, mask_BTS, kv_i, index, B, T)
        if kv_i is not None:
            new_k.append(kv_i[0])
            new_v.append(kv_i[1])
    if last_only:
        x_DM, T = x_DM.reshape(-1, B, T)[:, :, -1], 1
    with jax.named_scope("lm_head"):
        x_DM = rms_norm(x_DM, params["final_norm"]["scale"], cfg.rms_norm_eps, dt, axis=0)
        logits_VM = jnp.dot(params["head_VD"].astype(dt), x_DM, preferred_element_type=jnp.float32)
    if vocab_major:
        if T != 1:
            raise ValueError(f"vocabulary-major logits take one token per row, got {T}")
        logits = logits_VM
    else:
        logits = logits_VM.T.reshape(B, T, -1)
    return logits, (None if kv is None else (tuple(new_k), tuple(new_v)))


def split_layers(params, cfg: ModelConfig) -> dict:
    """Params laid out for the unrolled path (`forward_unrolled`): `layers` a tuple of per-layer
    dicts of [out, in] matrices (see `per_layer_weights`), `head_VD` the [V, D] vocabulary head
    (the embedding itself when tied)."""
    if isinstance(params["layers"], (tuple, list)):
        return params
    head = params["embed"] if "lm_head" not in params else jnp.swapaxes(params["lm_head"], 0, 1)
    return {"embed": params["embed"], "final_norm": params["final_norm"], "head_VD": head,
            "layers": per_layer_weights(params["layers"], cfg)}


def per_layer_weights(layers, cfg: ModelConfig) -> tuple:
    """The stacked `layers` params as one dict per layer of [out, in] matrices: q [N*H, D],
    k/v [K*H, D], o [D, N*H], gate/up [F, D], down [D, F]; norm scales and biases flat."""
    D, NH, KH = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    a, m = layers["attn"], layers["mlp"]

    def t(x, i, rows):  # layer i of a stacked [L, in..., out...] weight as [out, in]
        return x[i].reshape(rows, -1).T

    out = []
    for i in range(cfg.num_layers):
        w = {
            "q": t(a["q_proj"], i, D), "k": t(a["k_proj"], i, D), "v": t(a["v_proj"], i, D),
            "o": t(a["o_proj"], i, NH), "gate": t(m["gate_proj"], i, D), "up": t(m["up_proj"], i, D),
            "down": t(m["down_proj"], i, cfg.intermediate_size),
            "input_norm": layers["input_norm"]["scale"][i], "post_attn_norm": layers["post_attn_norm"]["scale"][i],
        }
        if cfg.attention_bias:
            w.update(q_bias=a["q_bias"][i].reshape(NH), k_bias=a["k_bias"][i].reshape(KH), v_bias=a["v_bias"][i].reshape(KH))
        if cfg.qk_norm:
            w.update(q_norm=a["q_norm"]["scale"][i], k_norm=a["k_norm"]["scale"][i])
        if cfg.mlp_bias:
            w.update(gate_bias=m["gate_bias"][i], up_bias=m["up_bias"][i], down_bias=m["down_bias"][i])
        out.append(w)
    return tuple(out)
