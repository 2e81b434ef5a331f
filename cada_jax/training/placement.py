"""Where the trainers' arrays live on the device mesh; shared by the SFT and GRPO trainers.

The mesh comes from the config's ``mesh`` section (`cada_jax.sharding.mesh_from_config`). On it:

* base / reference / frozen weights: `sharding.param_shardings` (loaded straight into their shards);
* the trainable pytree: the same shardings for full fine-tuning, the adapters' own logical axes
  (`lora.lora_logical_axes`) under LoRA;
* the optimizer state: `sharding.opt_state_shardings` (Adam moments take their parameter's
  sharding; counters are replicated); step counter and key replicated.

`train_state_shardings` is the one answer to "where does the TrainState live", used to create the
state (`create_state`), as the update's ``out_shardings`` (so every step hands back the layout it
got) and as the restore target of a checkpoint (`abstract_state`). On one device all of it is a
1x1x1 mesh: the same programs as plain `jit`, committed to that device.

With several processes, `export` gathers the weights (a collective) and process 0 writes them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cada_jax.models.config import ModelConfig
from cada_jax.models.decoder import param_shapes
from cada_jax.training.optim import TrainState, make_train_step
from cada_jax.sharding import (
    is_main_process,
    logical_shardings,
    opt_state_shardings,
    param_shardings,
    replicated,
    to_host,
)

__all__ = ["model_config", "trainable_shapes", "trainable_shardings", "train_state_shardings", "create_state",
           "abstract_state", "make_update", "copy_tree", "export"]


def model_config(cfg, model_dir: str | None = None) -> tuple[str, ModelConfig]:
    """(model directory, its ModelConfig with the run's dtype / remat / attention settings): the
    directory is `model_dir`, else ``model.path`` resolved (a GGUF file or the bundled model is
    converted once)."""
    from cada_jax.checkpoints.gguf_import import resolve_model
    from cada_jax.models.config import load_config as load_model_config

    model_dir = model_dir or resolve_model(cfg.model.path, progress=cfg.run.progress)
    model_cfg = load_model_config(model_dir).replace(
        dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
        attention_impl=cfg.model.attention_impl,
    )
    return model_dir, model_cfg


def trainable_shapes(model_cfg: ModelConfig, lora_cfg=None):
    """ShapeDtypeStructs of the trainable pytree: all parameters, or the LoRA adapters."""
    if lora_cfg is None:
        return param_shapes(model_cfg)
    from cada_jax.training.lora import lora_shapes

    return lora_shapes(model_cfg, lora_cfg)


def trainable_shardings(model_cfg: ModelConfig, mesh: Mesh, lora_cfg=None):
    if lora_cfg is None:
        return param_shardings(model_cfg, mesh)
    from cada_jax.training.lora import lora_logical_axes

    return logical_shardings(lora_logical_axes(model_cfg, lora_cfg), mesh, model_cfg)


@functools.lru_cache(maxsize=16)
def train_state_shardings(model_cfg: ModelConfig, lora_cfg, mesh: Mesh, tx) -> TrainState:
    """A TrainState (same tree as the live one, `tx` included) whose leaves are NamedShardings."""
    shapes = trainable_shapes(model_cfg, lora_cfg)
    t_sh = trainable_shardings(model_cfg, mesh, lora_cfg)
    rep = replicated(mesh)
    opt_sh = opt_state_shardings(jax.eval_shape(tx.init, shapes), t_sh, mesh)
    return TrainState(step=rep, params=t_sh, opt_state=opt_sh, rng=rep, tx=tx)


@functools.lru_cache(maxsize=16)
def _create_fn(model_cfg: ModelConfig, lora_cfg, mesh: Mesh, tx):
    return jax.jit(lambda t, key: TrainState.create(t, tx, key),
                   out_shardings=train_state_shardings(model_cfg, lora_cfg, mesh, tx), donate_argnums=(0,))


def create_state(trainable, tx, key, *, model_cfg: ModelConfig, lora_cfg, mesh: Mesh) -> TrainState:
    """`TrainState.create` on the mesh: the optimizer state is born in its shards. `trainable`
    (already placed) is donated."""
    return _create_fn(model_cfg, lora_cfg, mesh, tx)(trainable, np.asarray(key))


def abstract_state(tx, key, *, model_cfg: ModelConfig, lora_cfg, mesh: Mesh) -> TrainState:
    """The TrainState as ShapeDtypeStructs carrying their target shardings: a checkpoint's arrays are
    read straight into their shards (no full copy on any device or host)."""
    shapes = jax.eval_shape(lambda t, k: TrainState.create(t, tx, k), trainable_shapes(model_cfg, lora_cfg), key)
    state_sh = train_state_shardings(model_cfg, lora_cfg, mesh, tx)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sh)


def make_update(loss, model_cfg: ModelConfig, lora_cfg, mesh: Mesh, tx):
    """The jitted, state-donating update (`optim.make_train_step`) of ``loss(params, batch) -> (loss,
    aux)``: over every weight, or (LoRA) over the adapters applied to the frozen base weights the
    update receives as ``frozen``. The new state comes back in `train_state_shardings`, the metrics
    replicated."""
    from cada_jax.training.lora import apply_lora

    if lora_cfg is None:
        def loss_fn(params, batch, rng, frozen):
            return loss(params, batch)
    else:
        def loss_fn(lora, batch, rng, frozen):
            return loss(apply_lora(frozen, lora, lora_cfg), batch)
    out = (train_state_shardings(model_cfg, lora_cfg, mesh, tx), replicated(mesh))
    return make_train_step(loss_fn, out_shardings=out)


@jax.jit
def copy_tree(tree):
    """A copy of a pytree of arrays in new buffers, with the same shardings (a frozen reference
    that survives the donation of the trainable copy)."""
    return jax.tree.map(jnp.copy, tree)


def export(params, model_cfg: ModelConfig, out_dir: str, *, tokenizer_dir: str | None, dtype: str) -> str:
    """Write `params` as a HF directory. With several processes every process takes part in gathering
    the weights, process 0 writes, and all return once the directory is in place."""
    from cada_jax.checkpoints.hf import export_hf

    multi = jax.process_count() > 1
    if multi:
        params = jax.tree.map(to_host, params)
    if is_main_process():
        export_hf(params, model_cfg, out_dir, tokenizer_dir=tokenizer_dir, dtype=dtype)
    if multi:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"cada_jax export {out_dir}")
    return out_dir
