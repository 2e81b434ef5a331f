"""The sampler against transformers `generate` and against a full forward pass."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cada_jax.checkpoints.hf import load_params
from cada_jax.models.decoder import forward_jit, positions_from_mask
from cada_jax.sampling import Sampler, SamplingError, SamplingParams
from cada_jax.tokenizer import Tokenizer
from tests.conftest import CHAT_PROMPTS


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    params, cfg = load_params(tiny_model_dir)
    tok = Tokenizer(tiny_model_dir)
    return params, cfg, tok, Sampler(cfg, tok)


def _hf_greedy(model_dir, sampler, prompts, new_tokens, model=None):
    import torch
    import transformers

    model = model or transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = sampler.encode_prompts(prompts)
    tokens, mask = sampler.tokenizer.pad(ids, side="left")
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=sampler.tokenizer.pad_id,
            min_new_tokens=new_tokens,
        )
    return out[:, tokens.shape[1]:].numpy()


def test_greedy_matches_transformers_tiny(tiny, tiny_model_dir):
    params, cfg, tok, sampler = tiny
    prompts = [f"the {w} in the hat" * (i % 3 + 1) for i, w in enumerate("abcdefgh")]
    ref = _hf_greedy(tiny_model_dir, sampler, prompts, 32)
    out = sampler.generate(params, prompts, SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True))
    np.testing.assert_array_equal(np.array(out.completion_ids), ref)


def test_greedy_matches_transformers_smollm2(smollm2, smollm2_dir, smollm2_torch):
    params, cfg, tok = smollm2
    sampler = Sampler(cfg, tok)
    ref = _hf_greedy(smollm2_dir, sampler, CHAT_PROMPTS, 32, model=smollm2_torch)
    out = sampler.generate(params, CHAT_PROMPTS, SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True))
    np.testing.assert_array_equal(np.array(out.completion_ids), ref)
    assert "Paris" in out.texts[0]


def test_logprobs_equal_full_forward_log_softmax(tiny):
    params, cfg, tok, sampler = tiny
    prompts = ["the cat", "a hat in the house of the cat"]
    out = sampler.generate(params, prompts, SamplingParams(max_new_tokens=12, temperature=1.3, top_k=20, n=2, seed=3))
    for i, (c, lp) in enumerate(zip(out.completion_ids, out.logprobs)):
        p = out.prompt_ids[i // 2]
        seq = np.array([p + c], np.int32)
        mask = np.ones_like(seq)
        logits = np.asarray(forward_jit(params, seq, positions_from_mask(mask), mask, cfg=cfg)[0])[0]
        logsm = jax.nn.log_softmax(logits, axis=-1)
        ref = np.array([logsm[len(p) - 1 + t, tokid] for t, tokid in enumerate(c)])
        np.testing.assert_allclose(lp, ref, atol=1e-4)


def test_seeds_groups_and_single_prefill(tiny):
    params, cfg, tok, sampler = tiny
    sp = SamplingParams(max_new_tokens=16, temperature=1.0, n=4, seed=7, ignore_eos=True)
    before = dict(sampler.stats)
    a = sampler.generate(params, ["the cat", "in the"], sp)
    assert sampler.stats["prefill_calls"] - before["prefill_calls"] == 1  # one prefill for 2 prompts x 4 samples
    b = sampler.generate(params, ["the cat", "in the"], sp)
    assert a.completion_ids == b.completion_ids
    group = a.completion_ids[:4]
    assert len({tuple(x) for x in group}) > 1, "samples within a group should differ"
    c = sampler.generate(params, ["the cat", "in the"], SamplingParams(**{**sp.__dict__, "seed": 8}))
    assert c.completion_ids != a.completion_ids
    assert list(a.group_index) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_buckets_compile_once(tiny):
    params, cfg, tok, _ = tiny
    sampler = Sampler(cfg, tok)
    sp = SamplingParams(max_new_tokens=9, temperature=0)
    p0, d0 = sampler._prefill._cache_size(), sampler._decode._cache_size()
    sampler.generate(params, ["the cat", "a", "in the hat"], sp)
    sampler.generate(params, ["the cat is", "a", "in", "the hat"], sp)  # batch 3 and 4 -> bucket 4
    assert sampler._prefill._cache_size() - p0 == 1
    assert sampler._decode._cache_size() - d0 == 1
    sampler.generate(params, ["the cat is", "a", "in", "the hat", "x"], sp)  # batch 5 -> bucket 8
    assert sampler._prefill._cache_size() - p0 == 2


def test_forward_two_batch_sizes_one_bucket_compile_once(tiny):
    params, cfg, tok, _ = tiny
    from cada_jax.models.decoder import forward
    from cada_jax.tokenizer import bucket

    fwd = jax.jit(lambda *a, cfg: forward(*a, cfg=cfg), static_argnames=("cfg",))
    for texts in (["the cat", "a hat", "in"], ["the", "cat", "sat", "in the hat"]):
        ids = tok.encode_batch(texts)
        tokens, mask = tok.pad(ids, batch=bucket(len(ids)))
        fwd(params, tokens, positions_from_mask(mask), mask, cfg=cfg)
    assert fwd._cache_size() == 1


def test_stop_ids_and_stop_strings(tiny):
    params, cfg, tok, sampler = tiny
    free = sampler.generate(params, ["the cat"], SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))
    ids = free.completion_ids[0]
    stop_id = ids[5]
    first = ids.index(stop_id)
    out = sampler.generate(params, ["the cat"], SamplingParams(max_new_tokens=24, temperature=0, eos_ids=(stop_id,)))
    assert out.completion_ids[0] == ids[: first + 1] and out.finish_reasons == ["stop"]
    text = tok.decode(ids, skip_special_tokens=False)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    out = sampler.generate(
        params, ["the cat"],
        SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True, stop_strings=(stop,), stop_check_every=4),
    )
    assert out.finish_reasons == ["stop"]
    assert stop not in out.texts[0]
    assert stop in tok.decode(out.completion_ids[0], skip_special_tokens=False)
    assert len(out.completion_ids[0]) < 24
    # without the stop: runs to the length limit
    assert free.finish_reasons == ["length"] and len(ids) == 24


def test_topk1_and_tiny_top_p_are_greedy(tiny):
    params, cfg, tok, sampler = tiny
    greedy = sampler.generate(params, ["the cat", "hat"], SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))
    k1 = sampler.generate(params, ["the cat", "hat"], SamplingParams(max_new_tokens=10, temperature=1.0, top_k=1, ignore_eos=True))
    p0 = sampler.generate(params, ["the cat", "hat"], SamplingParams(max_new_tokens=10, temperature=1.0, top_p=1e-6, ignore_eos=True))
    assert greedy.completion_ids == k1.completion_ids == p0.completion_ids


def test_bad_inputs(tiny):
    params, cfg, tok, sampler = tiny
    with pytest.raises(SamplingError, match="no prompts"):
        sampler.generate(params, [], SamplingParams(max_new_tokens=4))
    long = "the cat " * 400
    with pytest.raises(SamplingError, match=r"prompt 1 has \d+ tokens.*context of 256"):
        sampler.generate(params, ["hi", long], SamplingParams(max_new_tokens=8))
    out = sampler.generate(params, [long], SamplingParams(max_new_tokens=8, truncate_prompt="left", temperature=0))
    assert len(out.prompt_ids[0]) == 256 - 8
    with pytest.raises(SamplingError, match="temperature"):
        sampler.generate(params, ["hi"], SamplingParams(temperature=-1))
    with pytest.raises(SamplingError, match="prompt 0: expected"):
        sampler.generate(params, [3.5], SamplingParams(max_new_tokens=4))


def test_bf16_cache(tiny):
    params, cfg, tok, sampler = tiny
    a = sampler.generate(params, ["the cat"], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    b = sampler.generate(params, ["the cat"], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True, cache_dtype="bfloat16"))
    assert len(b.completion_ids[0]) == 8
    assert np.abs(a.logprobs[0] - b.logprobs[0]).max() < 0.1


def test_logprobs_over_several_key_blocks(tiny):
    """70 new tokens: the decode loop's keys span several blocks of slots (unrolled.chunk_keys), and
    the samples keep matching a full forward pass's log-softmax."""
    params, cfg, tok, _ = tiny
    sampler = Sampler(cfg, tok)
    seen = {}
    decode = sampler._decode

    def rec(params, state, *a, **kw):
        seen["k"] = state["cache"]["k"][0].shape
        return decode(params, state, *a, **kw)

    sampler._decode = rec
    out = sampler.generate(params, ["the cat", "a hat in the house"],
                           SamplingParams(max_new_tokens=70, temperature=1.0, seed=11, ignore_eos=True))
    assert len(seen["k"]) == 5 and seen["k"][2] >= 2 and seen["k"][4] in (32, 64), seen
    for i, (c, lp) in enumerate(zip(out.completion_ids, out.logprobs)):
        p = out.prompt_ids[i]
        assert len(c) == 70
        seq = np.array([p + c], np.int32)
        mask = np.ones_like(seq)
        logits = np.asarray(forward_jit(params, seq, positions_from_mask(mask), mask, cfg=cfg)[0])[0]
        ref = np.asarray(jax.nn.log_softmax(logits, axis=-1))[np.arange(len(c)) + len(p) - 1, c]
        np.testing.assert_allclose(lp, ref, atol=1e-4)


def test_per_layer_weights_made_once_per_set_of_params(tiny):
    """The sampler keeps its per-layer copy of the weights for the next call with the same arrays,
    makes a new one for other arrays, and never reuses a copy of deleted (donated) weights."""
    params, cfg, tok, _ = tiny
    sampler = Sampler(cfg, tok, unroll_layers=True)
    a = sampler.decode_params(params)
    assert sampler.decode_params(params) is a
    other = jax.tree.map(lambda x: x * 1.0, params)
    b = sampler.decode_params(other)
    assert b is not a
    np.testing.assert_array_equal(np.asarray(b["layers"][0]["q"]), np.asarray(a["layers"][0]["q"]))
    sp = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    want = sampler.generate(params, ["the cat"], sp).completion_ids
    jax.tree.map(lambda x: x.delete(), other)
    with pytest.raises(RuntimeError, match="deleted"):
        sampler.generate(other, ["the cat"], sp)  # not served from the cached copy
    assert sampler.generate(params, ["the cat"], sp).completion_ids == want
    kept = sampler.decode_params(params)
    sampler.release_weights()
    assert sampler._split is None and sampler.decode_params(params) is not kept


def test_scanned_and_unrolled_decode_paths_agree(tiny):
    params, cfg, tok, _ = tiny
    sp = SamplingParams(max_new_tokens=12, temperature=0.9, n=2, seed=5, ignore_eos=True)
    a = Sampler(cfg, tok, unroll_layers=True).generate(params, ["the cat", "in the hat"], sp)
    b = Sampler(cfg, tok, unroll_layers=False).generate(params, ["the cat", "in the hat"], sp)
    assert a.completion_ids == b.completion_ids
    for x, y in zip(a.logprobs, b.logprobs):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_shared_prefix_len_table():
    from cada_jax.sampling import shared_prefix_len

    base = list(range(100, 140))
    # (prompts, expected): cut to a multiple of 8, >= 16, each prompt keeps >= 1 own token
    table = [
        ([base[:30] + [1], base[:30] + [2, 3]], 24),  # 30 common -> 24
        ([base[:24] + [1], base[:24] + [2]], 24),  # exactly 24 common
        ([base[:24], base[:24] + [2]], 16),  # the shorter prompt is all prefix: 23 usable -> 16
        ([base[:15] + [1], base[:15] + [2]], 0),  # under 16
        ([base[:30] + [1]], 0),  # a single prompt has nothing to share
        ([base[:20] + [1], base[:20] + [2], base[:9] + [7] * 20], 0),  # the third differs at 9
    ]
    for prompts, expected in table:
        assert shared_prefix_len(prompts) == expected, prompts


def test_shared_prefix_prefill_equals_per_row_prefill(tiny):
    """Prompts with a common chat preamble: the prefix prefilled once and broadcast gives the same
    samples (same seed) and the same log-probs as prefilling every row whole."""
    params, cfg, tok, sampler = tiny
    preamble = "the cat sat in the hat and the hat sat on the cat " * 2
    prompts = [preamble + "a", preamble + "in the house of", preamble + "hat"]
    ids = sampler.encode_prompts(prompts)
    assert len(ids[0]) > 24
    for sp in (SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True),
               SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=4, ignore_eos=True)):
        shared = sampler.generate(params, prompts, sp)
        whole = sampler.generate(params, prompts, dataclasses.replace(sp, share_prefix=False))
        assert shared.timings["shared_prefix"] >= 16 and whole.timings["shared_prefix"] == 0
        assert shared.completion_ids == whole.completion_ids
        for a, b in zip(shared.logprobs, whole.logprobs):
            np.testing.assert_allclose(a, b, atol=1e-5)
    # and against a full forward pass over [prompt | completion] (positions after the padding gap)
    for i, (c, lp) in enumerate(zip(shared.completion_ids, shared.logprobs)):
        seq = np.array([ids[i // 2] + c], np.int32)
        mask = np.ones_like(seq)
        logits = np.asarray(forward_jit(params, seq, positions_from_mask(mask), mask, cfg=cfg)[0])[0]
        ref = np.asarray(jax.nn.log_softmax(logits, axis=-1))[np.arange(len(c)) + len(ids[i // 2]) - 1, c]
        np.testing.assert_allclose(lp, ref, atol=1e-4)


def test_categorical_matches_inverse_cdf_and_frequencies():
    """The two-level CDF search against a flat numpy inverse CDF on the same uniforms, and the
    drawn frequencies against the weights; zero weights are never drawn (V not a block multiple)."""
    from cada_jax.sampling import _categorical_vocab_major

    rng = np.random.default_rng(0)
    V, S = 1000, 20000
    w = rng.exponential(size=V).astype(np.float32) ** 3
    w[rng.choice(V, 300, replace=False)] = 0.0
    keys = jax.random.split(jax.random.PRNGKey(1), S)
    # the sampler's own draw, on vocabulary-major weights [V, S]
    toks = np.asarray(jax.jit(_categorical_vocab_major)(keys, jnp.broadcast_to(jnp.asarray(w)[:, None], (V, S))))
    assert w[toks].min() > 0
    u = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, 1e-7, 1.0))(keys), np.float64)
    cdf = np.cumsum(w.astype(np.float64))
    ref = np.minimum(np.searchsorted(cdf, u * cdf[-1]), V - 1)
    assert np.mean(toks == ref) > 0.999
    freq = np.bincount(toks, minlength=V) / S
    p = w / w.sum()
    assert 0.5 * np.abs(freq - p).sum() < 0.06  # total variation; multinomial noise alone is ~0.04 here
