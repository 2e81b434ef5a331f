"""The trainers on a device mesh, for tests/test_sharding.py: run in a subprocess because JAX fixes
its device count at start.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.trainer_worker OUT MODEL_DIR mesh
    XLA_FLAGS=--xla_force_host_platform_device_count=1 python -m tests.trainer_worker OUT MODEL_DIR single

runs, through the real entry points (`GRPOTrainer(...).train()`, `train_sft`), a GRPO run with a
KL reference and two micro-batches per step, a full SFT run and a LoRA SFT run. With ``mesh`` they
run on fsdp=4 x tensor=2 (GRPO, LoRA SFT) and data=2 x fsdp=2 x tensor=2 (SFT); with ``single``
on the default mesh of one device. Each run exports its model under OUT; the worker prints
``RESULT {json}`` with the per-step metrics and, on the mesh, where the trainer's arrays live. The
test compares the two workers' exports and metrics. `grpo_overrides` / `sft_overrides` /
`sft_records` are shared with tests/multihost_trainer_worker.py, and the training-loop hooks
`sigterm_after` / `pause_after` with the tests that interrupt a run in a subprocess.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

PROMPTS = ["abc", "hello there", "the cat", "xyz", "in a box", "one two", "red", "go home"]
GRPO_RECORDS = [{"prompt": p} for p in PROMPTS]
MESHES = {
    "single": [],
    "f4t2": ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"],
    "d2f2t2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
}
TIMING = ("sampling_s", "reward_s", "reference_s", "update_s", "step_s", "tokens_per_s", "eval_s")


def grpo_overrides(model_dir: str, out_dir: str, name: str, steps: int, mesh: str, extra=()) -> list[str]:
    """4 prompts x 4 samples, 8 new tokens, beta 0.04 (a reference), two micro-batches of 8 rows."""
    return [f"model.path={model_dir}", f"run.out_dir={out_dir}", f"run.name={name}", "run.progress=false",
            "model.max_seq_len=128", f"rl.steps={steps}", "rl.prompts_per_step=4", "rl.group_size=4",
            "rl.max_new_tokens=8", "rl.beta=0.04", "rl.minibatch_size=8",
            "rl.rewards=[{name: 'tests.trainer_worker:odd_token_share', weight: 1.0}]", "optim.lr=1e-3", "optim.schedule=constant",
            "checkpoint.every_steps=1", *MESHES[mesh], *extra]


def sft_overrides(model_dir: str, out_dir: str, name: str, steps: int, mesh: str, extra=()) -> list[str]:
    return [f"model.path={model_dir}", f"run.out_dir={out_dir}", f"run.name={name}", "run.progress=false",
            "sft.batch_size=4", "sft.max_len=128", "sft.length_buckets=[64, 128]", f"sft.steps={steps}",
            "optim.lr=1e-3", "optim.schedule=constant", "checkpoint.every_steps=1", *MESHES[mesh], *extra]


def odd_token_share(prompts, completions, completion_ids, **_) -> list[float]:
    """Share of a completion's tokens with an odd id: a reward every group has signal for."""
    return [sum(t % 2 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def sigterm_after(step: int):
    """A training-loop hook: this process sends itself SIGTERM right after `step` (and its
    checkpoint), which the loop's PreemptionGuard turns into "save and return": a deterministic
    preemption."""
    def hook(loop):
        if loop.step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def pause_after(step: int, timeout_s: float = 120.0):
    """A training-loop hook: after `step` write ``<run>/.paused_at_step_<step>`` and wait at the step
    boundary until a signal reaches the loop's PreemptionGuard (sent by the test)."""
    def hook(loop):
        if loop.step != step:
            return
        with open(os.path.join(loop.run_dir, f".paused_at_step_{step}"), "w") as f:
            f.write(str(os.getpid()))
        deadline = time.monotonic() + timeout_s
        while not loop.guard.triggered:
            if time.monotonic() > deadline:
                raise RuntimeError(f"paused after step {step}: no signal arrived within {timeout_s:.0f} s")
            time.sleep(0.005)

    return hook


LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8", "lora.targets=[q_proj, v_proj, down_proj]"]


def sft_records(n: int = 12, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "red", "box", "hat", "run", "sky"]
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    return [{"prompt": say(2), "completion": say(3)} for _ in range(n)]


def metrics_rows(run_dir: str) -> list[dict]:
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def main(out: str, model_dir: str, kind: str) -> dict:
    import jax
    import numpy as np

    from cada_jax.config import load_config
    from cada_jax.training.grpo import GRPOTrainer
    from cada_jax.training.sft import train_sft
    from tests.mesh_worker import per_device_param_bytes

    grpo_mesh, sft_mesh, lora_mesh = ("f4t2", "d2f2t2", "f4t2") if kind == "mesh" else ("single",) * 3
    res: dict = {"devices": jax.device_count()}

    tr = GRPOTrainer(load_config(None, grpo_overrides(model_dir, out, "grpo", 2, grpo_mesh)), records=GRPO_RECORDS)
    summary = tr.train()
    res["grpo"] = {"export": summary["export_dir"], "metrics": metrics_rows(summary["run_dir"]),
                   "mesh": dict(tr.mesh.shape)}
    if kind == "mesh":
        p = tr.state.params
        mu = next(n.mu for n in jax.tree_util.tree_leaves(tr.state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
                  if hasattr(n, "mu"))  # Adam's first moment, wherever optax nests it
        res["grpo"]["q_proj_spec"] = str(p["layers"]["attn"]["q_proj"].sharding.spec)
        res["grpo"]["mu_q_proj_spec"] = str(mu["layers"]["attn"]["q_proj"].sharding.spec)
        res["grpo"]["ref_q_proj_spec"] = str(tr.reference["layers"]["attn"]["q_proj"].sharding.spec)
        per_dev = per_device_param_bytes(p)
        total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(p))
        res["grpo"]["param_bytes"] = {"per_device": sorted(per_dev.values()), "total": total}

    if kind == "mesh":  # configs that do not fit 8 devices or this model: one-line errors before any work
        res["errors"] = errors = {}
        bad = {
            "size": lambda: train_sft(load_config(None, sft_overrides(
                model_dir, out, "bad", 1, "single", ["mesh.data=3", "mesh.tensor=2"])), sft_records()),
            "heads": lambda: train_sft(load_config(None, sft_overrides(
                model_dir, out, "bad", 1, "single", ["mesh.data=1", "mesh.tensor=8"])), sft_records()),
            "sft_batch": lambda: train_sft(load_config(None, sft_overrides(
                model_dir, out, "bad", 1, "d2f2t2", ["sft.batch_size=6"])), sft_records()),
            "rl_minibatch": lambda: GRPOTrainer(load_config(None, grpo_overrides(
                model_dir, out, "bad", 1, "d2f2t2", ["rl.minibatch_size=0", "rl.prompts_per_step=3", "rl.group_size=2"])),
                records=GRPO_RECORDS),
        }
        for name, fn in bad.items():
            try:
                fn()
                errors[name] = None
            except ValueError as e:  # ShardingError and ConfigError are ValueErrors
                errors[name] = str(e)

    s = train_sft(load_config(None, sft_overrides(model_dir, out, "sft", 3, sft_mesh)), sft_records())
    res["sft"] = {"export": s["export_dir"], "metrics": metrics_rows(s["run_dir"]), "lengths": s["padded_lengths"]}
    s = train_sft(load_config(None, sft_overrides(model_dir, out, "lora", 3, lora_mesh, LORA)), sft_records())
    res["lora"] = {"export": s["export_dir"], "metrics": metrics_rows(s["run_dir"])}
    return res


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[3] not in ("mesh", "single"):
        sys.exit("usage: python -m tests.trainer_worker OUT_DIR MODEL_DIR mesh|single")
    out = main(*sys.argv[1:])
    print("RESULT " + json.dumps(out), flush=True)
