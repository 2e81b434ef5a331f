"""`load_model`: the one way a model gets loaded (a path or the bundled model's name -> weights,
model config, tokenizer), for the commands, the eval, the local judge and the trainers' frozen copies.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["LoadedModel", "load_model"]


@dataclasses.dataclass
class LoadedModel:
    dir: str          # the resolved HF directory (safetensors + config.json + tokenizer)
    params: Any       # the params pytree (on `mesh` when one was given)
    config: Any       # cada_jax.models.config.ModelConfig
    tokenizer: Any    # cada_jax.tokenizer.Tokenizer

    def __iter__(self):  # model_dir, params, cfg, tok = load_model(...)
        return iter((self.dir, self.params, self.config, self.tokenizer))


def load_model(name_or_path: str, dtype: str | None = None, *, param_dtype: str | None = None, config=None,
               mesh=None, progress: bool = True) -> LoadedModel:
    """Load a HF safetensors directory, or a bundled model by name (``smollm2-135m-instruct``, a
    GGUF converted once into the cache).

    `dtype`: compute dtype, and storage dtype unless `param_dtype` is given (default: the
    config.json's). `config`: a `ModelConfig` to use as it is (e.g. with a run's remat and attention
    settings) instead of reading config.json. `mesh`: a `jax.sharding.Mesh`; the weights are then
    created directly in their shards (`sharding.param_shardings`)."""
    from cada_jax.checkpoints.gguf_import import resolve_model
    from cada_jax.checkpoints.hf import load_params
    from cada_jax.models.config import load_config
    from cada_jax.tokenizer import Tokenizer

    model_dir = resolve_model(name_or_path, progress=progress)
    overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype or dtype)) if v}
    cfg = config if config is not None else load_config(model_dir, **overrides)
    shardings = None
    if mesh is not None:
        from cada_jax.sharding import param_shardings

        shardings = param_shardings(cfg, mesh)
    params, cfg = load_params(model_dir, cfg, shardings=shardings)
    return LoadedModel(model_dir, params, cfg, Tokenizer(model_dir))
