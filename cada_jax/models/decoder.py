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
        return _rms(x, scale, self.cfg.rms_norm_eps, _dt(self.cfg.dtype), axis=-1)


def _rms(x, scale, eps, dt, axis: int):
    """RMSNorm of `x` over `axis` (computed in f32), times `scale` laid along that axis."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
    shape = [1] * x.ndim
    shape[axis] = -1
    return (y * scale.astype(jnp.float32).reshape(shape)).astype(dt)


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


def rope_tables(cfg: ModelConfig, positions_BT):
    inv = jnp.asarray(cfg.rope_inv_freq(), jnp.float32)
    freqs = positions_BT.astype(jnp.float32)[..., None] * inv  # [B,T,H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _weigh_values(scores_BKGTS, values_BKSH, mask_BTS, dt):
    """Attention output [B, K, G, T, H] from raw q.k scores: scaled, masked, softmaxed (f32), and
    applied to the values. The (b, k) batch dims lead the output too, so the product is a plain
    batched matmul (XLA:CPU runs a "->btkgh" output as a slow generic dot)."""
    scores = scores_BKGTS * (1.0 / np.sqrt(values_BKSH.shape[-1]))
    scores = jnp.where(mask_BTS[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    return jnp.einsum("bkgts,bksh->bkgth", probs, values_BKSH)


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
        if kv is not None:
            # the stacked [L, B, K, S, H] cache in the scan carry (the per-layer CPU path is
            # _forward_unrolled's)
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
            out = jax.nn.dot_product_attention(q, jnp.swapaxes(keys, 1, 2), jnp.swapaxes(values, 1, 2),
                                               mask=mask_BTS[:, None, :, :])
        elif cfg.attention_impl == "einsum":
            qg = q.reshape(B, T, K, cfg.num_groups, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
            scores = jnp.einsum("bkgth,bksh->bkgts", qg, keys, preferred_element_type=jnp.float32)
            out = _weigh_values(scores, values, mask_BTS, dt).transpose(0, 3, 1, 2, 4)
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
        dt = _dt(cfg.dtype)
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


def _rms_fm(x_DM, scale_D, eps, dt):
    """RMSNorm over the leading (feature) axis."""
    return _rms(x_DM, scale_D, eps, dt, axis=0)


def _rope_fm(x_NHM, cos_HM, sin_HM):
    """`rope` for feature-major [heads, head_dim, tokens] activations."""
    half = x_NHM.shape[1] // 2
    x32 = x_NHM.astype(jnp.float32)
    rot = jnp.concatenate([-x32[:, half:], x32[:, :half]], axis=1)
    return (x32 * cos_HM[None] + rot * sin_HM[None]).astype(x_NHM.dtype)


def _mm_fm(w_OI, x_IM, dt, bias=None):
    y = jnp.dot(w_OI.astype(dt), x_IM.astype(dt))
    return y if bias is None else y + bias.astype(dt)[:, None]


def _layer_fm(cfg: ModelConfig, w: dict, x_DM, cos_HM, sin_HM, mask_BTS, kv, index, B: int, T: int):
    """One decoder layer on feature-major activations [D, B*T] (column b*T + t). Named scopes
    (projections / attention / mlp) let profiles attribute the ops (benchmarks/sampler_profile.py)."""
    N, K, G, H = cfg.num_heads, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
    dt = _dt(cfg.dtype)
    with jax.named_scope("projections"):
        h = _rms_fm(x_DM, w["input_norm"], cfg.rms_norm_eps, dt)
        q = _mm_fm(w["q"], h, dt, w.get("q_bias")).reshape(N, H, B * T)
        k = _mm_fm(w["k"], h, dt, w.get("k_bias")).reshape(K, H, B * T)
        v = _mm_fm(w["v"], h, dt, w.get("v_bias")).reshape(K, H, B * T)
        if cfg.qk_norm:
            q = _rms_fm(q.transpose(1, 0, 2), w["q_norm"], cfg.rms_norm_eps, dt).transpose(1, 0, 2)
            k = _rms_fm(k.transpose(1, 0, 2), w["k_norm"], cfg.rms_norm_eps, dt).transpose(1, 0, 2)
        q, k = _rope_fm(q, cos_HM, sin_HM), _rope_fm(k, cos_HM, sin_HM)
    with jax.named_scope("attention"):
        qg = q.reshape(K, G, H, B, T).transpose(3, 0, 1, 4, 2)  # [B, K, G, T, H]
        k_BKHT = k.reshape(K, H, B, T).transpose(2, 0, 1, 3)
        v_BKTH = v.reshape(K, H, B, T).transpose(2, 0, 3, 1)
        chunked = False
        if kv is None:
            keys, values = k_BKHT, v_BKTH
        else:
            cdt = kv[0].dtype
            values = jax.lax.dynamic_update_slice(kv[1], v_BKTH.astype(cdt), (0, 0, index, 0))
            if kv[0].ndim == 5:  # decode layout: blocks of c slots [B, K, C, H, c] (see chunk_keys)
                if T != 1:
                    raise ValueError(f"chunked keys {kv[0].shape} take one token per call, got {T}")
                c = kv[0].shape[-1]
                keys = jax.lax.dynamic_update_slice(kv[0], k_BKHT[:, :, None].astype(cdt),
                                                    (0, 0, index // c, 0, index % c))
                chunked = True
            else:
                keys = jax.lax.dynamic_update_slice(kv[0], k_BKHT.astype(cdt), (0, 0, 0, index))
            kv = (keys, values)
            keys, values = keys.astype(dt), values.astype(dt)
        if chunked:
            # one batched matmul per (b, k, block): [G*T, H] x [H, c] (see chunk_keys)
            C, c = keys.shape[2], keys.shape[4]
            qc = jnp.broadcast_to(qg.reshape(B, K, 1, G * T, H), (B, K, C, G * T, H))
            scores = jnp.einsum("bkngh,bknhs->bkngs", qc, keys, preferred_element_type=jnp.float32)
            scores = jnp.swapaxes(scores, 2, 3).reshape(B, K, G, T, C * c)
        else:
            scores = jnp.einsum("bkgth,bkhs->bkgts", qg, keys, preferred_element_type=jnp.float32)
        out = _weigh_values(scores, values, mask_BTS, dt)  # [B, K, G, T, H]
        out = out.transpose(1, 2, 4, 0, 3).reshape(N * H, B * T)
    with jax.named_scope("projections"):
        x_DM = x_DM + _mm_fm(w["o"], out, dt)
    with jax.named_scope("mlp"):
        h = _rms_fm(x_DM, w["post_attn_norm"], cfg.rms_norm_eps, dt)
        g = _mm_fm(w["gate"], h, dt, w.get("gate_bias"))
        u = _mm_fm(w["up"], h, dt, w.get("up_bias"))
        x_DM = x_DM + _mm_fm(w["down"], nn.silu(g) * u, dt, w.get("down_bias"))
    return x_DM, kv


def _forward_unrolled(params, tokens_BT, positions_BT, mask_BTS, kv, index, cfg: ModelConfig, last_only: bool = False,
                      rope=None, vocab_major: bool = False):
    """The same network as `Decoder` on the weights `split_layers` lays out: the layer loop
    unrolled over per-layer buffers, activations feature-major [D, tokens], every weight [out, in].

    Used by the sampler on CPU. A scanned layer loop slices every layer's weights out of the
    stacked arrays on each decode step, which XLA:CPU materialises as copies (a full pass over the
    weights per token); per-layer buffers and per-layer cache buffers copy nothing. And XLA:CPU
    streams a weight through `W[out, in] @ x[in, tokens]` faster than through `x @ W[in, out]`:
    a chain of SmolLM2's 30 layers of projections at B=64 takes 77 ms against 90-95 ms, the
    49152 x 576 vocabulary head 19.1 against 23.4 ms (7.2 against 10.9 ms at B=16).

    `vocab_major=True` returns the logits as [V, B] (one token per row, or `last_only`).
    """
    B, T = tokens_BT.shape
    dt = _dt(cfg.dtype)
    x = jnp.take(params["embed"], tokens_BT.reshape(-1), axis=0).astype(dt).T  # [D, B*T]
    cos, sin = rope_tables(cfg, positions_BT) if rope is None else rope
    cos_HM, sin_HM = (jnp.moveaxis(t, -1, 0).reshape(cfg.head_dim, B * T) for t in (cos, sin))
    new_k, new_v = [], []
    for i, w in enumerate(params["layers"]):
        kv_i = None if kv is None else (kv[0][i], kv[1][i])
        x, kv_i = _layer_fm(cfg, w, x, cos_HM, sin_HM, mask_BTS, kv_i, index, B, T)
        if kv_i is not None:
            new_k.append(kv_i[0])
            new_v.append(kv_i[1])
    if last_only:
        x, T = x.reshape(-1, B, T)[:, :, -1], 1
    with jax.named_scope("lm_head"):
        x = _rms_fm(x, params["final_norm"]["scale"], cfg.rms_norm_eps, dt)
        logits = jnp.dot(params["head_VD"].astype(dt), x, preferred_element_type=jnp.float32)  # [V, B*T]
    if vocab_major:
        if T != 1:
            raise ValueError(f"vocabulary-major logits take one token per row, got {T}")
    else:
        logits = logits.T.reshape(B, T, -1)
    return logits, (None if kv is None else (tuple(new_k), tuple(new_v)))


def split_layers(params, cfg: ModelConfig) -> dict:
    """Params laid out for the unrolled path (`_forward_unrolled`): `layers` a tuple of per-layer
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


# ----------------------------------------------------------------------------- grouped scoring


def _grouped_layer(cfg: ModelConfig, w: dict, xp_MD, xc_MD, tabs: dict, masks: dict, N: int, P: int, B: int, C: int):
    """One decoder layer over a group batch: xp [N*P, D] prompt rows and xc [B*C, D] completion
    rows, B = N * G. Each completion attends to its own prompt's keys and causally to its own
    earlier tokens; the prompt's keys are never copied per sample (see `grouped_logits`)."""
    D, NH, K, Gq, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
    G = B // N
    dt = _dt(cfg.dtype)
    eps = cfg.rms_norm_eps
    a, m = w["attn"], w["mlp"]
    # q, k and v as one matmul against the three weights side by side
    w_qkv = jnp.concatenate([a["q_proj"].reshape(D, NH * H), a["k_proj"].reshape(D, K * H),
                             a["v_proj"].reshape(D, K * H)], axis=1)
    b_qkv = None
    if cfg.attention_bias:
        b_qkv = jnp.concatenate([a["q_bias"].reshape(-1), a["k_bias"].reshape(-1), a["v_bias"].reshape(-1)])

    def qkv(x_MD, cos, sin, lead):
        y = _mm(_rms(x_MD, w["input_norm"]["scale"], eps, dt, -1), w_qkv, dt)
        if b_qkv is not None:
            y = y + b_qkv.astype(dt)
        q = y[:, :NH * H].reshape(*lead, NH, H)
        k = y[:, NH * H:(NH + K) * H].reshape(*lead, K, H)
        v = y[:, (NH + K) * H:].reshape(*lead, K, H)
        if cfg.qk_norm:
            q = _rms(q, a["q_norm"]["scale"], eps, dt, -1)
            k = _rms(k, a["k_norm"]["scale"], eps, dt, -1)
        return rope(q, cos, sin), rope(k, cos, sin), v

    qp, kp, vp = qkv(xp_MD, tabs["cos_p"], tabs["sin_p"], (N, P))  # [N, P, ., H]
    qc, kc, vc = qkv(xc_MD, tabs["cos_c"], tabs["sin_c"], (B, C))  # [B, C, ., H]
    if cfg.attention_impl == "dot_product_attention":
        op = jax.nn.dot_product_attention(qp, kp, vp, mask=masks["pp"][:, None])
        keys = jnp.concatenate([jnp.repeat(kp, G, axis=0), kc], axis=1)
        values = jnp.concatenate([jnp.repeat(vp, G, axis=0), vc], axis=1)
        oc = jax.nn.dot_product_attention(qc, keys, values, mask=masks["c"][:, None])
        op, oc = op.reshape(N * P, NH * H), oc.reshape(B * C, NH * H)
    elif cfg.attention_impl == "einsum":
        scale = 1.0 / np.sqrt(H)
        kp_NKHP, vp_NKPH = kp.transpose(0, 2, 3, 1), vp.transpose(0, 2, 1, 3)
        # prompts: causal self-attention
        qg = qp.reshape(N, P, K, Gq, H).transpose(0, 2, 3, 1, 4)  # [N, K, Gq, P, H]
        s = jnp.einsum("nkgth,nkhs->nkgts", qg, kp_NKHP, preferred_element_type=jnp.float32)
        op = _weigh_values(s, vp_NKPH, masks["pp"], dt).transpose(0, 3, 1, 2, 4).reshape(N * P, NH * H)
        # completions: the G samples' queries stacked along time against their prompt's keys ...
        qs = qc.reshape(N, G, C, K, Gq, H).transpose(0, 3, 4, 1, 2, 5).reshape(N, K, Gq, G * C, H)
        s_p = jnp.einsum("nkgth,nkhs->nkgts", qs, kp_NKHP, preferred_element_type=jnp.float32)
        s_p = s_p.reshape(N, K, Gq, G, C, P).transpose(0, 3, 1, 2, 4, 5).reshape(B, K, Gq, C, P)
        # ... and each sample's queries against its own keys; one softmax over both
        qb = qc.reshape(B, C, K, Gq, H).transpose(0, 2, 3, 1, 4)  # [B, K, Gq, C, H]
        s_c = jnp.einsum("bkgth,bkhs->bkgts", qb, kc.transpose(0, 2, 3, 1), preferred_element_type=jnp.float32)
        s = jnp.concatenate([s_p, s_c], axis=-1) * scale
        s = jnp.where(masks["c"][:, None, None], s, _NEG)
        probs = jax.nn.softmax(s, axis=-1).astype(dt)
        pr_p = probs[..., :P].reshape(N, G, K, Gq, C, P).transpose(0, 2, 3, 1, 4, 5).reshape(N, K, Gq, G * C, P)
        o_p = jnp.einsum("nkgts,nksh->nkgth", pr_p, vp_NKPH).reshape(N, K, Gq, G, C, H).transpose(0, 3, 1, 2, 4, 5)
        o_c = jnp.einsum("bkgts,bksh->bkgth", probs[..., P:], vc.transpose(0, 2, 1, 3))
        oc = (o_p.reshape(B, K, Gq, C, H) + o_c).transpose(0, 3, 1, 2, 4).reshape(B * C, NH * H)
    else:
        raise ValueError(f"attention_impl {cfg.attention_impl!r}: use 'einsum' or 'dot_product_attention'")
    w_o = a["o_proj"].reshape(NH * H, D)

    def rest(x_MD, o_MD):
        x_MD = x_MD + _mm(o_MD, w_o, dt)
        h = _rms(x_MD, w["post_attn_norm"]["scale"], eps, dt, -1)
        g, u = _mm(h, m["gate_proj"], dt), _mm(h, m["up_proj"], dt)
        if cfg.mlp_bias:
            g, u = g + m["gate_bias"].astype(dt), u + m["up_bias"].astype(dt)
        y = _mm(nn.silu(g) * u, m["down_proj"], dt)
        if cfg.mlp_bias:
            y = y + m["down_bias"].astype(dt)
        return x_MD + y

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
    dt = _dt(cfg.dtype)
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
    x = _rms(x, params["final_norm"]["scale"], cfg.rms_norm_eps, dt, -1)
    if hidden_only:
        return x
    return _logits(cfg, x, embed, params.get("lm_head"))


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
            return _forward_unrolled(params, tokens_BT, positions_BT, mask_BTS, None, 0, cfg, last_only, rope,
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
        logits, (k, v) = _forward_unrolled(params, tokens_BT, positions_BT, mask_BTS, kv, index, cfg, last_only, rope,
                                           vocab_major)
    else:
        logits, (k, v) = model.apply({"params": params}, tokens_BT, positions_BT, mask_BTS, kv, index, last_only=last_only,
                                     rope=rope, hidden_only=hidden_only)
    return logits, {"k": k, "v": v, "mask": slot_mask_BS, "index": index + T}


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward_jit(params, tokens_BT, positions_BT, attention_mask_BT, cache=None, *, cfg: ModelConfig):
    """`forward` compiled once per (cfg, shapes)."""
    return forward(params, tokens_BT, positions_BT, attention_mask_BT, cache, cfg=cfg)


def positions_from_mask(attention_mask_BT):
    """RoPE positions for a (left- or right-) padded batch: running count of real tokens - 1."""
    m = jnp.asarray(attention_mask_BT).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)
