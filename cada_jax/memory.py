"""Per-device memory of a GRPO step on a mesh, from the model config and the mesh rules alone.

`memory_estimate` is the formula launch/README.md sizes runs with (no devices needed);
`cada_jax.plan` measures the compiled programs instead.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from cada_jax.models.config import ModelConfig
from cada_jax.sharding import MESH_AXES, MeshConfig, ShardingError, logical_to_mesh, rules_for

__all__ = ["memory_estimate"]


def memory_estimate(
    cfg: ModelConfig,
    mesh_cfg: MeshConfig,
    *,
    batch: int,
    seq_len: int,
    num_devices: int | None = None,
    param_dtype: str | None = None,
    opt_dtype: str = "float32",
    opt_states: int = 2,
    cache_dtype: str | None = None,
    act_dtype: str | None = None,
    reference: bool = True,
) -> dict:
    """Per-device memory (bytes) of a GRPO step on a mesh, by the formulas in launch/README.md.

    With P the parameter count, s = fsdp*tensor the weight shards, b = ceil(batch / (data*fsdp))
    the per-device batch, t_kv = tensor if it divides num_kv_heads else 1:

      params      = P * bytes(param_dtype) / s            (norm scales are replicated; counted exactly)
      reference   = params                                (frozen copy for the KL term; 0 if reference=False)
      grads       = params
      optimizer   = opt_states * P * bytes(opt_dtype) / s (AdamW: mu and nu)
      kv_cache    = 2 * L * b * seq_len * (K / t_kv) * H * bytes(cache_dtype)
      logits      = b * seq_len * (V / tensor) * 4        (f32 logits of the loss forward)
      activations = L * b * seq_len * D * bytes(act_dtype) (layer inputs kept with remat="full")

    `num_devices` is needed only when an axis of `mesh_cfg` is -1. Returns a dict with those keys,
    ``total``, ``n_params`` and the resolved ``mesh`` sizes.
    """
    sizes_t = mesh_cfg.resolve(num_devices if num_devices is not None else _fixed_product(mesh_cfg))
    sizes = dict(zip(MESH_AXES, sizes_t))
    pb = jnp.dtype(param_dtype or cfg.param_dtype).itemsize
    ob = jnp.dtype(opt_dtype).itemsize
    cb = jnp.dtype(cache_dtype or cfg.dtype).itemsize
    ab = jnp.dtype(act_dtype or cfg.dtype).itemsize

    from cada_jax.models.decoder import param_logical_axes, param_shapes

    rules = rules_for(cfg, sizes)
    n_params = 0
    local_elems = 0
    shapes = jax.tree_util.tree_leaves(param_shapes(cfg))
    specs = jax.tree_util.tree_leaves(param_logical_axes(cfg), is_leaf=lambda x: isinstance(x, PartitionSpec))
    for leaf, spec in zip(shapes, specs):
        n = math.prod(leaf.shape)
        n_params += n
        split = 1
        for entry in tuple(logical_to_mesh(spec, rules)):
            if entry is not None:
                split *= math.prod(sizes[a] for a in ((entry,) if isinstance(entry, str) else entry))
        local_elems += n // split
    b_local = -(-batch // (sizes["data"] * sizes["fsdp"]))
    t_kv = sizes["tensor"] if cfg.num_kv_heads % sizes["tensor"] == 0 else 1
    t_v = sizes["tensor"] if cfg.vocab_size % sizes["tensor"] == 0 else 1
    out = {
        "params": local_elems * pb,
        "reference": local_elems * pb if reference else 0,
        "grads": local_elems * pb,
        "optimizer": opt_states * local_elems * ob,
        "kv_cache": 2 * cfg.num_layers * b_local * seq_len * (cfg.num_kv_heads // t_kv) * cfg.head_dim * cb,
        "logits": b_local * seq_len * (cfg.vocab_size // t_v) * 4,
        "activations": cfg.num_layers * b_local * seq_len * cfg.hidden_size * ab,
    }
    out["total"] = sum(out.values())
    out["n_params"] = n_params
    out["mesh"] = sizes
    return out


def _fixed_product(mesh_cfg: MeshConfig) -> int:
    sizes = [getattr(mesh_cfg, k) for k in MESH_AXES]
    if -1 in sizes:
        raise ShardingError(
            f"memory_estimate: mesh {mesh_cfg._describe()} has a -1 axis; pass num_devices or give every axis a size"
        )
    return math.prod(sizes)
