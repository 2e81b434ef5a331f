"""The spec a run uses, built from the `spec` config section (or the matching command-line flags).

    spec = configured_spec(cfg.spec, stage_model=(params, model_cfg, tokenizer, model_dir),
                           cache_dir=os.path.join(run_dir, "cache", "spec_embeddings"))

`spec.dir` picks the directory ('' = the shipped one), `spec.retrieval` the ranking (bm25 |
embedding | hybrid). For embedding and hybrid, `spec.embedder` names the model whose mean-pooled
hidden states embed texts: '' = the stage's own model (`stage_model`, already loaded, or
`stage_model_path`, loaded on first use), else a model directory or 'smollm2-135m-instruct'
(loaded on first use). The precedents' embeddings are cached under `cache_dir` (None = not cached).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from cada_jax.cada.retrieval import check_method
from cada_jax.cada.spec import Spec, load_spec_dir


def default_cache_dir() -> str:
    """Where commands without a run folder (eval, ablate, the benchmark) cache precedent embeddings."""
    from cada_jax.checkpoints.gguf_import import cache_dir

    return os.path.join(cache_dir(), "spec_embeddings")


def check_spec_section(section: Any) -> Spec:
    """Load the configured spec directory and check the retrieval settings, before any model loads."""
    spec = load_spec_dir(section.dir or None)
    check_method(section.retrieval, need_embedder=False)
    embedder = section.embedder
    if section.retrieval != "bm25" and embedder:
        from cada_jax.checkpoints.gguf_import import SMOLLM2_NAME

        if embedder != SMOLLM2_NAME and not Path(embedder).expanduser().is_dir():
            raise FileNotFoundError(f"spec.embedder: {embedder}: model directory not found; give a local HF model directory, "
                                    f"'{SMOLLM2_NAME}', or '' for the stage's own model")
    return spec


def configured_spec(section: Any, *, stage_model: tuple | None = None, stage_model_path: str | None = None,
                    cache_dir: str | Path | None = None, dtype: str | None = None) -> Spec:
    """The `Spec` of `section` (a config `SpecSection`, or anything with its attributes), with its
    retrieval method and, for embedding / hybrid, an embedder behind a precedent-embedding cache."""
    from cada_jax.cada.embedding import CachedEmbedFn, DecoderEmbedder, LazyModelEmbedder, model_identity

    spec = check_spec_section(section)
    if section.retrieval == "bm25":
        return dataclasses.replace(spec, retrieval="bm25", embed_fn=None)
    size = dict(batch_size=section.embed_batch_size, max_len=section.embed_max_len)
    if section.embedder:
        embedder = LazyModelEmbedder(os.path.expanduser(section.embedder), dtype=dtype, **size)
    elif stage_model is not None:
        params, model_cfg, tokenizer, model_dir = stage_model
        embedder = DecoderEmbedder(params, model_cfg, tokenizer, identity=model_identity(model_dir), **size)
    elif stage_model_path:
        embedder = LazyModelEmbedder(stage_model_path, dtype=dtype, **size)
    else:
        raise ValueError("spec.embedder is '' (the stage's model), but this stage has no model; "
                         "set spec.embedder to a model directory or 'smollm2-135m-instruct'")
    return dataclasses.replace(spec, retrieval=section.retrieval, embed_fn=CachedEmbedFn(embedder, spec.cases, cache_dir))


__all__ = ["check_spec_section", "configured_spec", "default_cache_dir"]
