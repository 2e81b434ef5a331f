"""Precedent retrieval quality: recall@1 / recall@3 of the right category, leave-one-out.

    python benchmarks/retrieval.py [--spec-dir DIR] [--embedder smollm2-135m-instruct] [--max-len 128]

Each precedent's request is the query against all the other precedents of the spec (the shipped
one by default); a hit at k is a retrieved case of the query case's own category among the first
k. Two views per method (bm25, embedding, hybrid):

    similarity   the ranking by similarity alone (ties by case id): what the method itself finds
    retrieve     `retrieve` as the cases variant calls it: the keyword-guessed category first, with
                 the closest case of the other side (benign / harmful) up front when they disagree

Embeddings are the mean-pooled final hidden states of --embedder (`cada_jax.cada.embedding`);
the precedents' embeddings are cached in ~/.cache/cada_jax/spec_embeddings like `cada eval`'s.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time


def _recall(hits: list[list[bool]], k: int) -> float:
    return round(sum(any(h[:k]) for h in hits) / len(hits), 4)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec-dir", default="", help="spec directory ('' = the shipped one)")
    ap.add_argument("--embedder", default="smollm2-135m-instruct")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)

    from cada_jax.cada.embedding import CachedEmbedFn, LazyModelEmbedder, _mean_pool
    from cada_jax.cada.retrieval import RETRIEVAL_METHODS, retrieve, similarity_scores
    from cada_jax.cada.spec import load_spec_dir
    from cada_jax.cada.spec_config import default_cache_dir

    spec = load_spec_dir(args.spec_dir or None)
    cases = list(spec.cases)
    t0 = time.perf_counter()
    embed_fn = CachedEmbedFn(LazyModelEmbedder(args.embedder, batch_size=args.batch_size, max_len=args.max_len),
                             cases, default_cache_dir())
    embed_fn._load_cases()
    embed_fn([c.request for c in cases])
    embed_s = time.perf_counter() - t0

    results = {}
    for method in RETRIEVAL_METHODS:
        fn = None if method == "bm25" else embed_fn
        sim_hits, ret_hits = [], []
        t1 = time.perf_counter()
        for i, case in enumerate(cases):
            others = cases[:i] + cases[i + 1:]
            scores = similarity_scores(case.request, others, method=method, embed_fn=fn)
            order = sorted(range(len(others)), key=lambda j: (-round(float(scores[j]), 9), others[j].id))
            sim_hits.append([others[j].category == case.category for j in order[:3]])
            got = retrieve(case.request, others, k=3, method=method, embed_fn=fn, categories=spec.categories)
            ret_hits.append([c.category == case.category for c in got])
        results[method] = {
            "similarity": {"recall@1": _recall(sim_hits, 1), "recall@3": _recall(sim_hits, 3)},
            "retrieve": {"recall@1": _recall(ret_hits, 1), "recall@3": _recall(ret_hits, 3)},
            "ms_per_query": round(1000 * (time.perf_counter() - t1) / len(cases) / 2, 2),
        }
    print(json.dumps({
        "benchmark": "retrieval_leave_one_out",
        "spec": args.spec_dir or "shipped",
        "n_precedents": len(cases),
        "n_categories": len({c.category for c in cases}),
        "embedder": args.embedder,
        "embed_max_len": args.max_len,
        "precedent_embeddings_cached": bool(embed_fn.cache_hit),
        "embed_seconds": round(embed_s, 2),
        "embed_programs_compiled": _mean_pool._cache_size(),
        "methods": results,
    }))


if __name__ == "__main__":
    main()
