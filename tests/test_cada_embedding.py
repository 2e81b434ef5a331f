"""Decoder embeddings for precedent retrieval: values against Hugging Face hidden states, padding,
compiled programs, and the on-disk precedent cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cada_jax.cada.embedding import CachedEmbedFn, DecoderEmbedder, LazyModelEmbedder, _mean_pool, length_buckets
from cada_jax.cada.retrieval import retrieve
from cada_jax.cada.spec import Case

TEXTS = [
    "How do I kill a Python process that hangs?",
    "hi",
    "Which household chemicals must never be mixed, for safety? Explain why each pair is dangerous.",
    "Write a haiku about autumn leaves.",
    "What is 17 times 23?",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from cada_jax.checkpoints.hf import load_params
    from cada_jax.tokenizer import Tokenizer

    params, cfg = load_params(tiny_model_dir)
    return params, cfg, Tokenizer(tiny_model_dir)


def _hf_mean_pool(model_dir, tokenizer, texts, max_len):
    """Independent reference: the transformers model's final-normed hidden states of each text
    alone (no padding), averaged in numpy."""
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for t in texts:
        ids = tokenizer.encode(t)[:max_len]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()
        out.append(hidden.astype(np.float64).mean(axis=0))
    return np.stack(out)


def test_embeddings_are_the_mean_of_the_decoders_hidden_states(tiny, tiny_model_dir):
    params, cfg, tok = tiny
    emb = DecoderEmbedder(params, cfg, tok, identity="tiny", batch_size=4, max_len=32)
    got = emb(TEXTS)
    assert got.shape == (len(TEXTS), cfg.hidden_size) and got.dtype == np.float32
    ref = _hf_mean_pool(tiny_model_dir, tok, TEXTS, max_len=32)  # TEXTS[2] is cut to 32 tokens
    assert len(tok.encode(TEXTS[2])) > 32
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_padding_and_batch_company_do_not_change_an_embedding(tiny):
    params, cfg, tok = tiny
    alone = [DecoderEmbedder(params, cfg, tok, identity="t", batch_size=4, max_len=64)([t])[0] for t in TEXTS]
    together = DecoderEmbedder(params, cfg, tok, identity="t", batch_size=4, max_len=64)(TEXTS)
    # "hi" alone is a 16-token row; next to the long text it is padded to 64 in a batch of 4
    np.testing.assert_allclose(np.stack(alone), together, rtol=1e-5, atol=1e-6)


def test_a_handful_of_programs_and_memoised_texts(tiny):
    params, cfg, tok = tiny
    assert length_buckets(128) == (16, 32, 64, 128) and length_buckets(100) == (16, 32, 64, 100)
    emb = DecoderEmbedder(params, cfg, tok, identity="t", batch_size=4, max_len=64)
    before = _mean_pool._cache_size()
    emb([f"request number {i} " * (1 + i % 7) for i in range(23)])
    emb(["one more text"])
    # rows: 4 or 1; lengths: the buckets 16, 32, 64 -> at most 6 new programs, whatever the texts
    assert _mean_pool._cache_size() - before <= 6
    calls = emb.forward_calls
    emb(["one more text", "request number 0 "])
    assert emb.forward_calls == calls  # already embedded: a lookup
    with pytest.raises(TypeError, match="list of strings"):
        emb([1])


def _cases(n=6):
    return [Case(f"c{i}", "benign", f"case request {i} about {w}", "r (C2)", "comply")
            for i, w in enumerate(["gardens", "python", "chess", "baking", "cars", "music"][:n])]


def test_precedent_embeddings_are_cached_on_disk_and_reused(tiny, tmp_path):
    params, cfg, tok = tiny
    cases = _cases()
    first = DecoderEmbedder(params, cfg, tok, identity="tiny", batch_size=4, max_len=32)
    fn = CachedEmbedFn(first, cases, tmp_path)
    assert fn.path.parent == tmp_path and not fn.path.exists()
    vec = fn(["a query"])
    assert fn.cache_hit is False and fn.path.is_file() and vec.shape == (1, cfg.hidden_size)
    meta = json.loads(fn.path.with_suffix(".json").read_text())
    assert meta["n"] == len(cases) and meta["embedder"] == first.identity and meta["dim"] == cfg.hidden_size
    stored = np.load(fn.path, allow_pickle=False)
    np.testing.assert_allclose(stored, first([c.request for c in cases]))
    mtime = fn.path.stat().st_mtime_ns

    second = DecoderEmbedder(params, cfg, tok, identity="tiny", batch_size=4, max_len=32)
    again = CachedEmbedFn(second, cases, tmp_path)
    assert again.path == fn.path
    np.testing.assert_array_equal(again([c.request for c in cases]), stored)
    assert again.cache_hit is True and second.forward_calls == 0 and fn.path.stat().st_mtime_ns == mtime

    # another embedder identity (or other precedents) is another file
    other = CachedEmbedFn(DecoderEmbedder(params, cfg, tok, identity="other", batch_size=4, max_len=32), cases, tmp_path)
    changed = CachedEmbedFn(second, cases[:-1], tmp_path)
    assert len({fn.path, other.path, changed.path}) == 3
    # a damaged file is recomputed and replaced
    fn.path.write_bytes(b"not an npy file")
    fixed = CachedEmbedFn(DecoderEmbedder(params, cfg, tok, identity="tiny", batch_size=4, max_len=32), cases, tmp_path)
    fixed(["q"])
    assert fixed.cache_hit is False and np.array_equal(np.load(fixed.path, allow_pickle=False), stored)


def test_lazy_model_embedder_loads_on_first_use_and_matches(tiny, tiny_model_dir, tmp_path):
    params, cfg, tok = tiny
    lazy = LazyModelEmbedder(tiny_model_dir, batch_size=4, max_len=32)
    fn = CachedEmbedFn(lazy, _cases(), tmp_path)
    assert lazy._inner is None
    eager = DecoderEmbedder(params, cfg, tok, identity="x", batch_size=4, max_len=32)
    np.testing.assert_allclose(fn(TEXTS[:2]), eager(TEXTS[:2]), rtol=1e-6, atol=1e-6)
    # rerun: the cache is read without loading the model for the precedents
    lazy2 = LazyModelEmbedder(tiny_model_dir, batch_size=4, max_len=32)
    assert lazy2.identity == lazy.identity
    fn2 = CachedEmbedFn(lazy2, _cases(), tmp_path)
    fn2._load_cases()
    assert fn2.cache_hit is True and lazy2._inner is None


def test_retrieval_by_tiny_model_embeddings_follows_numpy_cosine(tiny):
    params, cfg, tok = tiny
    emb = DecoderEmbedder(params, cfg, tok, identity="t", batch_size=4, max_len=32)
    cases = _cases()
    query = "a question about growing tomatoes"
    vecs = emb([query] + [c.request for c in cases]).astype(np.float64)
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    cos = unit[1:] @ unit[0]
    expected = [cases[i].id for i in sorted(range(len(cases)), key=lambda i: (-round(cos[i], 9), cases[i].id))]
    got = retrieve(query, cases, k=len(cases), method="embedding", embed_fn=emb, category="benign")
    assert [c.id for c in got] == expected
