"""The device mesh, the logical-axis rules, and everything that places arrays on devices.

This is the one module that knows the mesh. Model code names the axes of its arrays with *logical*
names (``embed``, ``heads``, ``vocab`` ...; see ``cada_jax.models.decoder.param_logical_axes``);
``LOGICAL_RULES`` below maps each logical name onto the axes of a three-axis device mesh:

* ``data``   — pure data parallelism: every replica holds whole (or FSDP-sharded) weights and its own
  slice of the batch. Put slow links (DCN between TPU slices, hosts without NVLink) on this axis.
* ``fsdp``   — ZeRO-3 style: weights, gradients and optimizer state are split along ``embed`` and
  all-gathered layer by layer; the batch is split over ``fsdp`` too.
* ``tensor`` — Megatron style model parallelism inside a layer: attention heads, MLP width and the
  vocabulary are split; needs the fastest links (ICI, NVLink).

GQA with ``tensor`` not dividing ``num_kv_heads``: the query heads stay split over ``tensor`` and the
key/value projections and the KV cache are *replicated* over ``tensor`` instead (what inference
engines call KV-head replication). K/V weights are a small share of a GQA model (2K/N of the
attention weights), so this costs little memory and keeps e.g. Qwen2.5-1.5B (2 KV heads) usable on
``tensor=4``. Query heads, vocabulary, MLP width and hidden size must divide by their axes: a mesh
that does not fit is refused by ``validate`` with the dimension, its config key and the sizes that do.

Multi-host start-up is `cada_jax.distributed`; the per-device memory formula is `cada_jax.memory`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cada_jax.models.config import ModelConfig

__all__ = [
    "MESH_AXES",
    "LOGICAL_RULES",
    "ShardingError",
    "MeshConfig",
    "make_mesh",
    "rules_for",
    "logical_to_mesh",
    "named_sharding",
    "replicated",
    "param_shardings",
    "opt_state_shardings",
    "cache_logical_axes",
    "cache_shardings",
    "batch_sharding",
    "validate",
    "shard_params",
    "fit_sharding",
    "logical_shardings",
    "place_rows",
    "place_process_rows",
    "data_shard",
    "to_host",
    "mesh_from_config",
    "is_main_process",
]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or axes, or None = replicated). The only table of its kind.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters (names used by cada_jax.models.decoder)
    ("layers", None),  # scanned layer stack: every device holds its shard of every layer
    ("embed", "fsdp"),  # hidden size: the FSDP axis of every matrix
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # replicated instead when tensor does not divide num_kv_heads (rules_for)
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    # inputs and activations
    ("batch", BATCH_AXES),
    ("act_batch", BATCH_AXES),
    ("act_seq", None),
    ("act_embed", None),  # activations are batch-sharded; their hidden dim stays whole
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # KV cache buffers (layout read from decoder.init_cache, see cache_logical_axes) and slot mask [batch, slots]
    ("cache_layers", None),
    ("cache_batch", BATCH_AXES),
    ("cache_slots", None),
    ("cache_heads", "tensor"),
    ("cache_head_dim", None),
)

_KV_LOGICAL = ("kv_heads", "act_kv_heads", "cache_heads")

# Which config key a logical parameter axis comes from, for error messages.
_AXIS_CONFIG_KEY = {
    "heads": ("num_heads", "num_attention_heads"),
    "kv_heads": ("num_kv_heads", "num_key_value_heads"),
    "vocab": ("vocab_size", "vocab_size"),
    "mlp": ("intermediate_size", "intermediate_size"),
    "embed": ("hidden_size", "hidden_size"),
}


class ShardingError(ValueError):
    """A mesh or model/batch shape that cannot be laid out; the message names the size and the fix."""


def _check_rules(rules) -> dict:
    out: dict = {}
    for name, axes in rules:
        if name in out:
            raise ShardingError(f"logical axis {name!r} appears twice in the sharding rules; keep one entry")
        flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
        for a in flat:
            if a not in MESH_AXES:
                raise ShardingError(f"rule {name!r} -> {axes!r}: {a!r} is not a mesh axis (mesh axes: {MESH_AXES})")
        out[name] = axes
    return out


_RULES = _check_rules(LOGICAL_RULES)


# ----------------------------------------------------------------------------- the mesh


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device-mesh shape. The product of the three sizes must equal the number of devices."""

    data: int = -1
    """Data-parallel replicas; -1 = all devices left over after fsdp and tensor."""
    fsdp: int = 1
    """Devices that split weights, gradients and optimizer state (ZeRO-3) and the batch."""
    tensor: int = 1
    """Devices that split heads / MLP width / vocabulary inside each layer (keep within a host)."""

    def __post_init__(self) -> None:
        for key in MESH_AXES:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
                raise ShardingError(f"mesh.{key}={v!r}: use a positive int, or -1 for all remaining devices")
        if [getattr(self, k) for k in MESH_AXES].count(-1) > 1:
            raise ShardingError(
                f"mesh data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}: only one axis may be -1; "
                f"give the others explicit sizes"
            )

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) with the -1 axis filled in for `num_devices` devices."""
        sizes = [getattr(self, k) for k in MESH_AXES]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ShardingError(
                    f"mesh {self._describe()}: the fixed axes need a multiple of {known} devices but there are "
                    f"{num_devices}; choose sizes whose product divides {num_devices}"
                )
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ShardingError(
                f"mesh {self._describe()} = {math.prod(sizes)} devices, but {num_devices} devices are available; "
                f"make data*fsdp*tensor = {num_devices} (or set one axis to -1)"
            )
        return tuple(sizes)

    def _describe(self) -> str:
        return f"data={self.data} x fsdp={self.fsdp} x tensor={self.tensor}"


def make_mesh(mesh_cfg: MeshConfig | None = None, devices=None) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp", "tensor") over `devices` (default: all global devices).

    The device order comes from `mesh_utils.create_device_mesh`, which on TPU lays the inner axes
    (tensor, then fsdp) along the fastest ICI rings. With several TPU slices (multislice) the
    ``data`` axis is split across slices over DCN (`create_hybrid_device_mesh`); ``data`` must then
    be a multiple of the number of slices.
    """
    from jax.experimental import mesh_utils

    mesh_cfg = mesh_cfg or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ShardingError("make_mesh: no devices given")
    shape = mesh_cfg.resolve(len(devices))
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if len(slices) > 1:
        n = len(slices)
        if shape[0] % n:
            raise ShardingError(
                f"mesh data={shape[0]} must be a multiple of the {n} TPU slices (data is the axis across slices); "
                f"set mesh.data to a multiple of {n}"
            )
        arr = mesh_utils.create_hybrid_device_mesh(
            (shape[0] // n, shape[1], shape[2]), (n, 1, 1), devices, allow_split_physical_axes=True
        )
    else:
        try:
            arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, AssertionError, NotImplementedError):
            # A subset of a TPU slice has no physical topology to follow; any order is correct, the
            # topology-aware one is only faster.
            arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


def _mesh_sizes(mesh) -> dict[str, int]:
    if isinstance(mesh, Mesh):
        return {k: int(v) for k, v in mesh.shape.items()}
    if isinstance(mesh, Mapping):
        return {k: int(mesh.get(k, 1)) for k in MESH_AXES}
    raise TypeError(f"expected a jax.sharding.Mesh or a dict of axis sizes, got {type(mesh).__name__}")


# ----------------------------------------------------------------------------- rules


def rules_for(cfg: ModelConfig | None, mesh) -> dict:
    """The effective rules for `cfg` on `mesh`: LOGICAL_RULES, with the KV heads replicated over
    ``tensor`` when ``tensor`` does not divide ``num_kv_heads`` (see the module docstring)."""
    rules = dict(_RULES)
    if cfg is not None:
        t = _mesh_sizes(mesh).get("tensor", 1)
        if cfg.num_kv_heads % t:
            for name in _KV_LOGICAL:
                rules[name] = None
    return rules


def logical_to_mesh(spec, rules: Mapping | None = None) -> PartitionSpec:
    """Map a PartitionSpec (or tuple) of logical axis names to a PartitionSpec of mesh axes."""
    rules = _RULES if rules is None else rules
    out, used = [], set()
    for entry in tuple(spec):
        if entry is None:
            out.append(None)
            continue
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        axes: list[str] = []
        for name in names:
            if name not in rules:
                raise ShardingError(
                    f"logical axis {name!r} has no sharding rule; add it to LOGICAL_RULES in cada_jax/sharding.py"
                )
            mapped = rules[name]
            axes.extend((mapped,) if isinstance(mapped, str) else tuple(mapped or ()))
        for a in axes:
            if a in used:
                raise ShardingError(
                    f"logical spec {tuple(spec)!r} maps mesh axis {a!r} to two dimensions; give one of them "
                    f"a logical name that maps elsewhere (e.g. 'act_embed' instead of 'embed' for activations)"
                )
            used.add(a)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, *logical: Any, cfg: ModelConfig | None = None) -> NamedSharding:
    """NamedSharding for an array whose dimensions carry the given logical names (None = whole)."""
    return NamedSharding(mesh, logical_to_mesh(logical, rules_for(cfg, mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(cfg: ModelConfig, mesh: Mesh):
    """Pytree (same structure as the params) of NamedShardings, from `param_logical_axes` + rules."""
    from cada_jax.models.decoder import param_logical_axes

    rules = rules_for(cfg, mesh)
    return jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, logical_to_mesh(spec, rules)),
        param_logical_axes(cfg),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def opt_state_shardings(opt_state_shapes, param_shardings, mesh: Mesh):
    """Shardings for an optax state (e.g. ``jax.eval_shape(opt.init, params)``).

    Sub-trees shaped like the params (Adam's mu and nu, momentum ...) take the params' shardings;
    leaves whose shape differs from their parameter (factored statistics) and everything else
    (step counts, scalars) are replicated.
    """
    p_def = jax.tree_util.tree_structure(param_shardings)
    p_leaves = jax.tree_util.tree_leaves(param_shardings)
    rep = replicated(mesh)

    def mirrors_params(x) -> bool:
        return bool(p_leaves) and not _is_array_like(x) and jax.tree_util.tree_structure(x) == p_def

    def assign(sub):
        if mirrors_params(sub):
            leaves = jax.tree_util.tree_leaves(sub)
            shard = [s if _spec_fits(x, s, mesh) else rep for x, s in zip(leaves, p_leaves)]
            return jax.tree_util.tree_unflatten(p_def, shard)
        return rep

    return jax.tree_util.tree_map(assign, opt_state_shapes, is_leaf=mirrors_params)


def _is_array_like(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _spec_fits(x, sharding: NamedSharding, mesh: Mesh) -> bool:
    sizes = _mesh_sizes(mesh)
    shape = tuple(getattr(x, "shape", ()))
    spec = tuple(sharding.spec)
    if len(spec) > len(shape):
        return False
    for dim, entry in zip(shape, spec):
        if entry is None:
            continue
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        if dim % math.prod(sizes[a] for a in axes):
            return False
    return True


def cache_logical_axes(cfg: ModelConfig) -> tuple[str, ...]:
    """Logical names of the dimensions of the K/V cache buffers of `decoder.init_cache`.

    Read off the decoder's own layout (by probing `init_cache` abstractly with batch and slot counts
    unlike any model dimension), so a change of cache layout in the decoder, e.g. [L,B,S,K,H] to
    [L,B,K,S,H], is followed here without a second source of truth.
    """
    from cada_jax.models.decoder import init_cache

    b0 = 1 + max(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    s0 = b0 + 1
    shape = jax.eval_shape(lambda: init_cache(cfg, b0, s0))["k"].shape
    rest = iter(("cache_layers", "cache_heads", "cache_head_dim"))  # the other dims, in this order
    names = tuple("cache_batch" if d == b0 else "cache_slots" if d == s0 else next(rest) for d in shape)
    if sorted(names) != sorted(("cache_layers", "cache_batch", "cache_slots", "cache_heads", "cache_head_dim")):
        raise ShardingError(f"unexpected KV cache shape {shape} from decoder.init_cache; update cache_logical_axes")
    return names


def cache_shardings(cfg: ModelConfig, mesh: Mesh) -> dict:
    """Shardings of the KV cache from `decoder.init_cache`: batch over (data, fsdp), kv heads over tensor."""
    rules = rules_for(cfg, mesh)
    kv = NamedSharding(mesh, logical_to_mesh(cache_logical_axes(cfg), rules))
    return {
        "k": kv,
        "v": kv,
        "mask": NamedSharding(mesh, logical_to_mesh(("cache_batch", "cache_slots"), rules)),
        "index": replicated(mesh),
    }


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over (data, fsdp); other dimensions whole. Any rank >= 1."""
    return NamedSharding(mesh, logical_to_mesh(("batch",)))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate(cfg: ModelConfig, mesh, *, batch: int | None = None) -> None:
    """Raise ShardingError unless `cfg` (and a global `batch` size) can be laid out on `mesh`."""
    sizes = _mesh_sizes(mesh)
    t, f = sizes["tensor"], sizes["fsdp"]
    for logical, axis_size, axis in (("heads", t, "tensor"), ("vocab", t, "tensor"), ("mlp", t, "tensor"), ("embed", f, "fsdp")):
        attr, hf_key = _AXIS_CONFIG_KEY[logical]
        n = getattr(cfg, attr)
        if n % axis_size:
            raise ShardingError(
                f"{hf_key}={n} is not divisible by the mesh {axis!r} axis ({axis_size}); "
                f"set mesh.{axis} to one of {_divisors(n)} (divisors of {hf_key})"
            )
    if batch is not None:
        b = sizes["data"] * sizes["fsdp"]
        if batch % b:
            raise ShardingError(
                f"batch size {batch} is not divisible by data*fsdp = {sizes['data']}*{sizes['fsdp']} = {b}; "
                f"use a batch size that is a multiple of {b}"
            )
    # Safety net over every parameter (catches any axis the named checks above do not know).
    from cada_jax.models.decoder import param_logical_axes, param_shapes

    rules = rules_for(cfg, mesh)
    shapes = jax.tree_util.tree_leaves_with_path(param_shapes(cfg))
    specs = jax.tree_util.tree_leaves(param_logical_axes(cfg), is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, leaf), spec in zip(shapes, specs):
        mesh_spec = logical_to_mesh(spec, rules)
        for dim, logical, entry in zip(leaf.shape, tuple(spec), tuple(mesh_spec)):
            if entry is None:
                continue
            axes = (entry,) if isinstance(entry, str) else tuple(entry)
            k = math.prod(sizes[a] for a in axes)
            if dim % k:
                raise ShardingError(
                    f"parameter {jax.tree_util.keystr(path)} dimension {logical!r}={dim} is not divisible by "
                    f"mesh axes {axes} (size {k}); change the mesh or the rule for {logical!r}"
                )


# ----------------------------------------------------------------------------- placing arrays


def _put(x, sharding: NamedSharding):
    """Place one array: reshard a global jax.Array, or build a global array from a host value that
    every process holds in full (each process fills only its own shards)."""
    if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_params(params, shardings):
    """Place a params (or any) pytree on the mesh; `shardings` is a matching pytree (or one sharding)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda x: _put(x, shardings), params)
    return jax.tree_util.tree_map(_put, params, shardings)


def fit_sharding(mesh: Mesh, shape, logical, cfg: ModelConfig | None = None) -> NamedSharding:
    """NamedSharding of an array of `shape` whose dimensions carry the `logical` names, with every
    dimension that its mesh axes do not divide left whole (a 6-row micro-batch on data*fsdp = 4 is
    replicated instead of refused). Names may be fewer than dimensions; the rest stay whole."""
    sizes = _mesh_sizes(mesh)
    spec = logical_to_mesh(tuple(logical)[: len(shape)], rules_for(cfg, mesh))
    out = []
    for dim, entry in zip(shape, tuple(spec)):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        out.append(entry if axes and dim % math.prod(sizes[a] for a in axes) == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*out))


def logical_shardings(logical_tree, mesh: Mesh, cfg: ModelConfig | None = None):
    """Pytree of NamedShardings for a pytree of PartitionSpecs of logical names (e.g. LoRA adapters'
    `lora_logical_axes`), under the rules for `cfg` on `mesh`."""
    rules = rules_for(cfg, mesh)
    return jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, logical_to_mesh(spec, rules)),
        logical_tree,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def place_rows(batch, mesh: Mesh):
    """Place a pytree of host arrays whose leading dimension is the batch: split over (data, fsdp)
    where that divides the size, else replicated (`fit_sharding`). Every process passes the same
    global values and fills only its own shards."""
    return jax.tree_util.tree_map(lambda x: _put(x, fit_sharding(mesh, np.shape(x), ("batch",))), batch)


def place_process_rows(batch, mesh: Mesh, global_rows: int):
    """Place a pytree of this process's rows (its `data_shard` slice of a `global_rows` batch) as
    global arrays split over (data, fsdp). Processes that feed the same slice pass the same rows."""
    sh = batch_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sh, np.asarray(x), (int(global_rows),) + np.shape(x)[1:]), batch
    )


def data_shard(mesh: Mesh) -> tuple[int, int]:
    """(index, count): this process feeds slice `index` of `count` equal, contiguous slices of every
    global batch (rows split over data x fsdp). One process: (0, 1). Processes whose devices hold the
    same rows (the batch replicated over ``tensor`` across hosts) share a slice and must load the
    same data, so `count` is the number of distinct slices, not the number of processes."""
    sizes = _mesh_sizes(mesh)
    rows = sizes["data"] * sizes["fsdp"]
    held: dict[int, set] = {}
    for dev, idx in batch_sharding(mesh).devices_indices_map((rows,)).items():
        r = idx[0]
        held.setdefault(dev.process_index, set()).update(range(*r.indices(rows)))
    slices = sorted({tuple(sorted(v)) for v in held.values()})
    n = len(slices)
    if rows % n or any(len(s) != rows // n or s != tuple(range(s[0], s[0] + len(s))) for s in slices) or \
            sorted(i for s in slices for i in s) != list(range(rows)):
        raise ShardingError(
            f"the mesh gives processes overlapping or non-contiguous slices of the batch ({slices}); "
            f"order the devices so that each process holds a contiguous block of the (data, fsdp) axes"
        )
    return slices.index(tuple(sorted(held[jax.process_index()]))), n


def to_host(x) -> np.ndarray:
    """`x` whole, as a numpy array on this host. A `jax.Array` spread over other processes' devices is
    gathered, which is a collective: every process must call this for the same array in the same order."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def mesh_from_config(mesh_cfg, cfg: ModelConfig | None = None, *, batch: int | None = None, devices=None) -> Mesh:
    """The mesh of a config's ``mesh`` section (any object with ``data``, ``fsdp``, ``tensor``) over all
    global devices, checked against the model (`validate`); a mesh that does not fit the devices or
    the model is a one-line ShardingError naming the key to change."""
    mc = mesh_cfg if isinstance(mesh_cfg, MeshConfig) else MeshConfig(
        data=int(mesh_cfg.data), fsdp=int(mesh_cfg.fsdp), tensor=int(mesh_cfg.tensor))
    mesh = make_mesh(mc, devices)
    if cfg is not None:
        validate(cfg, mesh, batch=batch)
    return mesh


# ----------------------------------------------------------------------------- multi-host


def is_main_process() -> bool:
    return jax.process_index() == 0
