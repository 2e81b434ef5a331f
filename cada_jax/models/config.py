"""Model configuration read from a Hugging Face `config.json`.

`ModelConfig` is frozen and hashable so it can be a static argument of jitted functions; the raw
HF dict rides along (excluded from hashing) so export can write back what came in.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A config.json that cada_jax cannot represent; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # (rope_type, ((key, value), ...)) so the config stays hashable.
    rope_scaling: tuple = ("default", ())
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2 has them)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    pad_token_id: int | None = None
    # Numerics. `dtype` is the compute dtype, `param_dtype` the storage dtype of the weights.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # "none" | "full" | "dots": rematerialise each layer in the backward pass (saves activations).
    remat: str = "none"
    # "einsum" (explicit GQA einsums) | "dot_product_attention" (jax.nn, picks cuDNN flash on GPU).
    attention_impl: str = "einsum"
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def rope_inv_freq(self):
        """Inverse RoPE frequencies [head_dim // 2] (numpy float64), with the configured scaling."""
        import numpy as np

        inv = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
        kind, items = self.rope_scaling
        opts = dict(items)
        if kind == "default":
            return inv
        if kind == "linear":
            return inv / float(opts["factor"])
        if kind == "llama3":
            factor = float(opts["factor"])
            low = float(opts.get("low_freq_factor", 1.0))
            high = float(opts.get("high_freq_factor", 4.0))
            old_len = float(opts["original_max_position_embeddings"])
            low_wavelen = old_len / low
            high_wavelen = old_len / high
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return np.where(medium, smoothed, scaled)
        raise ConfigError(f"rope scaling type {kind!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")


def _eos_tuple(v) -> tuple:
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),)


def config_from_hf(hf: dict, *, source: str = "config.json", **overrides) -> ModelConfig:
    """Build a ModelConfig from a HF config dict; `overrides` set dtype/param_dtype/remat/..."""

    def need(key):
        if key not in hf:
            raise ConfigError(f"{source}: missing key {key!r}; is this a decoder-only HF model config?")
        return hf[key]

    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not supported; set it to false")

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")

    # transformers >= 5 writes `rope_parameters`; older versions `rope_theta` + `rope_scaling`.
    rope_params = hf.get("rope_parameters") or {}
    rope_scaling = hf.get("rope_scaling") or {}
    theta = float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = dict(rope_scaling) if rope_scaling else dict(rope_params)
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {kind!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    if kind == "llama3" and "original_max_position_embeddings" not in scaling:
        raise ConfigError(f"{source}: llama3 rope scaling needs 'original_max_position_embeddings'")
    scaling_items = tuple(sorted((k, v) for k, v in scaling.items() if isinstance(v, (int, float))))

    default_bias = model_type == "qwen2"
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=(kind, scaling_items),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", default_bias)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_tuple(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        hf_config=dict(hf),
    )
    return cfg.replace(**overrides) if overrides else cfg


def load_config(model_dir: str, **overrides) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; a model directory needs a HF config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}); re-export the model") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; re-export the model") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: expected a JSON object of model settings, got a {type(hf).__name__}; re-export the model")
    return config_from_hf(hf, source=path, **overrides)
