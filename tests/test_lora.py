"""LoRA: shapes and init, identity at B = 0, merged weights vs a numpy recomputation, gradients,
and a merged export that transformers loads with the same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cada_jax.checkpoints.hf import load_params
from cada_jax.config import LORA_TARGETS, LoRASection
from cada_jax.models.decoder import forward, forward_jit, positions_from_mask
from cada_jax.training.lora import LORA_GROUPS, apply_lora, export_merged, init_lora, lora_logical_axes, merge_lora
from tests.hf_reference import hf_logits, padded_batch, tiny_hf_model

ALL = LoRASection(enabled=True, rank=3, alpha=6.0, targets=LORA_TARGETS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_hf_model("qwen2", tied=False, heads=4, kv_heads=2)
    d = tmp_path_factory.mktemp("lora_base")
    model.save_pretrained(d, safe_serialization=True)
    params, cfg = load_params(str(d))
    return params, cfg, str(d)


def randomise_b(lora, seed=1, scale=0.3):
    rng = np.random.default_rng(seed)
    out = {"layers": {}}
    for g, targets in lora["layers"].items():
        for t, ab in targets.items():
            b = (scale * rng.standard_normal(ab["b"].shape)).astype(np.float32)
            out["layers"].setdefault(g, {})[t] = {"a": ab["a"], "b": jnp.asarray(b)}
    return out


def test_shapes_and_init(tiny):
    params, cfg, _ = tiny
    L, D, N, K, H, F, r = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, 3
    lora = init_lora(params, cfg, ALL, jax.random.PRNGKey(0))
    want = {
        "q_proj": ((L, D, r), (L, r, N, H)),
        "k_proj": ((L, D, r), (L, r, K, H)),
        "v_proj": ((L, D, r), (L, r, K, H)),
        "o_proj": ((L, N, H, r), (L, r, D)),
        "gate_proj": ((L, D, r), (L, r, F)),
        "up_proj": ((L, D, r), (L, r, F)),
        "down_proj": ((L, F, r), (L, r, D)),
    }
    for t, (a_shape, b_shape) in want.items():
        ab = lora["layers"][LORA_GROUPS[t][0]][t]
        assert ab["a"].shape == a_shape and ab["b"].shape == b_shape, t
        assert not np.any(np.asarray(ab["b"]))
    a = np.asarray(lora["layers"]["mlp"]["down_proj"]["a"])  # fan_in = F = 64
    assert abs(a.std() - 1 / np.sqrt(F)) < 0.25 / np.sqrt(F)
    axes = lora_logical_axes(cfg, ALL)
    assert tuple(axes["layers"]["attn"]["o_proj"]["a"]) == ("layers", "heads", "head_dim", None)
    assert tuple(axes["layers"]["attn"]["q_proj"]["b"]) == ("layers", None, "heads", "head_dim")
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) == jax.tree.structure(lora)


def test_zero_b_is_identity(tiny):
    params, cfg, _ = tiny
    lora = init_lora(params, cfg, ALL, jax.random.PRNGKey(0))
    merged = apply_lora(params, lora, ALL)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, merged), jax.tree.map(np.asarray, params))


def numpy_merge(params, lora, lcfg):
    """W + (alpha/r) A @ B with reshapes and a batched matmul (no einsum)."""
    out = jax.tree.map(np.asarray, params)
    scale = lcfg.alpha / lcfg.rank
    for t in lcfg.targets:
        g = LORA_GROUPS[t][0]
        w = out["layers"][g][t]
        a = np.asarray(lora["layers"][g][t]["a"], np.float64)
        b = np.asarray(lora["layers"][g][t]["b"], np.float64)
        L, r = a.shape[0], a.shape[-1]
        delta = np.matmul(a.reshape(L, -1, r), b.reshape(L, r, -1)).reshape(w.shape)
        out["layers"][g][t] = (w.astype(np.float64) + scale * delta).astype(w.dtype)
    return out


def test_merged_weights_and_forward_match_numpy(tiny):
    params, cfg, _ = tiny
    lcfg = LoRASection(enabled=True, rank=2, alpha=5.0, targets=("q_proj", "o_proj", "down_proj"))
    lora = randomise_b(init_lora(params, cfg, lcfg, jax.random.PRNGKey(4)))
    ref = numpy_merge(params, lora, lcfg)
    got = jax.jit(apply_lora, static_argnums=2)(params, lora, lcfg)
    for t in lcfg.targets:
        g = LORA_GROUPS[t][0]
        np.testing.assert_allclose(np.asarray(got["layers"][g][t]), ref["layers"][g][t], rtol=1e-5, atol=1e-6)
        assert not np.allclose(ref["layers"][g][t], np.asarray(params["layers"][g][t]))
    np.testing.assert_array_equal(np.asarray(got["layers"]["attn"]["k_proj"]), np.asarray(params["layers"]["attn"]["k_proj"]))
    tokens, mask = padded_batch(cfg.vocab_size, [10, 6], 10)
    pos = positions_from_mask(mask)
    a, _ = forward_jit(got, tokens, pos, mask, cfg=cfg)
    b, _ = forward_jit(jax.tree.map(jnp.asarray, ref), tokens, pos, mask, cfg=cfg)
    v = mask.astype(bool)
    assert np.abs(np.asarray(a)[v] - np.asarray(b)[v]).max() < 1e-4


def test_gradients_reach_only_the_adapters(tiny):
    params, cfg, _ = tiny
    lcfg = LoRASection(enabled=True, rank=2, alpha=2.0, targets=("v_proj", "up_proj"))
    lora = init_lora(params, cfg, lcfg, jax.random.PRNGKey(0))
    tokens, mask = padded_batch(cfg.vocab_size, [10, 4], 10)

    def loss(lora_p, base):
        logits, _ = forward(apply_lora(base, lora_p, lcfg), tokens, positions_from_mask(mask), mask, cfg=cfg)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 3])

    g, g_base = jax.jit(jax.grad(loss, argnums=(0, 1)))(lora, params)
    assert jax.tree.structure(g) == jax.tree.structure(lora)
    # with B = 0 the gradient w.r.t. A vanishes and the one w.r.t. B does not
    for grp, t in (("attn", "v_proj"), ("mlp", "up_proj")):
        assert not np.any(np.asarray(g["layers"][grp][t]["a"]))
        assert np.abs(np.asarray(g["layers"][grp][t]["b"])).max() > 1e-6
    # dL/dB equals the chain rule through the merged weight: (alpha/r) A^T dL/dW, where dL/dW is
    # the gradient w.r.t. the base kernel (merged = base + delta)
    gw = g_base["layers"]["attn"]["v_proj"]
    a = np.asarray(lora["layers"]["attn"]["v_proj"]["a"])
    want = (lcfg.alpha / lcfg.rank) * np.einsum("ldr,ldkh->lrkh", a, np.asarray(gw))
    np.testing.assert_allclose(np.asarray(g["layers"]["attn"]["v_proj"]["b"]), want, rtol=1e-4, atol=1e-7)


def test_merged_export_loads_in_transformers(tiny, tmp_path):
    import torch
    import transformers

    params, cfg, d = tiny
    lora = randomise_b(init_lora(params, cfg, ALL, jax.random.PRNGKey(2)), seed=5, scale=0.2)
    out = export_merged(params, lora, cfg, ALL, str(tmp_path / "merged"), tokenizer_dir=None)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens, mask = padded_batch(cfg.vocab_size, [10, 4], 10)
    ref = hf_logits(model, tokens, mask)
    got, _ = forward_jit(merge_lora(params, lora, ALL), tokens, positions_from_mask(mask), mask, cfg=cfg)
    v = mask.astype(bool)
    assert np.abs(np.asarray(got)[v] - ref[v]).max() <= 1e-4
    base_logits, _ = forward_jit(params, tokens, positions_from_mask(mask), mask, cfg=cfg)
    assert np.abs(np.asarray(base_logits)[v] - ref[v]).max() > 1e-2  # the adapters did change the model
