"""Multi-device checks for tests/test_sharding.py, run in a subprocess with 8 host CPU devices.

JAX fixes its device count when it first initialises, and the test process runs with one device,
so the test starts ``python -m tests.mesh_worker`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. The worker prints one JSON line of measured
differences and byte counts (``RESULT {...}``); the test asserts on them.

`sampling_on_meshes` runs greedy `Sampler.generate` on one device and on meshes, for a tiny model
built like tests/conftest.py's ``tiny_model_dir`` (GGUF with the fixture tokenizer, converted by
our importer) but from numpy weights, so the worker does not import torch.

`grpo_scenario` runs the GRPO trainer's own compiled update (`training.grpo_batch.grpo_update`, state placed
by `training.placement.create_state`, old/reference log-probs from `training.grpo_batch.reference_logprob_fn`) on a mesh; it is
shared with tests/multihost_worker.py so that a two-process run and a single-process run of the
same update can be compared. The forward checks jit `decoder.forward` with the shardings the mesh
rules give (`sharding.param_shardings`, `batch_sharding`, `cache_shardings`).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def write_result(directory: str, result: dict) -> str:
    """Write one process's result to ``directory/result_<process index>.json`` (atomically) and
    print where it went; tests/test_sharding.py reads these files back for multi-process runs."""
    import jax

    path = os.path.join(directory, f"result_{jax.process_index()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    print(f"RESULT written to {path}", flush=True)
    return path


def tiny_cfg(model_type: str = "llama", **kw):
    from cada_jax.models.config import ModelConfig

    extra = {"qwen2": dict(attention_bias=True), "qwen3": dict(qk_norm=True)}.get(model_type, {})
    return ModelConfig(model_type=model_type, **{**TINY, **extra, **kw})


def random_params(cfg, seed: int = 0):
    """Host (numpy) params: N(0, 0.02) weights, norms near 1, small biases; no JAX compile needed."""
    import jax

    from cada_jax.models.decoder import param_shapes

    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))
    out = []
    for path, s in flat:
        name = jax.tree_util.keystr(path)
        x = rng.standard_normal(s.shape).astype(np.float32)
        if "norm" in name:
            x = 1.0 + 0.1 * x
        elif "bias" in name:
            x = 0.1 * x
        else:
            x = 0.02 * x
        out.append(x.astype(s.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def per_device_param_bytes(params) -> dict:
    """Bytes of `params` held by each (addressable) device, summed from the arrays' own shards."""
    import jax

    out: dict = {}
    for leaf in jax.tree_util.tree_leaves(params):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + int(shard.data.nbytes)
    return out


def grpo_batch(cfg, prompts: int = 2, group: int = 4, prompt_len: int = 6, completion_len: int = 6, seed: int = 1):
    """A GRPO update batch (host arrays, `training.grpo_batch.build_update_batch`): `prompts` left-padded
    prompts with `group` right-padded completions each, one ending early, an advantage per sample."""
    from cada_jax.training.grpo_batch import build_update_batch

    rng = np.random.default_rng(seed)
    prompt_ids = [list(rng.integers(3, cfg.vocab_size, size=prompt_len - int(rng.integers(0, 3)))) for _ in range(prompts)]
    completion_ids = [list(rng.integers(3, cfg.vocab_size, size=completion_len)) for _ in range(prompts * group)]
    completion_ids[0] = completion_ids[0][:-2]  # a completion that ended early
    adv = rng.standard_normal(prompts * group).astype(np.float32)
    zeros = [np.zeros(len(c), np.float32) for c in completion_ids]
    return build_update_batch(prompt_ids, completion_ids, zeros, adv, group_size=group, pad_id=0,
                              prompt_len=prompt_len, completion_len=completion_len)


def reference_logprobs(params, batch, cfg):
    """Unsharded log p of every completion token [B, C] (0 on padding) from a causal pass over each
    [prompt | completion] row alone (independent of cada_jax.sharding and of the grouped scorer)."""
    import jax.numpy as jnp

    from cada_jax.models.decoder import forward, positions_from_mask

    ptok, pmask = jnp.asarray(batch["prompt_tokens_NP"]), jnp.asarray(batch["prompt_mask_NP"])
    ctok, cmask = jnp.asarray(batch["completion_tokens_BC"]), jnp.asarray(batch["completion_mask_BC"])
    G = ctok.shape[0] // ptok.shape[0]
    P, C = ptok.shape[1], ctok.shape[1]
    tokens = jnp.concatenate([jnp.repeat(ptok, G, axis=0), ctok], axis=1)
    mask = jnp.concatenate([jnp.repeat(pmask, G, axis=0), cmask], axis=1)
    logits, _ = forward(params, tokens, positions_from_mask(mask), mask, cfg=cfg)
    logp = jnp.take_along_axis(jax_log_softmax(logits[:, P - 1:P + C - 1]), ctok[..., None], axis=-1)[..., 0]
    return jnp.where(cmask != 0, logp, 0.0)


def jax_log_softmax(x):
    import jax

    return jax.nn.log_softmax(x, axis=-1)


def checksum(tree) -> float:
    """Order-stable float64 checksum of a pytree of (global) arrays, the same on every process."""
    import jax
    from jax.experimental import multihost_utils

    total = 0.0
    for i, leaf in enumerate(jax.tree_util.tree_leaves(tree)):
        host = np.asarray(multihost_utils.process_allgather(leaf, tiled=True), np.float64)
        total += float(np.sum(np.abs(host))) + (i + 1) * float(np.sum(host))
    return total


def grpo_scenario(mesh, steps: int = 2, lr: float = 1e-3):
    """Build the tiny model + batch, run `steps` of the GRPO trainer's update on `mesh`.

    Returns a dict: state (a TrainState), losses, params0 (host), batch (host), gbatch (on the
    mesh, with old and reference log-probs), cfg, loss_cfg, step (the jitted update) and
    state_shardings (where the TrainState lives, for checkpoint restore).
    """
    import jax
    import optax

    from cada_jax.training import placement
    from cada_jax.training.grpo_batch import grpo_update, reference_logprob_fn
    from cada_jax.training.losses import LossConfig
    from cada_jax.sharding import param_shardings, place_rows, shard_params

    cfg = tiny_cfg("qwen2")
    loss_cfg = LossConfig(beta=0.04)
    params0 = random_params(cfg, seed=3)
    batch = grpo_batch(cfg)
    p_sh = param_shardings(cfg, mesh)
    ref_params = shard_params(params0, p_sh)
    gbatch = place_rows(batch, mesh)
    old = reference_logprob_fn(cfg, mesh)(ref_params, gbatch["prompt_tokens_NP"], gbatch["prompt_mask_NP"],
                                 gbatch["completion_tokens_BC"], gbatch["completion_mask_BC"])
    gbatch = dict(gbatch, old_logp_BC=old - 0.05 * gbatch["advantages_B"][:, None], ref_logp_BC=old)
    tx = optax.adamw(lr, weight_decay=0.01)
    state = placement.create_state(shard_params(params0, p_sh), tx, jax.random.PRNGKey(0), model_cfg=cfg,
                                   lora_cfg=None, mesh=mesh)
    step = grpo_update(cfg, None, loss_cfg, mesh, tx)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, gbatch)
        losses.append(float(metrics["loss"]))
    return dict(state=state, losses=losses, params0=params0, batch=batch, gbatch=gbatch, cfg=cfg,
                loss_cfg=loss_cfg, step=step,
                state_shardings=placement.train_state_shardings(cfg, None, mesh, tx))


def reference_update(params0, batch, cfg, loss_cfg, steps: int = 2, lr: float = 1e-3):
    """The same GRPO updates on one device, written out without cada_jax.sharding or the trainer."""
    import jax
    import jax.numpy as jnp
    import optax

    from cada_jax.training.losses import policy_loss

    old = reference_logprobs(params0, batch, cfg)
    adv = jnp.asarray(batch["advantages_B"])
    cmask = jnp.asarray(batch["completion_mask_BC"])

    def loss_fn(p):
        logp = reference_logprobs(p, batch, cfg)
        return policy_loss(logp, old - 0.05 * adv[:, None], adv, cmask, loss_cfg, old)[0]

    opt = optax.adamw(lr, weight_decay=0.01)
    params = jax.tree_util.tree_map(jnp.asarray, params0)
    opt_state = opt.init(params)
    losses = []
    step = jax.jit(lambda p, s: _ref_step(p, s, loss_fn, opt))
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return params, losses


def _ref_step(params, opt_state, loss_fn, opt):
    import jax
    import optax

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _max_diff(a, b) -> float:
    import jax

    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _rel_delta_err(p0, p_a, p_b) -> float:
    """|| (p_a - p0) - (p_b - p0) || / || p_b - p0 || over all parameters."""
    import jax

    num = den = 0.0
    for x0, xa, xb in zip(*(jax.tree_util.tree_leaves(t) for t in (p0, p_a, p_b))):
        da = np.asarray(xa, np.float64) - np.asarray(x0, np.float64)
        db = np.asarray(xb, np.float64) - np.asarray(x0, np.float64)
        num += float(np.sum((da - db) ** 2))
        den += float(np.sum(db**2))
    return (num / max(den, 1e-300)) ** 0.5


# ----------------------------------------------------------------------------- sampling on the mesh

SAMPLING_PROMPTS = [f"the {w} in the hat" * (i % 3 + 1) for i, w in enumerate("abcdefgh")]
# The same requests behind a common preamble: the sampler prefills it once and broadcasts the cache.
PREAMBLE = "a cat and a hat sat in the house of the cat " * 3
SHARED_PROMPTS = [PREAMBLE + p for p in SAMPLING_PROMPTS]
PROMPT_SET_BY_MESH = {"d1f4t2": "ref", "d2f2t2": "shared_ref"}  # which reference each mesh is checked against


class _HostTensor:
    """The bit of the torch.Tensor API that tests/gguf_fixture.write_llama_gguf reads from a state dict."""

    def __init__(self, a):
        self.a = a

    def detach(self):
        return self

    def float(self):
        return self

    def numpy(self):
        return self.a


class _HostLlama:
    """A random Llama in HF's layout (numpy), duck-typed as the transformers model that
    `write_llama_gguf` expects; saves importing torch in the worker (seconds of its time budget).

    Weights are drawn at ~1/sqrt(fan_in) with an untied, sharper LM head, so the greedy
    continuation depends on the context (with the HF init and tied embeddings a tiny model just
    repeats the prompt's last token, which would make "same tokens" a weak check).
    """

    def __init__(self, seed: int = 0, vocab: int = 264, hidden: int = 64, inter: int = 128, layers: int = 2,
                 heads: int = 4, kv_heads: int = 2):
        from types import SimpleNamespace

        self.config = SimpleNamespace(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
            rms_norm_eps=1e-5, tie_word_embeddings=False,
        )
        rng = np.random.default_rng(seed)
        hd = hidden // heads

        def w(*shape, std=None):
            std = std if std is not None else shape[-1] ** -0.5
            return (std * rng.standard_normal(shape)).astype(np.float32)

        sd = {"model.embed_tokens.weight": w(vocab, hidden, std=1.0)}
        for i in range(layers):
            pre = f"model.layers.{i}."
            sd[pre + "input_layernorm.weight"] = 1.0 + w(hidden, std=0.1)
            sd[pre + "self_attn.q_proj.weight"] = w(heads * hd, hidden)
            sd[pre + "self_attn.k_proj.weight"] = w(kv_heads * hd, hidden)
            sd[pre + "self_attn.v_proj.weight"] = w(kv_heads * hd, hidden)
            sd[pre + "self_attn.o_proj.weight"] = w(hidden, heads * hd)
            sd[pre + "post_attention_layernorm.weight"] = 1.0 + w(hidden, std=0.1)
            sd[pre + "mlp.gate_proj.weight"] = w(inter, hidden)
            sd[pre + "mlp.up_proj.weight"] = w(inter, hidden)
            sd[pre + "mlp.down_proj.weight"] = w(hidden, inter)
        sd["model.norm.weight"] = 1.0 + w(hidden, std=0.1)
        sd["lm_head.weight"] = w(vocab, hidden, std=0.5)
        self._sd = sd

    def state_dict(self):
        return {k: _HostTensor(v) for k, v in self._sd.items()}


def tiny_model_dir(root: str) -> str:
    """A tiny random Llama + the fixture's byte-level BPE tokenizer, through GGUF like tests/conftest.py."""
    from cada_jax.checkpoints.gguf_import import convert_gguf
    from tests.gguf_fixture import vocab_tokens, write_llama_gguf

    model = _HostLlama(vocab=len(vocab_tokens()))
    path = os.path.join(root, "tiny.gguf")
    write_llama_gguf(path, model)
    return convert_gguf(path, os.path.join(root, "hf"))


def sampling_on_meshes(mesh_cfgs, max_new_tokens: int = 16) -> dict:
    """Greedy `Sampler.generate` on one device and on each mesh (params loaded straight into their
    `param_shardings`); token ids, log-probs and where the arrays live, as JSON-able values."""
    import tempfile

    import jax

    from cada_jax.checkpoints.hf import load_params
    from cada_jax.sampling import Sampler, SamplingParams
    from cada_jax.sharding import make_mesh, param_shardings
    from cada_jax.tokenizer import Tokenizer

    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    out: dict = {}
    with tempfile.TemporaryDirectory() as root:
        d = tiny_model_dir(root)
        tok = Tokenizer(d)
        params, cfg = load_params(d)
        out["vocab_size"] = cfg.vocab_size
        prompt_sets = {"ref": SAMPLING_PROMPTS, "shared_ref": SHARED_PROMPTS}
        refs = {}
        for name, prompts in prompt_sets.items():
            refs[name] = Sampler(cfg, tok).generate(params, prompts, sp)
            out[f"{name}_ids"] = refs[name].completion_ids
            out[f"{name}_reasons"] = refs[name].finish_reasons
            out[f"{name}_shared_prefix"] = refs[name].timings["shared_prefix"]
        for mc in mesh_cfgs:
            key = f"d{mc.data}f{mc.fsdp}t{mc.tensor}"
            mesh = make_mesh(mc)
            p_sh = param_shardings(cfg, mesh)
            sparams, _ = load_params(d, shardings=p_sh)
            sampler = Sampler(cfg, tok, mesh=mesh)
            seen: dict = {}
            prefill, decode = sampler._prefill, sampler._decode

            def rec_prefill(params, tokens, mask, *a, **kw):
                seen["tokens"] = tokens.sharding
                seen["tokens_shape"] = tokens.shape
                last, cache, nxt = prefill(params, tokens, mask, *a, **kw)
                seen["prefill_k"], seen["prefill_k_shape"] = cache["k"][0].sharding, cache["k"][0].shape
                return last, cache, nxt

            def rec_decode(params, state, *a, **kw):
                state = decode(params, state, *a, **kw)
                seen["decode_k"], seen["decode_k_shape"] = state["cache"]["k"][0].sharding, state["cache"]["k"][0].shape
                return state

            sampler._prefill, sampler._decode = rec_prefill, rec_decode
            ref = refs[PROMPT_SET_BY_MESH[key]]
            got = sampler.generate(sparams, prompt_sets[PROMPT_SET_BY_MESH[key]], sp)
            out[f"{key}_shared_prefix"] = got.timings["shared_prefix"]
            out[f"{key}_ids"] = got.completion_ids
            out[f"{key}_reasons"] = got.finish_reasons
            out[f"{key}_logp_maxdiff"] = max(
                float(np.max(np.abs(a - b), initial=0.0)) for a, b in zip(got.logprobs, ref.logprobs)
            )
            leaves, want = jax.tree_util.tree_leaves(sparams), jax.tree_util.tree_leaves(p_sh)
            out[f"{key}_params_kept"] = all(not x.is_deleted() and x.sharding == s for x, s in zip(leaves, want))
            # parameters that no device holds a slice of (should be the norm scales only)
            out[f"{key}_params_whole"] = sorted(
                jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_flatten_with_path(sparams)[0]
                if x.sharding.is_fully_replicated
            )
            out[f"{key}_tokens_spec"] = str(seen["tokens"].spec)
            out[f"{key}_tokens_shard"] = list(seen["tokens"].shard_shape(seen["tokens_shape"]))
            for name in ("prefill_k", "decode_k"):
                sh, shape = seen[name], seen[name + "_shape"]
                out[f"{key}_{name}_shape"] = list(shape)
                out[f"{key}_{name}_shard"] = list(sh.shard_shape(shape))
                out[f"{key}_{name}_ndev"] = len(sh.device_set)
    return out


def main() -> dict:
    import jax

    from cada_jax.models.decoder import forward, forward_jit, init_cache, positions_from_mask
    from cada_jax.sharding import (
        MeshConfig,
        ShardingError,
        batch_sharding,
        cache_shardings,
        make_mesh,
        mesh_from_config,
        named_sharding,
        param_shardings,
        shard_params,
    )

    def sharded_forward(cfg, mesh, with_cache=False):
        """`decoder.forward` jitted with the mesh rules' shardings: params by `param_shardings`,
        inputs and logits batch-sharded, a cache by `cache_shardings` (donated)."""
        p_sh, b_sh = param_shardings(cfg, mesh), batch_sharding(mesh)
        logits_sh = named_sharding(mesh, "act_batch", "act_seq", None)
        if not with_cache:
            return jax.jit(lambda p, t, pos, m: forward(p, t, pos, m, None, cfg=cfg)[0],
                           in_shardings=(p_sh, b_sh, b_sh, b_sh), out_shardings=logits_sh)
        c_sh = cache_shardings(cfg, mesh)
        return jax.jit(lambda p, t, pos, m, c: forward(p, t, pos, m, c, cfg=cfg),
                       in_shardings=(p_sh, b_sh, b_sh, b_sh, c_sh), out_shardings=(logits_sh, c_sh),
                       donate_argnums=(4,))

    assert jax.device_count() == 8, f"worker needs 8 devices, got {jax.device_count()}"
    res: dict = {"device_count": jax.device_count()}

    # --- forward parity on two meshes and two families
    tokens = np.random.default_rng(0).integers(0, 128, size=(8, 10)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :3] = 0
    mask[5, :6] = 0
    pos = np.asarray(positions_from_mask(mask))
    cases = (
        ("llama", MeshConfig(data=1, fsdp=4, tensor=2), {}),
        ("qwen3", MeshConfig(data=2, fsdp=2, tensor=2), {}),
        # tensor=4 does not divide the 2 KV heads: K/V replicated over tensor, query heads split.
        ("kvrep", MeshConfig(data=2, fsdp=1, tensor=4), dict(num_heads=8, num_kv_heads=2, head_dim=4)),
    )
    for fam, mc, extra in cases:
        cfg = tiny_cfg("llama" if fam == "kvrep" else fam, **extra)
        params = random_params(cfg, seed=7)
        want = np.asarray(forward_jit(params, tokens, pos, mask, cfg=cfg)[0])
        mesh = make_mesh(mc)
        sp = shard_params(params, param_shardings(cfg, mesh))
        fwd = sharded_forward(cfg, mesh)
        b = shard_params({"t": tokens, "p": pos, "m": mask}, batch_sharding(mesh))
        got = fwd(sp, b["t"], b["p"], b["m"])
        key = f"{fam}_d{mc.data}f{mc.fsdp}t{mc.tensor}"
        res[f"fwd_{key}_maxdiff"] = float(np.max(np.abs(np.asarray(got) - want)))
        res[f"fwd_{key}_logits_spec"] = str(got.sharding.spec)
        # bytes per device, from the arrays' own shards
        per_dev = per_device_param_bytes(sp)
        total = sum(int(np.asarray(x).nbytes) for x in jax.tree_util.tree_leaves(params))
        norms = sum(int(np.asarray(x).nbytes) for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if "norm" in jax.tree_util.keystr(p))
        res[f"bytes_{key}"] = {"per_device": sorted(per_dev.values()), "n_devices": len(per_dev), "total": total, "norms": norms}

    # --- prefill into a sharded, donated KV cache (data=2 x fsdp=2 x tensor=2)
    cfg = tiny_cfg("llama")
    params = random_params(cfg, seed=7)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    want_logits, want_cache = forward_jit(params, tokens, pos, mask, init_cache(cfg, 8, 16), cfg=cfg)
    fwd_c = sharded_forward(cfg, mesh, with_cache=True)
    cache = shard_params(init_cache(cfg, 8, 16), cache_shardings(cfg, mesh))
    sp = shard_params(params, param_shardings(cfg, mesh))
    b = shard_params({"t": tokens, "p": pos, "m": mask}, batch_sharding(mesh))
    got_logits, got_cache = fwd_c(sp, b["t"], b["p"], b["m"], cache)
    res["cache_logits_maxdiff"] = float(np.max(np.abs(np.asarray(got_logits) - np.asarray(want_logits))))
    res["cache_k_maxdiff"] = float(np.max(np.abs(np.asarray(got_cache["k"]) - np.asarray(want_cache["k"]))))
    k = got_cache["k"]
    res["cache_k_shape"] = list(k.shape)
    res["cache_k_shard_shape"] = list(k.sharding.shard_shape(k.shape))
    res["cache_donated"] = bool(cache["k"].is_deleted())
    res["cache_index"] = int(got_cache["index"])
    try:  # the trainers' mesh check of their batch size
        mesh_from_config(MeshConfig(data=2, fsdp=2, tensor=2), cfg, batch=6)
        res["bad_batch_error"] = None
    except ShardingError as e:
        res["bad_batch_error"] = str(e)

    # --- GRPO update on the mesh vs the unsharded reference
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sc = grpo_scenario(mesh, steps=2)
    state, losses, params0 = sc["state"], sc["losses"], sc["params0"]
    ref_params, ref_losses = reference_update(params0, sc["batch"], sc["cfg"], sc["loss_cfg"], steps=2)
    res["update_losses"] = losses
    res["update_ref_losses"] = ref_losses
    res["update_rel_delta_err"] = _rel_delta_err(params0, state.params, ref_params)
    res["update_param_maxdiff"] = _max_diff(state.params, ref_params)
    res["update_step"] = int(state.step)
    mu = state.opt_state[0].mu
    res["opt_mu_spec_matches_params"] = all(
        m.sharding.spec == p.sharding.spec
        for m, p in zip(jax.tree_util.tree_leaves(mu), jax.tree_util.tree_leaves(state.params))
    )
    res["opt_count_spec"] = str(state.opt_state[0].count.sharding.spec)

    res["update_checksum"] = checksum(state.params)

    # --- greedy sampling on two meshes vs one device (a GGUF-converted tiny model + real tokenizer)
    res["sampling"] = sampling_on_meshes([MeshConfig(data=1, fsdp=4, tensor=2), MeshConfig(data=2, fsdp=2, tensor=2)])

    # --- mesh that does not match the device count
    try:
        make_mesh(MeshConfig(data=3, fsdp=1, tensor=2))
        res["mesh_size_error"] = None
    except ShardingError as e:
        res["mesh_size_error"] = str(e)
    return res


if __name__ == "__main__":
    if "--xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
        sys.exit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    out = main()
    print("RESULT " + json.dumps(out), flush=True)
