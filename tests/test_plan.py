"""Tests for cada_jax/plan.py and `cada plan` (cada_jax/commands/plan.py).

The planning tests run `cada plan` itself (which starts its own child process with 8 host CPU
devices) on a 1.14 B-parameter Llama-shaped model (16 layers, hidden 2048, vocabulary 32000; its
config.json written here) sharded fsdp=8, and check the compiled programs' numbers against hand
arithmetic that does not use the plan's code: the update's arguments are the f32 weights and two
Adam moments split 8 ways plus the micro-batch, the reference pass costs 2 * (matmul weights) *
tokens plus the attention products, divided over 8 devices. A config that cannot fit (weights
replicated on 16 GiB chips) must say so and exit with status 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cada_jax.plan import CHIPS, GiB, PlanError, hlo_flops, resolve_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ~1 B Llama-like shapes (Llama-3.2-1B's width and depth, a 32k vocabulary, untied head)
V, D, I, L, H, K, HD = 32000, 2048, 8192, 16, 16, 8, 128
N_PROMPTS, GROUP, P_LEN, C_LEN = 8, 2, 96, 32  # one micro-batch: 8 prompts x 2 samples
FSDP = 8


def _write_model(tmp_path) -> str:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=L,
        num_attention_heads=H, num_key_value_heads=K, head_dim=HD, max_position_embeddings=4096,
        tie_word_embeddings=False, rms_norm_eps=1e-5)))
    return str(d)


def _write_config(tmp_path, model_dir: str, *, data: int, fsdp: int) -> str:
    path = tmp_path / f"plan_d{data}_f{fsdp}.yaml"
    path.write_text(f"""
model: {{path: {model_dir}, dtype: float32, param_dtype: float32, max_seq_len: {P_LEN + C_LEN}}}
mesh: {{data: {data}, fsdp: {fsdp}, tensor: 1}}
rl: {{prompts_per_step: {N_PROMPTS}, group_size: {GROUP}, max_new_tokens: {C_LEN}, beta: 0.04}}
pipeline: {{stages: [rl]}}
""")
    return str(path)


def _cada_plan(args, tmp_path, name: str):
    out = tmp_path / f"{name}.json"
    env = dict(os.environ)
    # Backend (LLVM) optimisation off: buffer assignment and the partitioned HLO are made before it,
    # so sizes and FLOPs are the same, and compiling is faster.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    proc = subprocess.run([sys.executable, "-m", "cada_jax.cli", "plan", *args, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    plan = json.loads(out.read_text()) if out.exists() else None
    return proc, plan


def _params_hand():
    """(sharded elements, replicated elements) of the model: every matrix splits its hidden axis
    over fsdp; the RMSNorm scales stay whole."""
    per_layer = D * H * HD + 2 * D * K * HD + H * HD * D + 3 * D * I
    matrices = V * D + L * per_layer + D * V
    norms = L * 2 * D + D
    return matrices, norms, per_layer


@pytest.fixture(scope="module")
def plan_1b(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("plan")
    cfg = _write_config(tmp_path, _write_model(tmp_path), data=1, fsdp=FSDP)
    proc, plan = _cada_plan([cfg, "--chip", "v5p", "--programs", "rl_update,rl_reference"], tmp_path, "plan_1b")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, plan


def test_update_arguments_are_params_and_adam_moments_split_over_fsdp(plan_1b):
    proc, plan = plan_1b
    matrices, norms, _ = _params_hand()
    assert plan["n_params"] == matrices + norms
    state = 3 * 4 * (matrices // FSDP + norms)  # f32 weights, Adam mu and nu
    B = N_PROMPTS * GROUP
    batch = 2 * (N_PROMPTS // FSDP) * P_LEN * 4 + 4 * (B // FSDP) * C_LEN * 4 + (B // FSDP) * 4
    update = plan["programs"]["rl_update"]
    arg = update["memory"]["argument"]
    assert abs(arg - (state + batch)) / (state + batch) < 0.01, (arg, state + batch)
    # The state is donated: it comes back in the same buffers.
    assert abs(update["memory"]["alias"] - state) / state < 0.01
    # While the update runs, the frozen reference (f32 weights, split 8 ways) is on the device too.
    assert abs(update["resident"]["reference"] - 4 * (matrices // FSDP + norms)) < 1024
    assert update["fits"] is True and plan["fits"] is True
    assert "rl_update" in proc.stdout and "fits" in proc.stdout


def test_reference_flops_are_two_per_weight_per_token(plan_1b):
    _, plan = plan_1b
    _, _, per_layer = _params_hand()
    B, Cm = N_PROMPTS * GROUP, C_LEN - 1
    tokens = N_PROMPTS * P_LEN + B * Cm  # prompts once per group, completions without their last token
    weights = 2 * tokens * L * per_layer + 2 * B * C_LEN * D * V  # layers + the head on the completion positions
    attention = 4 * L * H * HD * (N_PROMPTS * P_LEN * P_LEN + B * Cm * (P_LEN + Cm))  # QK^T and AV
    expected = (weights + attention) / FSDP
    ref = plan["programs"]["rl_reference"]
    assert abs(ref["flops"] - expected) / expected < 0.02, (ref["flops"], expected)
    assert ref["loops"] and all(n == L for n in ref["loops"])  # the scanned layers, counted 16 times
    # XLA's cost analysis counts the scanned layer once: far below the real figure.
    assert ref["xla_flops"] < 0.5 * ref["flops"]
    assert ref["seconds_at_peak"] == pytest.approx(ref["flops"] / CHIPS["v5p"].bf16_flops)


def test_too_big_for_the_chip_is_reported_and_exits_3(tmp_path):
    # data=8: every device holds all 1.14 B f32 weights (4.6 GB) for the reference pass, next to the
    # train state (weights + Adam moments, 13.7 GB): more than a v5e's 16 GiB.
    cfg = _write_config(tmp_path, _write_model(tmp_path), data=8, fsdp=1)
    proc, plan = _cada_plan([cfg, "--chip", "v5e", "--programs", "rl_reference"], tmp_path, "too_big")
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DOES NOT FIT" in proc.stdout and " NO " in proc.stdout
    assert plan["fits"] is False and plan["programs"]["rl_reference"]["fits"] is False
    assert plan["programs"]["rl_reference"]["peak"] > 16 * GiB


# ----------------------------------------------------------------------------- pieces, in process

_HLO = """HloModule m

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %w = f32[8,8]{1,0} constant({...})
  %d = f32[4,8]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %d)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%fused (a: f32[4,16], b: f32[16,8]) -> f32[4,8] {
  %a = f32[4,16]{1,0} parameter(0)
  %b = f32[16,8]{1,0} parameter(1)
  ROOT %d2 = f32[4,8]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: f32[4,16], w: f32[16,8]) -> f32[4,8] {
  %x = f32[4,16]{1,0} parameter(0)
  %w = f32[16,8]{1,0} parameter(1)
  %f = f32[4,8]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused
  %t = (s32[], f32[4,8]{1,0}) tuple(%z, %f)
  %l = (s32[], f32[4,8]{1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %u = (s32[], f32[4,8]{1,0}) while(%t), condition=%cond, body=%body
  ROOT %r = f32[4,8]{1,0} get-tuple-element(%l), index=1
}
"""


def test_hlo_flops_counts_fusions_once_and_loops_by_trip_count():
    out = hlo_flops(_HLO)
    fused = 2 * 4 * 8 * 16
    body = 2 * 4 * 8 * 8
    assert out["flops"] == fused + 5 * body + 1 * body  # unknown trip count: one iteration
    assert [lp["n"] for lp in out["loops"]] == [5, None]


def test_hlo_flops_matches_jax_on_an_unrolled_program():
    """A program without loops: our count equals XLA's own cost analysis of the matmuls."""
    import jax
    import jax.numpy as jnp

    def f(x, w1, w2):
        return jnp.tanh(x @ w1) @ w2

    args = (jnp.ones((32, 64)), jnp.ones((64, 128)), jnp.ones((128, 16)))
    compiled = jax.jit(f).lower(*args).compile()
    assert hlo_flops(compiled.as_text())["flops"] == 2 * 32 * 64 * 128 + 2 * 32 * 128 * 16

    def g(x, ws):
        return jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]

    compiled = jax.jit(g).lower(jnp.ones((8, 32)), jnp.ones((6, 32, 32))).compile()
    assert hlo_flops(compiled.as_text())["flops"] == 6 * 2 * 8 * 32 * 32


def test_model_config_resolution(tmp_path):
    name, cfg = resolve_model_config("llama3-8b", "unused")
    assert (name, cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads) == ("llama3-8b", 32, 4096, 8)
    _, q = resolve_model_config("qwen2.5-7b", "unused")
    assert q.attention_bias and q.vocab_size == 152064
    d = _write_model(tmp_path)
    assert resolve_model_config(None, d)[1].hidden_size == D
    assert resolve_model_config(os.path.join(d, "config.json"), "x")[1].num_layers == L
    with pytest.raises(PlanError, match="--model-config"):
        resolve_model_config(None, "/nonexistent/Meta-Llama-3-8B-Instruct")
