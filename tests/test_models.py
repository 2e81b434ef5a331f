"""Decoder parity with transformers (PyTorch, f32) on tiny random models of each family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cada_jax.checkpoints.hf import load_params
from cada_jax.models.decoder import forward, forward_jit, init_cache, positions_from_mask
from tests.hf_reference import hf_logits, padded_batch, tiny_hf_model

CASES = [
    ("llama", True, 4, 2),
    ("llama", False, 4, 1),
    ("llama3_rope", False, 4, 2),
    ("qwen2", True, 4, 4),
    ("qwen2", False, 4, 2),
    ("qwen3", False, 4, 2),
    ("qwen3", True, 4, 1),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for family, tied, h, k in CASES:
        model = tiny_hf_model(family, tied=tied, heads=h, kv_heads=k)
        d = tmp_path_factory.mktemp(f"{family}_{tied}_{h}_{k}")
        model.save_pretrained(d, safe_serialization=True)
        out[(family, tied, h, k)] = (model, str(d))
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-tied{c[1]}-gqa{c[2]}x{c[3]}")
@pytest.mark.parametrize("impl", ["einsum", "dot_product_attention"])
def test_logits_match_transformers_on_padded_batch(saved, case, impl):
    model, d = saved[case]
    params, cfg = load_params(d)
    cfg = cfg.replace(attention_impl=impl)
    # Positions beyond original_max_position_embeddings exercise the llama3 scaling.
    tokens, mask = padded_batch(cfg.vocab_size, [20, 7, 13], 20, left=True)
    ref = hf_logits(model, tokens, mask)
    got, _ = forward_jit(params, tokens, positions_from_mask(mask), mask, cfg=cfg)
    valid = mask.astype(bool)
    err = np.abs(np.asarray(got)[valid] - ref[valid]).max()
    assert err <= 1e-4, err


def test_right_padding_and_cached_prefill_match(saved):
    model, d = saved[("llama", True, 4, 2)]
    params, cfg = load_params(d)
    tokens, mask = padded_batch(cfg.vocab_size, [9, 4], 10, left=False)
    ref = hf_logits(model, tokens, mask)
    got, _ = forward_jit(params, tokens, positions_from_mask(mask), mask, cfg=cfg)
    valid = mask.astype(bool)
    assert np.abs(np.asarray(got)[valid] - ref[valid]).max() <= 1e-4
    # Prefill through the cache in two chunks gives the same logits as one full pass.
    ltok, lmask = padded_batch(cfg.vocab_size, [12, 5], 12, left=True)
    full = hf_logits(model, ltok, lmask)
    pos = np.asarray(positions_from_mask(lmask))
    cache = init_cache(cfg, 2, 16)
    a, cache = forward_jit(params, ltok[:, :8], pos[:, :8], lmask[:, :8], cache, cfg=cfg)
    b, cache = forward_jit(params, ltok[:, 8:], pos[:, 8:], lmask[:, 8:], cache, cfg=cfg)
    chunked = np.concatenate([np.asarray(a), np.asarray(b)], axis=1)
    v = lmask.astype(bool)
    assert np.abs(chunked[v] - full[v]).max() <= 1e-4
    assert int(cache["index"]) == 12


def test_bf16_compute_is_close(saved):
    model, d = saved[("qwen3", False, 4, 2)]
    params, cfg = load_params(d)
    cfg16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    params16, _ = load_params(d, cfg16)
    assert jax.tree.leaves(params16)[0].dtype == jax.numpy.bfloat16
    tokens, mask = padded_batch(cfg.vocab_size, [10, 10], 10)
    ref = hf_logits(model, tokens, mask)
    got, _ = forward_jit(params16, tokens, positions_from_mask(mask), mask, cfg=cfg16)
    assert np.abs(np.asarray(got) - ref).max() < 0.1
    # and remat changes nothing numerically
    got_r, _ = forward_jit(params, tokens, positions_from_mask(mask), mask, cfg=cfg.replace(remat="full"))
    assert np.abs(np.asarray(got_r) - ref).max() <= 1e-4


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-tied{c[1]}-gqa{c[2]}x{c[3]}")
def test_unrolled_per_layer_path_equals_scanned(saved, case):
    """The sampler's CPU path (per-layer [out, in] weights, feature-major activations, per-layer
    cache) computes the same logits as the scanned Flax decoder, for every family's options
    (tied/untied head, GQA, q/k/v biases, q/k norms, llama3 RoPE scaling)."""
    from cada_jax.models.unrolled import split_layers

    _, d = saved[case]
    params, cfg = load_params(d)
    tokens, mask = padded_batch(cfg.vocab_size, [11, 6], 12, left=True)
    pos = np.asarray(positions_from_mask(mask))
    full, _ = forward_jit(params, tokens, pos, mask, cfg=cfg)
    split = split_layers(params, cfg)
    unrolled, _ = forward_jit(split, tokens, pos, mask, cfg=cfg)
    np.testing.assert_allclose(np.asarray(unrolled), np.asarray(full), atol=1e-5)
    cache = init_cache(cfg, 2, 16, per_layer=True)
    a, cache = forward_jit(split, tokens[:, :7], pos[:, :7], mask[:, :7], cache, cfg=cfg)
    b, cache = forward_jit(split, tokens[:, 7:], pos[:, 7:], mask[:, 7:], cache, cfg=cfg)
    v = mask.astype(bool)
    got = np.concatenate([np.asarray(a), np.asarray(b)], axis=1)
    assert np.abs(got[v] - np.asarray(full)[v]).max() <= 1e-4
    with pytest.raises(ValueError, match="per-layer"):
        forward_jit(split, tokens, pos, mask, init_cache(cfg, 2, 16), cfg=cfg)


def test_last_only_logits_equal_the_last_position_of_the_full_pass(saved):
    """forward(last_only=True) projects only the last position onto the vocabulary, on every path
    (scanned / per-layer, with and without a cache); its logits equal the full pass's last column."""
    import jax.numpy as jnp

    from cada_jax.models.decoder import forward
    from cada_jax.models.unrolled import split_layers

    _, d = saved[("llama", True, 4, 2)]
    params, cfg = load_params(d)
    tokens, mask = padded_batch(cfg.vocab_size, [9, 5], 10, left=True)
    pos = np.asarray(positions_from_mask(mask))
    full, _ = forward_jit(params, tokens, pos, mask, cfg=cfg)
    want = np.asarray(full)[:, -1:]
    for p, per_layer in ((params, False), (split_layers(params, cfg), True)):
        last, _ = jax.jit(lambda p, t, q, m: forward(p, t, q, m, cfg=cfg, last_only=True))(p, tokens, pos, mask)
        assert last.shape == (2, 1, cfg.vocab_size)
        np.testing.assert_allclose(np.asarray(last), want, atol=1e-5)
        cache = init_cache(cfg, 2, 12, per_layer=per_layer)
        last_c, cache = forward(p, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(mask), cache, cfg=cfg, last_only=True)
        np.testing.assert_allclose(np.asarray(last_c), want, atol=1e-4)
        assert int(cache["index"]) == 10


def _group_batch(vocab: int, seed: int = 1):
    """2 prompts (left-padded to 6 slots: 5 and 2 tokens) x 3 samples (right-padded to 5 slots)."""
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, vocab, 5)), list(rng.integers(3, vocab, 2))]
    completions = [list(rng.integers(3, vocab, n)) for n in (5, 3, 1, 4, 5, 2)]
    ptok, pmask = np.zeros((2, 6), np.int32), np.zeros((2, 6), np.int32)
    for n, p in enumerate(prompts):
        ptok[n, 6 - len(p):], pmask[n, 6 - len(p):] = p, 1
    ctok, cmask = np.zeros((6, 5), np.int32), np.zeros((6, 5), np.int32)
    for i, c in enumerate(completions):
        ctok[i, :len(c)], cmask[i, :len(c)] = c, 1
    return prompts, completions, ptok, pmask, ctok, cmask


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-tied{c[1]}-gqa{c[2]}x{c[3]}")
@pytest.mark.parametrize("impl", ["einsum", "dot_product_attention"])
def test_grouped_logits_match_transformers_rows(saved, case, impl):
    """The group scorer (prompts once, G samples attending to them) gives each completion token
    the logits transformers gives it in a plain pass over that sample's [prompt | completion] row."""
    from cada_jax.models.decoder import grouped_logits

    model, d = saved[case]
    params, cfg = load_params(d)
    cfg = cfg.replace(attention_impl=impl)
    prompts, completions, ptok, pmask, ctok, cmask = _group_batch(cfg.vocab_size)
    got = np.asarray(jax.jit(grouped_logits, static_argnames="cfg")(params, ptok, pmask, ctok, cmask, cfg=cfg))
    assert got.shape == (6, 5, cfg.vocab_size)
    for i, c in enumerate(completions):
        p = prompts[i // 3]
        row = np.asarray([p + c], np.int32)
        ref = hf_logits(model, row, np.ones_like(row))[0]
        np.testing.assert_allclose(got[i, :len(c)], ref[len(p) - 1:len(p) - 1 + len(c)], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[5]], ids=lambda c: f"{c[0]}-tied{c[1]}-gqa{c[2]}x{c[3]}")
def test_grouped_logits_gradient_equals_full_rows(saved, case):
    """Gradients through the group scorer (with and without remat) equal those of the same loss
    computed from plain causal passes of the scanned decoder over every full row."""
    from cada_jax.models.decoder import grouped_logits

    _, d = saved[case]
    params, cfg = load_params(d)
    prompts, completions, ptok, pmask, ctok, cmask = _group_batch(cfg.vocab_size, seed=2)
    weights = np.random.default_rng(3).standard_normal((6, 5, cfg.vocab_size)).astype(np.float32) * cmask[..., None]

    def grouped(p, c):
        return jnp.sum(grouped_logits(p, ptok, pmask, ctok, cmask, cfg=c) * weights)

    rows = np.zeros((6, 11), np.int32)
    rmask = np.zeros((6, 11), np.int32)
    picks = []  # (row, slot predicting completion token j, j)
    for i, c in enumerate(completions):
        p = prompts[i // 3]
        rows[i, :len(p) + len(c)] = p + c
        rmask[i, :len(p) + len(c)] = 1
        picks += [(i, len(p) - 1 + j, j) for j in range(len(c))]
    r, s, j = (np.asarray(v) for v in zip(*picks))

    def full(p):
        logits, _ = forward(p, rows, positions_from_mask(rmask), rmask, cfg=cfg)
        return jnp.sum(logits[r, s] * weights[r, j])

    want_v, want_g = jax.jit(jax.value_and_grad(full))(params)
    for c in (cfg, cfg.replace(remat="full")):
        got_v, got_g = jax.jit(jax.value_and_grad(grouped, argnums=0), static_argnums=1)(params, c)
        np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-5)
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got_g)[0], jax.tree.leaves(want_g)):
            scale = float(np.abs(np.asarray(b)).max()) + 1e-12
            assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4 * scale, jax.tree_util.keystr(path)


def test_grouped_logits_single_token_completions_and_bad_groups(saved):
    from cada_jax.models.decoder import grouped_logits

    model, d = saved[CASES[0]]
    params, cfg = load_params(d)
    prompts, _, ptok, pmask, ctok, cmask = _group_batch(cfg.vocab_size)
    got = np.asarray(grouped_logits(params, ptok, pmask, ctok[:, :1], cmask[:, :1], cfg=cfg))
    for i in range(6):
        p = np.asarray([prompts[i // 3]], np.int32)
        np.testing.assert_allclose(got[i, 0], hf_logits(model, p, np.ones_like(p))[0, -1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="5 completions do not split into groups over 2 prompts"):
        grouped_logits(params, ptok, pmask, ctok[:5], cmask[:5], cfg=cfg)
