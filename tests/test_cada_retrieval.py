"""Precedent retrieval: BM25, embedding and hybrid (reciprocal-rank fusion) orderings, checked
against numpy re-computations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cada_jax.cada.retrieval import RRF_K, bm25_scores, retrieve, retrieve_for, similarity_scores
from cada_jax.cada.spec import Case, default_spec

CASES = [
    Case("a", "benign", "kill a python process", "r (C2)", "comply"),
    Case("b", "benign", "bake bread at home", "r (C2)", "comply"),
    Case("c", "benign", "python bread recipe", "r (C2)", "comply"),
    Case("d", "benign", "paint a fence", "r (C2)", "comply"),
]
# hand-made embeddings: the query is closest to d, then b, then c, then a
TABLE = {"query python": [1.0, 0.0], "kill a python process": [-1.0, 0.2], "bake bread at home": [0.8, 0.5],
         "python bread recipe": [0.3, 0.9], "paint a fence": [0.9, 0.1]}


def _embed(texts):
    return np.array([TABLE[t] for t in texts])


def _cosine(query):
    q = np.array(TABLE[query]) / np.linalg.norm(TABLE[query])
    return np.array([np.dot(np.array(TABLE[c.request]) / np.linalg.norm(TABLE[c.request]), q) for c in CASES])


def _ranks(scores, ids):
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))
    r = np.zeros(len(ids))
    r[order] = np.arange(1, len(ids) + 1)
    return r


def test_bm25_embedding_and_hybrid_orderings():
    ids = [c.id for c in CASES]
    bm25 = bm25_scores("query python", [c.request for c in CASES])
    assert (bm25 > 0).tolist() == [True, False, True, False]  # only a and c share "python"
    cos = _cosine("query python")
    np.testing.assert_allclose(similarity_scores("query python", CASES, method="embedding", embed_fn=_embed), cos)
    expected_rrf = 1 / (RRF_K + _ranks(cos, ids)) + np.where(bm25 > 0, 1 / (RRF_K + _ranks(bm25, ids)), 0.0)
    np.testing.assert_allclose(similarity_scores("query python", CASES, method="hybrid", embed_fn=_embed), expected_rrf)

    def order(method):
        return [c.id for c in retrieve("query python", CASES, k=4, method=method, embed_fn=_embed, category="benign")]

    assert order("bm25")[:2] == sorted(["a", "c"], key=lambda i: -bm25[ids.index(i)])
    assert order("embedding") == ["d", "b", "c", "a"]
    assert order("hybrid") == [ids[i] for i in np.argsort(-expected_rrf, kind="stable")]
    # the two cases sharing a word with the query get both terms and overtake the closest by meaning
    assert order("hybrid") == ["a", "c", "d", "b"]


def test_method_checks():
    with pytest.raises(ValueError, match="needs embed_fn"):
        retrieve("query python", CASES, method="hybrid")
    with pytest.raises(ValueError, match="'lexical' is now called 'bm25'"):
        similarity_scores("query python", CASES, method="lexical")


def test_retrieve_for_uses_the_specs_method_and_embedder():
    spec = default_spec()
    calls = []

    def embed(texts):
        calls.append(len(texts))
        return np.stack([np.array([len(t), t.count("e") + 1.0]) for t in texts])

    configured = dataclasses.replace(spec, retrieval="embedding", embed_fn=embed)
    got = retrieve_for(configured, "How do I whittle a spoon?", 3, category="benign")
    assert got == retrieve("How do I whittle a spoon?", spec.cases, 3, category="benign", method="embedding", embed_fn=embed)
    assert calls and all(n == len(spec.cases) + 1 for n in calls)
    assert retrieve_for(spec, "How do I whittle a spoon?", 3) == retrieve("How do I whittle a spoon?", spec.cases, 3)
