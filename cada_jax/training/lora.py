"""LoRA adapters on the attention and MLP projections of the stacked decoder.

A kernel W with input axes I and output axes O (layers stacked on axis 0) gets two factors,
stacked per layer like the base parameter:

    q_proj [L, D, N, H]  ->  A [L, D, r],     B [L, r, N, H]
    k_proj / v_proj      ->  A [L, D, r],     B [L, r, K, H]
    o_proj [L, N, H, D]  ->  A [L, N, H, r],  B [L, r, D]       (input axes: heads x head_dim)
    gate/up [L, D, F]    ->  A [L, D, r],     B [L, r, F]
    down [L, F, D]       ->  A [L, F, r],     B [L, r, D]

and the effective weight is ``W + (alpha / r) * A @ B`` (contracted over r with an einsum). A is
drawn from N(0, 1/fan_in) (fan_in = the product of the input axes, a Kaiming-style scale); B is zero,
so a fresh adapter leaves the model unchanged.

`apply_lora` is pure and jittable: call it inside the loss with the frozen base params and the
trainable adapters, so `jax.grad` with respect to the adapters never touches the base weights.
The adapted weights are materialised per step (one extra copy of the targeted kernels); the
decoder stays LoRA-agnostic that way. `merge_lora` is the same sum outside the loss, and
`export_merged` writes the merged model as a HF directory.
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from cada_jax.checkpoints.hf import export_hf
from cada_jax.config import LORA_TARGETS, LoRASection
from cada_jax.models.config import ModelConfig
from cada_jax.models.decoder import param_logical_axes

__all__ = ["LORA_GROUPS", "init_lora", "apply_lora", "merge_lora", "export_merged", "lora_logical_axes", "lora_shapes",
           "lora_param_count"]

# target name -> (sub-module under params["layers"], number of input axes after the layer axis)
LORA_GROUPS = {
    "q_proj": ("attn", 1),
    "k_proj": ("attn", 1),
    "v_proj": ("attn", 1),
    "o_proj": ("attn", 2),
    "gate_proj": ("mlp", 1),
    "up_proj": ("mlp", 1),
    "down_proj": ("mlp", 1),
}
assert set(LORA_GROUPS) == set(LORA_TARGETS)


def _kernel(base, target: str):
    group, _ = LORA_GROUPS[target]
    try:
        return base["layers"][group][target]
    except (KeyError, TypeError):
        raise ValueError(f"lora.targets: params have no layers/{group}/{target}; are these decoder params?") from None


def _split_shape(shape: tuple, target: str):
    n_in = LORA_GROUPS[target][1]
    return shape[1:1 + n_in], shape[1 + n_in:]


def init_lora(params, cfg: ModelConfig, lora_cfg: LoRASection, rng) -> dict:
    """Adapters {"layers": {group: {target: {"a", "b"}}}} in float32; A ~ N(0, 1/fan_in), B = 0.

    All A factors come from one flat normal draw of `rng`, cut in the order of `lora_cfg.targets`
    (one random-number program to compile instead of one per shape).
    """
    del cfg  # the shapes come from the params themselves
    r = int(lora_cfg.rank)
    plan = []
    for target in lora_cfg.targets:
        w = _kernel(params, target)
        in_shape, out_shape = _split_shape(tuple(w.shape), target)
        plan.append((target, w.shape[0], in_shape, out_shape))
    sizes = [L * int(np.prod(i)) * r for _, L, i, _ in plan]
    flat = np.asarray(jax.random.normal(rng, (sum(sizes),), jnp.float32))
    out: dict = {"layers": {}}
    offset = 0
    for (target, L, in_shape, out_shape), n in zip(plan, sizes):
        fan_in = int(np.prod(in_shape))
        a = (flat[offset:offset + n].reshape(L, *in_shape, r) / np.sqrt(fan_in)).astype(np.float32)
        offset += n
        group = LORA_GROUPS[target][0]
        out["layers"].setdefault(group, {})[target] = {
            "a": jnp.asarray(a),
            "b": jnp.zeros((L, r, *out_shape), jnp.float32),
        }
    return out


def _delta(a, b):
    """sum_r A[l, in..., r] B[l, r, out...] as one einsum, for any number of in/out axes."""
    n_in, n_out = a.ndim - 2, b.ndim - 2
    letters = iter(string.ascii_lowercase.replace("l", "").replace("r", ""))
    ins = "".join(next(letters) for _ in range(n_in))
    outs = "".join(next(letters) for _ in range(n_out))
    return jnp.einsum(f"l{ins}r,lr{outs}->l{ins}{outs}", a, b, preferred_element_type=jnp.float32)


def apply_lora(base, lora, lora_cfg: LoRASection):
    """Params with every adapted kernel replaced by W + (alpha/r) A@B (in W's dtype); pure, jittable."""
    scale = float(lora_cfg.alpha) / float(lora_cfg.rank)
    layers = dict(base["layers"])
    for group, targets in lora["layers"].items():
        sub = dict(layers[group])
        for target, ab in targets.items():
            w = sub[target]
            a, b = ab["a"], ab["b"]
            if a.shape[-1] != lora_cfg.rank:
                raise ValueError(f"lora {group}/{target}: adapter rank {a.shape[-1]} != lora.rank={lora_cfg.rank}; use the config the adapters were made with")
            merged = w.astype(jnp.float32) + scale * _delta(a.astype(jnp.float32), b.astype(jnp.float32))
            sub[target] = merged.astype(w.dtype)
        layers[group] = sub
    out = dict(base)
    out["layers"] = layers
    return out


_apply_lora_jit = jax.jit(apply_lora, static_argnums=(2,))


def merge_lora(base, lora, lora_cfg: LoRASection):
    """`apply_lora` materialised (jitted) for export or evaluation outside the training loss."""
    return _apply_lora_jit(base, lora, lora_cfg)


def export_merged(base, lora, cfg: ModelConfig, lora_cfg: LoRASection, out_dir: str, tokenizer_dir: str | None = None,
                  *, dtype: str = "float32") -> str:
    """Write base + adapters, merged, as a HF directory that transformers loads (atomic)."""
    return export_hf(merge_lora(base, lora, lora_cfg), cfg, out_dir, tokenizer_dir=tokenizer_dir, dtype=dtype)


def lora_logical_axes(cfg: ModelConfig, lora_cfg: LoRASection) -> dict:
    """PartitionSpecs of logical axis names for the adapters: A keeps the kernel's input axes, B
    its output axes; the rank axis is replicated (None)."""
    base_axes = param_logical_axes(cfg)
    out: dict = {"layers": {}}
    for target in lora_cfg.targets:
        group, n_in = LORA_GROUPS[target]
        names = tuple(base_axes["layers"][group][target])
        a = PartitionSpec(*names[:1 + n_in], None)
        b = PartitionSpec(names[0], None, *names[1 + n_in:])
        out["layers"].setdefault(group, {})[target] = {"a": a, "b": b}
    return out


def lora_shapes(cfg: ModelConfig, lora_cfg: LoRASection) -> dict:
    """ShapeDtypeStructs of the adapters `init_lora` makes (same tree), without drawing them."""
    from cada_jax.models.decoder import param_shapes

    base = param_shapes(cfg)
    r = int(lora_cfg.rank)
    out: dict = {"layers": {}}
    for target in lora_cfg.targets:
        w = _kernel(base, target)
        in_shape, out_shape = _split_shape(tuple(w.shape), target)
        out["layers"].setdefault(LORA_GROUPS[target][0], {})[target] = {
            "a": jax.ShapeDtypeStruct((w.shape[0], *in_shape, r), jnp.float32),
            "b": jax.ShapeDtypeStruct((w.shape[0], r, *out_shape), jnp.float32),
        }
    return out


def lora_param_count(lora) -> int:
    return int(sum(x.size for x in jax.tree.leaves(lora)))
