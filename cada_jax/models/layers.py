"""The math of one decoder layer, shared by the decoder's three paths.

`cada_jax.models.decoder` runs it as Flax modules (training, the scanned cached forward) and as the
grouped scorer of sampled completions (`grouped_logits`); `cada_jax.models.unrolled` runs it on
feature-major activations for the CPU sampler. Each path keeps its own activation layout (that is
where their speed comes from); what a layer computes lives here once: RMSNorm, rotary embedding,
the gated MLP and the attention core (GQA head grouping, scores, masking, softmax, weighted sum).

Shapes in names: B batch, T queries, S keys (cache slots), K kv heads, G = N / K query heads per kv
head, N query heads, H head dim, D model width, V vocab, M flattened tokens.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cada_jax.models.config import ModelConfig

NEG_INF = -0.7 * float(np.finfo(np.float32).max)  # masked score: finite, so a fully masked row stays finite

ATTENTION_IMPLS = ("einsum", "dot_product_attention")


def dtype_of(name: str):
    return jnp.dtype(name)


def check_attention_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {impl!r}: use 'einsum' or 'dot_product_attention'")
    return impl


# ----------------------------------------------------------------------------- norm, matmul, rotary


def rms_norm(x, scale, eps, dt, axis: int = -1):
    """RMSNorm of `x` over `axis` (computed in f32), times `scale` laid along that axis."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
    shape = [1] * x.ndim
    shape[axis] = -1
    return (y * scale.astype(jnp.float32).reshape(shape)).astype(dt)


def matmul(x_MK, w_KN, dt):
    """[M, K] @ [K, N] in the compute dtype."""
    return jnp.dot(x_MK.astype(dt), w_KN.astype(dt))


def rope_tables(cfg: ModelConfig, positions_BT):
    """(cos, sin) [B, T, H] of the rotary embedding at `positions_BT`."""
    inv = jnp.asarray(cfg.rope_inv_freq(), jnp.float32)
    freqs_BTh = positions_BT.astype(jnp.float32)[..., None] * inv
    emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
    return jnp.cos(emb_BTH), jnp.sin(emb_BTH)


def apply_rope(x, cos, sin, axis: int = -1):
    """Rotary embedding, HF 'rotate_half' layout (first half / second half of head_dim on `axis`);
    `cos`/`sin` broadcast against `x` (the caller lays them out for its activation layout)."""
    x32 = x.astype(jnp.float32)
    lo, hi = jnp.split(x32, 2, axis=axis)
    rot = jnp.concatenate([-hi, lo], axis=axis)
    return (x32 * cos + rot * sin).astype(x.dtype)


def rope(x_BTNH, cos_BTH, sin_BTH):
    """`apply_rope` for token-major [B, T, heads, H] activations."""
    return apply_rope(x_BTNH, cos_BTH[:, :, None, :], sin_BTH[:, :, None, :])


def positions_from_mask(attention_mask_BT):
    """RoPE positions for a (left- or right-) padded batch: running count of real tokens - 1."""
    m = jnp.asarray(attention_mask_BT).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)


# ----------------------------------------------------------------------------- MLP


Project = Callable  # (x, weight, bias or None) -> x @ weight (+ bias), in the path's own layout


def gated_mlp(h, project: Project, gate, up, down, gate_bias=None, up_bias=None, down_bias=None):
    """SwiGLU MLP: down(silu(gate(h)) * up(h)); `project` applies one weight in the caller's layout."""
    g = project(h, gate, gate_bias)
    u = project(h, up, up_bias)
    return project(jax.nn.silu(g) * u, down, down_bias)


# ----------------------------------------------------------------------------- attention core


def group_heads(q_BTNH, num_kv_heads: int):
    """Query heads grouped by the kv head they share (GQA): [B, T, N, H] -> [B, K, G, T, H]."""
    B, T, N, H = q_BTNH.shape
    return q_BTNH.reshape(B, T, num_kv_heads, N // num_kv_heads, H).transpose(0, 2, 3, 1, 4)


def ungroup_heads(out_BKGTH):
    """The inverse of `group_heads`: [B, K, G, T, H] -> [B, T, N, H]."""
    B, K, G, T, H = out_BKGTH.shape
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, H)


_KEY_LAYOUTS = {"BKHS": "bkhs", "BKSH": "bksh"}


def attention_scores(q_BKGTH, keys, keys_layout: str = "BKHS"):
    """Raw q.k scores [B, K, G, T, S] in f32. Keys come [B, K, H, S] (the unrolled cache) or
    [B, K, S, H] (the stacked cache); with (b, k) as the leading batch dims either product is a
    plain batched matmul with no transpose of the cache."""
    spec = _KEY_LAYOUTS[keys_layout]
    return jnp.einsum(f"bkgth,{spec}->bkgts", q_BKGTH, keys, preferred_element_type=jnp.float32)


def attention_probs(scores_BKGTS, mask_BTS, head_dim: int, dt):
    """Scaled, masked, softmaxed (f32) scores, cast to the compute dtype."""
    scores_BKGTS = scores_BKGTS * (1.0 / np.sqrt(head_dim))
    scores_BKGTS = jnp.where(mask_BTS[:, None, None, :, :], scores_BKGTS, NEG_INF)
    return jax.nn.softmax(scores_BKGTS, axis=-1).astype(dt)


def attention_values(probs_BKGTS, values_BKSH):
    """The probability-weighted sum of the values, [B, K, G, T, H]. The (b, k) batch dims lead the
    output too, so the product is a plain batched matmul (XLA:CPU runs a "->btkgh" output as a slow
    generic dot)."""
    return jnp.einsum("bkgts,bksh->bkgth", probs_BKGTS, values_BKSH)


def weigh_values(scores_BKGTS, values_BKSH, mask_BTS, dt):
    """Attention output [B, K, G, T, H] from raw scores: `attention_probs` then `attention_values`."""
    return attention_values(attention_probs(scores_BKGTS, mask_BTS, values_BKSH.shape[-1], dt), values_BKSH)


def attend(q_BKGTH, keys, values_BKSH, mask_BTS, dt, keys_layout: str = "BKHS"):
    """Grouped-query attention [B, K, G, T, H]: scores, mask, softmax, weighted sum."""
    return weigh_values(attention_scores(q_BKGTH, keys, keys_layout), values_BKSH, mask_BTS, dt)


def attention(q_BTNH, keys_BKSH, values_BKSH, mask_BTS, impl: str, dt):
    """Attention output [B, T, N, H] of token-major queries against keys/values in the stacked
    cache's [B, K, S, H] layout, by `impl`: our einsum core, or `jax.nn.dot_product_attention`
    (cuDNN flash attention on GPU where its masks fit)."""
    if check_attention_impl(impl) == "dot_product_attention":
        return jax.nn.dot_product_attention(q_BTNH, jnp.swapaxes(keys_BKSH, 1, 2), jnp.swapaxes(values_BKSH, 1, 2),
                                            mask=mask_BTS[:, None, :, :])
    q_BKGTH = group_heads(q_BTNH, keys_BKSH.shape[1])
    return ungroup_heads(attend(q_BKGTH, keys_BKSH, values_BKSH, mask_BTS, dt, "BKSH"))


# ----------------------------------------------------------------------------- vocabulary head


def logits(x_BTD, embedding_VD, head_DV, dt):
    """Logits [B, T, V] in f32 from final-normed hidden states; `head_DV` None = tied embedding.

    With T > 1 the rows are flattened into one 2-D matmul (XLA:CPU's backward of a 3-D einsum
    transposes whole activations); a one-token decode step keeps the einsum, which is faster there.
    """
    B, T, D = x_BTD.shape
    if T == 1:
        if head_DV is None:
            out = jnp.einsum("btd,vd->btv", x_BTD, embedding_VD.astype(dt), preferred_element_type=jnp.float32)
        else:
            out = jnp.einsum("btd,dv->btv", x_BTD, head_DV.astype(dt), preferred_element_type=jnp.float32)
        return out.astype(jnp.float32)
    x_MD = x_BTD.reshape(B * T, D).astype(dt)
    if head_DV is None:
        out = jax.lax.dot_general(x_MD, embedding_VD.astype(dt), (((1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.float32)
    else:
        out = jnp.dot(x_MD, head_DV.astype(dt), preferred_element_type=jnp.float32)
    return out.astype(jnp.float32).reshape(B, T, -1)
