"""Text embeddings from the project's own decoder, for precedent retrieval (`spec.retrieval`).

A text's embedding is the mean of the decoder's final-normed hidden states over its real tokens
(`models.decoder.forward(hidden_only=True)`; padding is masked out of the mean). Texts are
tokenized without special tokens, cut to `max_len` tokens, right-padded (a causal decoder's real
tokens never see right padding, so padding leaves a text's embedding unchanged) to a length
bucket (16, 32, 64, ... up to `max_len`) and batched `batch_size` rows at a time (a lone text
runs as a batch of one), so jit compiles a handful of programs.

`DecoderEmbedder` embeds with loaded params (the policy of a stage, reused); `LazyModelEmbedder`
loads a model directory (or 'smollm2-135m-instruct') on first use. Both remember every text they
embedded. `CachedEmbedFn` adds the on-disk cache of a spec's precedent embeddings: one `.npy`
(no pickle) plus a `.json` description per (precedent content hash, embedder identity), written
atomically under a cache folder and reused by every later run with the same precedents and model.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np


def length_buckets(max_len: int) -> tuple[int, ...]:
    """16, 32, 64, ... and finally `max_len` itself."""
    out, b = [], 16
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _mean_pool(params, tokens_BT, mask_BT, *, cfg):
    import jax.numpy as jnp

    from cada_jax.models.decoder import forward, positions_from_mask

    hidden_BTD, _ = forward(params, tokens_BT, positions_from_mask(mask_BT), mask_BT, cfg=cfg, hidden_only=True)
    m_BT1 = mask_BT.astype(jnp.float32)[..., None]
    total_BD = jnp.sum(hidden_BTD.astype(jnp.float32) * m_BT1, axis=1)
    return total_BD / jnp.maximum(jnp.sum(m_BT1, axis=1), 1.0)


def model_identity(model_dir: str) -> str:
    """What decides a model directory's embeddings: its config.json, tokenizer files and weight
    files (name, size, modification time), hashed."""
    h = hashlib.sha256()
    d = Path(model_dir)
    for name in sorted(os.listdir(d)):
        p = d / name
        if not p.is_file():
            continue
        if name.endswith(".json"):
            h.update(name.encode() + b"\0" + p.read_bytes())
        elif name.endswith((".safetensors", ".model")):
            st = p.stat()
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _identity(model: str, max_len: int, dtype: str) -> str:
    return f"{model}|mean|max_len={max_len}|{dtype}"


def params_identity(params: Any) -> str:
    """A digest of a params pytree (every leaf's path, shape, dtype and first 4096 values), for
    embedders built from params in memory with no directory to name them."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.asarray(jax.device_get(leaf.reshape(-1)[:4096]), dtype=np.float32)
        h.update(f"{jax.tree_util.keystr(path)}{tuple(leaf.shape)}{leaf.dtype}".encode() + arr.tobytes())
    return h.hexdigest()[:24]


class DecoderEmbedder:
    """Mean-pooled final hidden states of a decoder (params, ModelConfig, Tokenizer) as embeddings."""

    def __init__(self, params, cfg, tokenizer, *, identity: str, batch_size: int = 16, max_len: int = 128):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.batch_size, self.max_len = int(batch_size), int(max_len)
        self.buckets = length_buckets(self.max_len)
        self.identity = _identity(identity, self.max_len, cfg.dtype)
        self.forward_calls = 0  # batches run through the decoder (tests count them)
        self._memo: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return int(self.cfg.hidden_size)

    def _run(self, texts: Sequence[str]) -> np.ndarray:
        ids = [s[: self.max_len] or [self.tokenizer.pad_id] for s in self.tokenizer.encode_batch(texts)]
        out = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start:start + self.batch_size]
            rows = 1 if len(chunk) == 1 else self.batch_size
            length = next(b for b in self.buckets if b >= max(len(s) for s in chunk))
            tokens, mask = self.tokenizer.pad(chunk, side="right", length=length, batch=rows)
            pooled = _mean_pool(self.params, tokens, mask, cfg=self.cfg)
            self.forward_calls += 1
            out.append(np.asarray(jax.device_get(pooled), dtype=np.float32)[: len(chunk)])
        return np.concatenate(out, axis=0)

    def warm(self, texts: Sequence[str]) -> None:
        """Embed the texts not seen yet, batched; later calls for them are lookups."""
        new = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if new:
            for t, v in zip(new, self._run(new)):
                self._memo[t] = v

    def remember(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Seed the memory with known embeddings (from the on-disk cache)."""
        for t, v in zip(texts, np.asarray(vectors, dtype=np.float32)):
            self._memo[t] = v

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("the embedder takes a list of strings")
        self.warm(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._memo[t] for t in texts])


class LazyModelEmbedder:
    """A `DecoderEmbedder` over a model directory (or 'smollm2-135m-instruct'), loaded on first use."""

    def __init__(self, name_or_path: str, *, batch_size: int = 16, max_len: int = 128, dtype: str | None = None):
        from cada_jax.checkpoints.gguf_import import resolve_model
        from cada_jax.models.config import load_config

        self.model_dir = resolve_model(name_or_path)
        self.batch_size, self.max_len = batch_size, max_len
        overrides = {"dtype": dtype, "param_dtype": dtype} if dtype else {}
        self.cfg = load_config(self.model_dir, **overrides)  # config.json only; the weights wait
        self.model_id = model_identity(self.model_dir)
        self.identity = _identity(self.model_id, max_len, self.cfg.dtype)
        self._inner: DecoderEmbedder | None = None
        self._pending: list[tuple[list[str], np.ndarray]] = []

    @property
    def inner(self) -> DecoderEmbedder:
        if self._inner is None:
            from cada_jax.checkpoints.load import load_model

            m = load_model(self.model_dir, config=self.cfg, progress=False)
            self._inner = DecoderEmbedder(m.params, m.config, m.tokenizer, identity=self.model_id,
                                          batch_size=self.batch_size, max_len=self.max_len)
            for texts, vectors in self._pending:
                self._inner.remember(texts, vectors)
            self._pending = []
        return self._inner

    def remember(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        if self._inner is None:
            self._pending.append((list(texts), np.asarray(vectors, np.float32)))  # no need to load the model yet
        else:
            self._inner.remember(texts, vectors)

    def warm(self, texts: Sequence[str]) -> None:
        self.inner.warm(texts)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.inner(texts)


class CachedEmbedFn:
    """An embedder plus the on-disk cache of the precedent embeddings: the `embed_fn` of a spec."""

    def __init__(self, embedder: Callable, cases: Sequence[Any], cache_dir: str | Path | None):
        self.embedder = embedder
        self.texts = [c.request for c in cases]
        self.identity = str(embedder.identity)
        content = hashlib.sha256(json.dumps([[c.id, c.request] for c in cases], ensure_ascii=False).encode()).hexdigest()
        key = f"{content[:16]}-{hashlib.sha256(self.identity.encode()).hexdigest()[:16]}"
        self.path = Path(cache_dir) / f"precedents-{key}.npy" if cache_dir else None
        self.cache_hit: bool | None = None  # None until the precedents are needed
        self._meta = {"precedents_sha256": content, "embedder": self.identity, "n": len(self.texts)}

    def _load_cases(self) -> None:
        if self.cache_hit is not None:
            return
        vectors = None
        if self.path is not None and self.path.is_file():
            try:
                vectors = np.load(self.path, allow_pickle=False)
            except (ValueError, OSError):
                vectors = None  # unreadable: compute again and replace it
            if vectors is not None and (vectors.ndim != 2 or vectors.shape[0] != len(self.texts)):
                vectors = None
        self.cache_hit = vectors is not None
        if vectors is not None:
            self.embedder.remember(self.texts, vectors)
            return
        vectors = np.asarray(self.embedder(self.texts), np.float32)
        if self.path is not None:
            from cada_jax.files import atomic_write_bytes, atomic_write_json

            buf = io.BytesIO()
            np.save(buf, vectors, allow_pickle=False)
            atomic_write_bytes(self.path, buf.getvalue())
            atomic_write_json(self.path.with_suffix(".json"), {**self._meta, "dim": int(vectors.shape[1])})

    def warm(self, texts: Sequence[str]) -> None:
        self._load_cases()
        self.embedder.warm(texts)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self._load_cases()
        return self.embedder(texts)


__all__ = ["CachedEmbedFn", "DecoderEmbedder", "LazyModelEmbedder", "length_buckets", "model_identity", "params_identity"]
