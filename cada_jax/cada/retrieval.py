"""Precedent retrieval: which cases the `cases` variant shows for a request.

Three ways to measure how similar a request is to each case's request (`spec.retrieval`):

    bm25       BM25 (k1=1.5, b=0.75) over lowercase word tokens (stopwords dropped, plurals folded)
    embedding  cosine similarity of text embeddings (`embed_fn(list[str]) -> [n, d]`; the project's
               own is a decoder's mean-pooled hidden states, `cada_jax.cada.embedding`)
    hybrid     reciprocal-rank fusion of the two: sum over both rankings of 1 / (RRF_K + rank),
               ranks from 1, ties by case id; a case sharing no word with the request gets no BM25
               term (BM25 did not retrieve it), so exact-word evidence adds to semantic similarity

`retrieve` then puts cases of the request's category first (given, or guessed by the spec's
keyword categoriser), ties broken by case id, so the result is deterministic; see its docstring for
how a guess that disagrees with the closest case is handled. `retrieve_for(spec, ...)` is
`retrieve` with the spec's categories, method and embedder: what prompts and generation call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import numpy as np

from cada_jax.cada.categories import BENIGN, Categories, shipped_categories, words
from cada_jax.cada.spec import Case, Spec

RETRIEVAL_METHODS: tuple[str, ...] = ("bm25", "embedding", "hybrid")
RRF_K = 60  # the usual reciprocal-rank-fusion constant (Cormack et al., 2009)

_STOPWORDS = frozenset(
    "a an the and or but if then of to in on at for from by with about as into is are was were be been "
    "being am do does did doing have has had i me my we our you your he she it its they them their this "
    "that these those what which who whom how why when where can could would should will shall may might "
    "must so than too very just any some all no not only own same such there here out up down over under "
    "again further once also get make give tell please want like between write explain way best good "
    "someone something much many thing things know need use using one new let help".split()
)


def check_method(method: object, embed_fn: object = None, *, need_embedder: bool = True) -> str:
    """`method` if it is a retrieval method (and, with `need_embedder`, has the embedder it needs);
    else a ValueError."""
    if method not in RETRIEVAL_METHODS:
        hint = " ('lexical' is now called 'bm25')" if method == "lexical" else ""
        raise ValueError(f"unknown retrieval method {method!r}; use one of {', '.join(RETRIEVAL_METHODS)}{hint}")
    if need_embedder and method != "bm25" and embed_fn is None:
        raise ValueError(f"retrieval method {method!r} needs embed_fn(list[str]) -> array [n, d] "
                         "(set spec.embedder, or pass one); or use bm25")
    return method  # type: ignore[return-value]


def _tokens(text: str) -> list[str]:
    out = []
    for w in words(text):
        if w in _STOPWORDS or (len(w) == 1 and not w.isdigit()):
            continue
        if len(w) > 4 and w.endswith("ies"):
            w = w[:-3] + "y"
        elif len(w) > 4 and w.endswith(("sses", "shes", "ches", "xes")):
            w = w[:-2]
        elif len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
            w = w[:-1]
        out.append(w)
    return out


@dataclasses.dataclass(frozen=True)
class _Bm25Index:
    vocab: dict
    tf_DV: np.ndarray  # term frequencies, documents x vocabulary
    idf_V: np.ndarray
    norm_D: np.ndarray  # k1 * (1 - b + b * len / avg_len)


_K1, _B = 1.5, 0.75


@functools.lru_cache(maxsize=16)
def _bm25_index(texts: tuple[str, ...]) -> _Bm25Index:
    docs = [_tokens(t) for t in texts]
    vocab: dict[str, int] = {}
    for doc in docs:
        for tok in doc:
            vocab.setdefault(tok, len(vocab))
    tf_DV = np.zeros((len(docs), max(len(vocab), 1)), dtype=np.float64)
    for d, doc in enumerate(docs):
        for tok in doc:
            tf_DV[d, vocab[tok]] += 1.0
    df_V = (tf_DV > 0).sum(axis=0)
    n = len(docs)
    idf_V = np.log1p((n - df_V + 0.5) / (df_V + 0.5))
    lengths_D = tf_DV.sum(axis=1)
    avg = float(lengths_D.mean()) if n and lengths_D.mean() > 0 else 1.0
    norm_D = _K1 * (1.0 - _B + _B * lengths_D / avg)
    return _Bm25Index(vocab=vocab, tf_DV=tf_DV, idf_V=idf_V, norm_D=norm_D)


def bm25_scores(query: str, documents: Sequence[str]) -> np.ndarray:
    """BM25 (k1=1.5, b=0.75) of `query` against each document, over lowercase word tokens."""
    index = _bm25_index(tuple(documents))
    cols = sorted({index.vocab[t] for t in _tokens(query) if t in index.vocab})
    if not cols or index.tf_DV.shape[0] == 0:
        return np.zeros(len(documents), dtype=np.float64)
    tf = index.tf_DV[:, cols]
    sat = tf * (_K1 + 1.0) / (tf + index.norm_D[:, None])
    return sat @ index.idf_V[cols]


def embedding_scores(request: str, cases: Sequence[Case], embed_fn: Callable) -> np.ndarray:
    """Cosine similarity of the request's embedding to each case request's embedding."""
    texts = [request] + [c.request for c in cases]
    vecs = np.asarray(embed_fn(texts), dtype=np.float64)
    if vecs.ndim != 2 or vecs.shape[0] != len(texts):
        raise ValueError(
            f"embed_fn returned an array of shape {vecs.shape} for {len(texts)} texts; "
            f"it must return one row per text, shape [{len(texts)}, d]"
        )
    if not np.all(np.isfinite(vecs)):
        raise ValueError("embed_fn returned NaN or infinite values; check the embedding model")
    norms = np.linalg.norm(vecs, axis=1)
    unit = vecs / np.where(norms > 0, norms, 1.0)[:, None]
    return unit[1:] @ unit[0]


def _ranks(scores: np.ndarray, ids: Sequence[str]) -> np.ndarray:
    """1-based rank of each case by descending score (rounded to 1e-9), ties by id."""
    order = sorted(range(len(ids)), key=lambda i: (-round(float(scores[i]), 9), ids[i]))
    ranks = np.empty(len(ids), dtype=np.float64)
    ranks[order] = np.arange(1, len(ids) + 1)
    return ranks


def hybrid_scores(bm25: np.ndarray, embedding: np.ndarray, ids: Sequence[str]) -> np.ndarray:
    """Reciprocal-rank fusion: 1/(RRF_K + rank by embedding) + 1/(RRF_K + rank by BM25), the BM25
    term only for cases with a positive BM25 score."""
    fused = 1.0 / (RRF_K + _ranks(embedding, ids))
    lexical = 1.0 / (RRF_K + _ranks(bm25, ids))
    return fused + np.where(np.asarray(bm25) > 0, lexical, 0.0)


def similarity_scores(request: str, cases: Sequence[Case], *, method: str = "bm25",
                      embed_fn: Callable[[list[str]], np.ndarray] | None = None) -> np.ndarray:
    """Similarity of `request` to each case's request under `method` (see the module doc)."""
    check_method(method, embed_fn)
    cases = list(cases)
    if method == "bm25":
        return bm25_scores(request, [c.request for c in cases])
    emb = embedding_scores(request, cases, embed_fn)
    if method == "embedding":
        return emb
    return hybrid_scores(bm25_scores(request, [c.request for c in cases]), emb, [c.id for c in cases])


def retrieve(request: str, cases: Sequence[Case], k: int = 3, *, category: str | None = None,
             method: str = "bm25", embed_fn: Callable[[list[str]], np.ndarray] | None = None,
             categories: Categories | None = None) -> list[Case]:
    """The k precedents most relevant to `request`, deterministically.

    Order: cases of the request's category first, each group by similarity (`method`: bm25,
    embedding or hybrid; see the module doc), ties by case id. The category is `category` when
    given (trusted, a strict preference); otherwise `categories.guess` (default: the shipped
    categories) supplies it. A guess is a prior, not a filter: when the most similar case overall
    lies on the other side of the benign/harmful line from the guess, it takes the first slot, so a
    benign look-alike precedent ("kill a Python process") still surfaces when the keyword guess
    points at a hazard category ("kill" -> violent crimes), and a harmful precedent surfaces when
    the guess was fooled by a benign-sounding word. With no category at all, the order is by
    similarity alone (equal similarity: benign cases first, then by id).
    """
    if not isinstance(request, str) or not request.strip():
        raise ValueError("retrieve needs a non-empty request string")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    categories = categories or shipped_categories()
    if category is not None:
        categories.check(category)
    cases = list(cases)
    for c in cases:
        if not isinstance(c, Case):
            raise TypeError(f"retrieve expects Case objects, got {type(c).__name__}; load them with load_precedents")
    check_method(method, embed_fn)
    if k == 0 or not cases:
        return []
    scores = similarity_scores(request, cases, method=method, embed_fn=embed_fn)
    # Round so that scores equal up to float noise tie, and the id decides.
    sim = [round(float(s), 9) for s in scores]
    by_similarity = sorted(range(len(cases)), key=lambda i: (-sim[i], cases[i].id))

    guessed = False
    if category is None:
        category = categories.guess(request)
        guessed = category is not None
    if category is None:
        # No category signal at all: equal similarity (typically none) favours benign cases, since a
        # request with no hazard keyword and no overlap with any harmful case is most likely benign.
        plain = sorted(range(len(cases)), key=lambda i: (-sim[i], cases[i].category != BENIGN, cases[i].id))
        return [cases[i] for i in plain[:k]]

    by_category = sorted(range(len(cases)), key=lambda i: (cases[i].category != category, -sim[i], cases[i].id))
    chosen: list[int] = []
    top = by_similarity[0]
    if guessed and sim[top] > 0 and (cases[top].category == BENIGN) != (category == BENIGN):
        # The keyword guess and the closest precedent disagree on benign vs harmful: show both sides.
        chosen.append(top)
    for i in by_category:
        if len(chosen) >= k:
            break
        if i not in chosen:
            chosen.append(i)
    return [cases[i] for i in chosen[:k]]


def retrieve_for(spec: Spec, request: str, k: int = 3, *, category: str | None = None,
                 cases: Sequence[Case] | None = None) -> list[Case]:
    """`retrieve` over `cases` (default: the spec's precedents) with the spec's categories,
    retrieval method and embedder."""
    return retrieve(request, spec.cases if cases is None else cases, k, category=category,
                    method=spec.retrieval, embed_fn=spec.embed_fn, categories=spec.categories)


__all__ = [
    "RETRIEVAL_METHODS", "RRF_K", "bm25_scores", "check_method", "embedding_scores", "hybrid_scores",
    "retrieve", "retrieve_for", "similarity_scores",
]
