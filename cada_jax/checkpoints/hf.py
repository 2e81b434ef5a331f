"""Hugging Face safetensors directories <-> cada_jax parameter pytrees.

The weight map is declarative (`weight_map`): for each parameter path, the HF tensor name (with
`{i}` for the layer) and how to reshape between the HF `[out, in]` layout and ours. Loading goes
parameter by parameter: the per-layer HF tensors of one stacked parameter are read from the
memory-mapped files, stacked, placed on devices (optionally straight into a target sharding) and
dropped from host memory before the next parameter is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Callable

import jax
import numpy as np

from cada_jax.checkpoints.safetensors_io import CheckpointError, SafetensorsFile, check_publish_target, publish_dir, write_safetensors
from cada_jax.models.config import ModelConfig, load_config
from cada_jax.models.decoder import param_shapes

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    path: tuple  # path in the params pytree
    hf_name: str  # may contain {i}
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    per_layer: bool


def _ident(x):
    return x


def _t(x):
    return x.T


def weight_map(cfg: ModelConfig) -> list[WeightSpec]:
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def proj_in(heads):  # HF [heads*H, D] -> [D, heads, H]
        return lambda w: w.reshape(heads, H, D).transpose(2, 0, 1), lambda w: w.transpose(1, 2, 0).reshape(heads * H, D)

    def bias(heads):
        return lambda b: b.reshape(heads, H), lambda b: b.reshape(heads * H)

    L = "model.layers.{i}."
    specs = [WeightSpec(("embed",), "model.embed_tokens.weight", _ident, _ident, False)]
    q, k = proj_in(N), proj_in(K)
    specs += [
        WeightSpec(("layers", "input_norm", "scale"), L + "input_layernorm.weight", _ident, _ident, True),
        WeightSpec(("layers", "post_attn_norm", "scale"), L + "post_attention_layernorm.weight", _ident, _ident, True),
        WeightSpec(("layers", "attn", "q_proj"), L + "self_attn.q_proj.weight", *q, True),
        WeightSpec(("layers", "attn", "k_proj"), L + "self_attn.k_proj.weight", *k, True),
        WeightSpec(("layers", "attn", "v_proj"), L + "self_attn.v_proj.weight", *k, True),
        WeightSpec(
            ("layers", "attn", "o_proj"),
            L + "self_attn.o_proj.weight",
            lambda w: w.reshape(D, N, H).transpose(1, 2, 0),
            lambda w: w.transpose(2, 0, 1).reshape(D, N * H),
            True,
        ),
        WeightSpec(("layers", "mlp", "gate_proj"), L + "mlp.gate_proj.weight", _t, _t, True),
        WeightSpec(("layers", "mlp", "up_proj"), L + "mlp.up_proj.weight", _t, _t, True),
        WeightSpec(("layers", "mlp", "down_proj"), L + "mlp.down_proj.weight", _t, _t, True),
    ]
    if cfg.attention_bias:
        specs += [
            WeightSpec(("layers", "attn", "q_bias"), L + "self_attn.q_proj.bias", *bias(N), True),
            WeightSpec(("layers", "attn", "k_bias"), L + "self_attn.k_proj.bias", *bias(K), True),
            WeightSpec(("layers", "attn", "v_bias"), L + "self_attn.v_proj.bias", *bias(K), True),
        ]
    if cfg.mlp_bias:
        specs += [
            WeightSpec(("layers", "mlp", "gate_bias"), L + "mlp.gate_proj.bias", _ident, _ident, True),
            WeightSpec(("layers", "mlp", "up_bias"), L + "mlp.up_proj.bias", _ident, _ident, True),
            WeightSpec(("layers", "mlp", "down_bias"), L + "mlp.down_proj.bias", _ident, _ident, True),
        ]
    if cfg.qk_norm:
        specs += [
            WeightSpec(("layers", "attn", "q_norm", "scale"), L + "self_attn.q_norm.weight", _ident, _ident, True),
            WeightSpec(("layers", "attn", "k_norm", "scale"), L + "self_attn.k_norm.weight", _ident, _ident, True),
        ]
    specs.append(WeightSpec(("final_norm", "scale"), "model.norm.weight", _ident, _ident, False))
    if not cfg.tie_word_embeddings:
        specs.append(WeightSpec(("lm_head",), "lm_head.weight", _t, _t, False))
    return specs


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


class _TensorIndex:
    """Tensor name -> open SafetensorsFile, for a single file or a sharded index."""

    def __init__(self, model_dir: str):
        single = os.path.join(model_dir, "model.safetensors")
        index = os.path.join(model_dir, "model.safetensors.index.json")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
            for name, fname in weight_map.items():
                self.where[name] = os.path.join(model_dir, fname)
        elif os.path.isfile(single):
            f = SafetensorsFile(single)
            self.files[single] = f
            for name in f.keys():
                self.where[name] = single
        else:
            bins = [n for n in os.listdir(model_dir) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))] if os.path.isdir(model_dir) else []
            hint = " (pickle-based weights are refused: convert them to safetensors)" if bins else ""
            raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json{hint}")
        self.model_dir = model_dir

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise CheckpointError(f"{self.model_dir}: tensor {name!r} is missing from the checkpoint")
        path = self.where[name]
        if path not in self.files:
            self.files[path] = SafetensorsFile(path)
        return self.files[path].get(name)


def _place(arr: np.ndarray, sharding):
    if sharding is None:
        return jax.device_put(arr)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def load_params(model_dir: str, cfg: ModelConfig | None = None, *, shardings=None, dtype: str | None = None):
    """Load a HF safetensors directory into a params pytree.

    `shardings`: optional pytree (same structure as params) of `jax.sharding.Sharding`; each
    parameter is created directly in its shards. `dtype` defaults to `cfg.param_dtype`.
    Returns (params, cfg).
    """
    cfg = cfg or load_config(model_dir)
    dtype = np.dtype(jax.numpy.dtype(dtype or cfg.param_dtype))
    shapes = param_shapes(cfg)
    index = _TensorIndex(model_dir)
    params: dict = {}
    for spec in weight_map(cfg):
        want = tuple(_get(shapes, spec.path).shape)
        if spec.per_layer:
            arr = np.empty(want, dtype)
            for i in range(cfg.num_layers):
                name = spec.hf_name.format(i=i)
                arr[i] = _convert(index, name, spec, want[1:])
        else:
            arr = _convert(index, spec.hf_name, spec, want).astype(dtype, copy=False)
        sharding = _get(shardings, spec.path) if shardings is not None else None
        _set(params, spec.path, _place(arr, sharding))
        del arr
    return params, cfg


def _convert(index: _TensorIndex, name: str, spec: WeightSpec, want: tuple) -> np.ndarray:
    raw = index.get(name)
    try:
        out = spec.to_jax(np.asarray(raw))
    except ValueError:
        out = None
    if out is None or tuple(out.shape) != want:
        raise CheckpointError(
            f"{index.where[name]}: tensor {name!r} has shape {tuple(raw.shape)}, which does not fit the config "
            f"(expected {want} after conversion); check config.json against the weights"
        )
    if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
        bad = int(out.size - np.count_nonzero(np.isfinite(out)))
        raise CheckpointError(
            f"{index.where[name]}: tensor {name!r} has {bad} NaN or infinite values; the weights are damaged "
            "(re-download or re-export them)"
        )
    return out


def export_hf(params, cfg: ModelConfig, out_dir: str, *, tokenizer_dir: str | None = None, dtype: str = "float32") -> str:
    """Write params as a HF directory (config.json, model.safetensors, tokenizer files) atomically."""
    dtype = np.dtype(jax.numpy.dtype(dtype))
    shapes = param_shapes(cfg)
    for spec in weight_map(cfg):
        want, got = tuple(_get(shapes, spec.path).shape), tuple(_get(params, spec.path).shape)
        if want != got:
            raise CheckpointError(f"params/{'/'.join(spec.path)}: shape {got} does not match the config's {want}; nothing was written")
    out_dir = os.path.abspath(out_dir)
    check_publish_target(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    try:
        items = []
        for spec in weight_map(cfg):
            leaf = _get(params, spec.path)
            if spec.per_layer:
                for i in range(cfg.num_layers):
                    shape = spec.to_hf(np.empty(leaf.shape[1:], np.int8)).shape
                    items.append((spec.hf_name.format(i=i), shape, dtype,
                                  lambda leaf=leaf, i=i, spec=spec: spec.to_hf(np.asarray(leaf[i]).astype(dtype))))
            else:
                shape = spec.to_hf(np.empty(leaf.shape, np.int8)).shape
                items.append((spec.hf_name, shape, dtype, lambda leaf=leaf, spec=spec: spec.to_hf(np.asarray(leaf).astype(dtype))))
        write_safetensors(os.path.join(tmp, "model.safetensors"), items, metadata={"format": "pt"})
        hf = dict(cfg.hf_config) if cfg.hf_config else {}
        hf.update(_hf_config_fields(cfg))
        hf["torch_dtype"] = str(dtype)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        if tokenizer_dir:
            for name in TOKENIZER_FILES:
                src = os.path.join(tokenizer_dir, name)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(tmp, name))
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _hf_config_fields(cfg: ModelConfig) -> dict:
    out = {
        "architectures": [_ARCH[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
    }
    if cfg.model_type != "qwen2":
        out["attention_bias"] = cfg.attention_bias
    if cfg.model_type == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    if not cfg.hf_config:
        kind, items = cfg.rope_scaling
        out["rope_theta"] = cfg.rope_theta
        if kind != "default":
            out["rope_scaling"] = {"rope_type": kind, **dict(items)}
        if cfg.bos_token_id is not None:
            out["bos_token_id"] = cfg.bos_token_id
        if cfg.eos_token_ids:
            out["eos_token_id"] = list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0]
    return out
