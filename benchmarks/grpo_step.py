"""One end-to-end GRPO step (sampling + reference log-probs + one update): cada_jax vs TRL GRPOTrainer.

    python benchmarks/grpo_step.py [--steps 3] [--prompts 4] [--group 4] [--new-tokens 64] [--no-trl]
                                   [--interleave [--same-process]] [--device cuda]

--device cuda runs TRL on the GPU (use_cpu=False; cada_jax uses jax's default backend either way),
synchronizes CUDA at the end of each TRL step and adds each engine's peak GPU memory to the JSON.
Run it with XLA_PYTHON_CLIENT_PREALLOCATE=false so both fit on one GPU.

SmolLM2-135M-Instruct (the bundled GGUF converted once, loaded from the same HF directory by both),
CPU, float32, full fine-tuning with AdamW. Both sides use the same settings: 4 prompts x 4 samples,
64 new tokens (EOS ignored / suppressed, so every completion has exactly 64 tokens), temperature 1,
beta 0.04 (a frozen reference model), one optimizer update per sampled batch, no gradient
checkpointing / remat, the same reward function (`target_token_share` from cada_jax's registry,
which TRL calls unchanged with its `completion_ids` and the `target_id` dataset column).

Step time = wall clock of one full step (cada: `GRPOTrainer.train_step`; TRL: on_step_begin ->
on_step_end, which encloses generation, rewards, reference log-probs, backward and the optimizer).
One warm-up step each (compilation), then the median of --steps steps. By default the engines run
one after the other in the same run: cada's steps here, then TRL's in a child process. With
--interleave they alternate (one TRL step, then one cada step while TRL waits, ...), so both see the
same background load, but on this VM whichever engine runs right after the other's training steps
is slowed: cada's update took 7.8-8.5 s per step alone, after 25 s idle or after 25 s of numpy
matmuls, and 10-12 s right after torch training steps (in the same process or in another one; not
from spinning threads). --same-process puts the interleaved TRL in this process. The load average is
printed with every step, and TRL's own phase timers (generation, log-probs, ...) are collected. The
last line is JSON:
{cada_step_s, trl_step_s, ratio = trl / cada, cada_sampling_s, cada_reference_s, cada_update_s, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.sampler import PROMPTS  # noqa: E402  (the same prompts as the sampler benchmark)


def _records(n: int, target_id: int) -> list[dict]:
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "target_id": target_id} for i in range(n)]


def make_cada(model_dir: str, args, target_id: int, out_dir: str):
    from cada_jax.config import load_config
    from cada_jax.training.grpo import GRPOTrainer

    steps = 2 * (args.steps + 1)
    overrides = [
        f"model.path={model_dir}", "model.dtype=float32", "model.param_dtype=float32", "model.remat=none",
        f"run.out_dir={out_dir}", "run.name=cada", "run.progress=false", "run.seed=0",
        f"rl.steps={steps}", f"rl.prompts_per_step={args.prompts}", f"rl.group_size={args.group}",
        f"rl.max_new_tokens={args.new_tokens}", "rl.temperature=1.0", "rl.beta=0.04", "rl.mu=1",
        "rl.minibatch_size=0", "rl.ignore_eos=true", "rl.loss=grpo",
        "rl.rewards=[{name: target_token_share, weight: 1.0}]",
        "optim.lr=1e-6", "optim.schedule=constant", "optim.weight_decay=0.0", "optim.max_grad_norm=1.0",
        "checkpoint.every_steps=1000000", "checkpoint.async_save=false",
    ]
    return GRPOTrainer(load_config(None, overrides), records=_records(args.prompts * steps, target_id), model_dir=model_dir)


def cada_step(trainer, label: str) -> dict:
    m = trainer.train_step()
    print(f"cada {label}: {m['step_s']:.2f}s (sampling {m['sampling_s']:.2f}, reward {m['reward_s']:.3f}, "
          f"reference {m['reference_s']:.2f}, update {m['update_s']:.2f}) tokens {m['sampled_tokens']} "
          f"reward {m['reward_mean']:.4f} kl {m.get('kl', 0):.2e} load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    return m


MARK = "@@grpo_bench@@ "  # prefixes the TRL worker's protocol lines on its stdout


def run_trl_interleaved(model_dir: str, args, target_id: int, out_dir: str, cada, turn=None) -> tuple[dict, list[dict]]:
    """TRL's GRPOTrainer for 1 + args.steps steps; after each of its steps (outside the timed
    region) one cada step runs, when `cada` is given, so both see the same machine load. `turn(i)`,
    when given, is called there instead (the worker process hands the turn to its parent)."""
    import torch
    import trl.extras.profiling as trl_profiling
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from cada_jax.rewards.functions import target_token_share

    phases: list[dict] = []

    def record(self, duration):  # TRL's own per-phase timers (generation, log-probs, ...)
        phases[-1][self.name.split(".", 1)[-1]] = phases[-1].get(self.name.split(".", 1)[-1], 0.0) + duration

    trl_profiling.ProfilingContext._log_metrics = record
    cada_rows: list[dict] = []

    class Interleave(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args_, state, control, **kw):
            phases.append({})
            self._t = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t)
            shown = ", ".join(f"{k} {v:.2f}" for k, v in sorted(phases[-1].items()))
            print(f"trl step {len(self.times) - 1}: {self.times[-1]:.2f}s ({shown}) load {os.getloadavg()[0]:.2f}",
                  file=sys.stderr)
            if cada is not None:
                cada_rows.append(cada_step(cada, f"step (after trl step {len(self.times) - 1})"))
            if turn is not None:
                turn(len(self.times) - 1)

    n = args.prompts * (args.steps + 1)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "target_id": r["target_id"]}
                            for r in _records(n, target_id)])
    config = GRPOConfig(
        output_dir=os.path.join(out_dir, "trl"), max_steps=args.steps + 1, per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group, gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=args.new_tokens, generation_kwargs={"min_new_tokens": args.new_tokens},
        temperature=1.0, top_p=1.0, top_k=0, beta=0.04, loss_type="grpo", learning_rate=1e-6, weight_decay=0.0,
        max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0, use_cpu=args.device == "cpu", bf16=False, fp16=False,
        gradient_checkpointing=False, save_strategy="no", report_to="none", logging_steps=1, shuffle_dataset=False,
        disable_dropout=True, seed=0, model_init_kwargs={"dtype": torch.float32},
    )
    timer = Interleave()
    trainer = GRPOTrainer(model=model_dir, reward_funcs=[target_token_share], args=config, train_dataset=ds,
                          callbacks=[timer])
    trainer.train()
    timed_phases = phases[1:]
    out = {"trl_step_s": statistics.median(timer.times[1:]), "trl_warmup_step_s": timer.times[0],
           "torch_threads": torch.get_num_threads()}
    if args.device == "cuda":
        out["trl_peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["gpu"] = torch.cuda.get_device_name(0)
    for k in sorted({k for p in timed_phases for k in p}):
        out[f"trl_{k}_s"] = statistics.median(p.get(k, 0.0) for p in timed_phases)
    return out, cada_rows


def trl_worker(model_dir: str, args, target_id: int, out_dir: str) -> None:
    """The TRL side in its own process: after each TRL step it prints a STEP line and waits for
    its parent's go-ahead on stdin, then prints its RESULT line at the end."""

    def turn(i):
        print(f"{MARK}STEP {i}", flush=True)
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("the parent benchmark stopped")

    result, _ = run_trl_interleaved(model_dir, args, target_id, out_dir, None, turn)
    print(f"{MARK}RESULT {json.dumps(result)}", flush=True)


def run_trl_in_child(args, cada) -> tuple[dict, list[dict]]:
    """TRL in a child process. With a `cada` trainer the two alternate: after each TRL step (outside
    its timed region) the child waits while one cada step runs here. Without one, TRL runs its
    steps back to back."""
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--trl-worker", "--steps", str(args.steps), "--prompts",
           str(args.prompts), "--group", str(args.group), "--new-tokens", str(args.new_tokens), "--model", args.model,
           "--device", args.device]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rows, result = [], None
    try:
        for line in child.stdout:
            if not line.startswith(MARK):
                sys.stderr.write(line)
                continue
            kind, _, rest = line[len(MARK):].strip().partition(" ")
            if kind == "STEP":
                if cada is not None:
                    rows.append(cada_step(cada, f"step (after trl step {rest})"))
                child.stdin.write("go\n")
                child.stdin.flush()
            elif kind == "RESULT":
                result = json.loads(rest)
    finally:
        if child.stdin:
            child.stdin.close()
        rc = child.wait()
    if rc != 0 or result is None:
        raise SystemExit(f"the TRL worker failed (exit code {rc}); its output is above")
    return result, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (median reported)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL side")
    ap.add_argument("--interleave", action="store_true",
                    help="alternate TRL steps (in a child process) with cada steps instead of running all cada "
                         "steps first, then all TRL steps")
    ap.add_argument("--same-process", action="store_true",
                    help="with --interleave: run TRL in this process, not in a child")
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where TRL runs (default cpu); cada_jax uses jax's default backend")
    args = ap.parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    if args.same_process and not args.interleave:
        raise SystemExit("--same-process only applies with --interleave (the default runs TRL after cada, in a child)")

    from cada_jax.checkpoints.gguf_import import resolve_model
    from cada_jax.tokenizer import Tokenizer

    model_dir = resolve_model(args.model)
    # the reward's target: the token of " the", common in English completions
    target_id = Tokenizer(model_dir).encode(" the")[0]
    if args.trl_worker:
        with tempfile.TemporaryDirectory(prefix="grpo_bench_trl_") as out_dir:
            trl_worker(model_dir, args, target_id, out_dir)
        return 0
    load_before = os.getloadavg()[0]
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="grpo_bench_") as out_dir:
        t0 = time.perf_counter()
        cada = make_cada(model_dir, args, target_id, out_dir)
        result["cada_init_s"] = time.perf_counter() - t0
        result["cada_warmup_step_s"] = cada_step(cada, "warm-up step")["step_s"]
        if args.no_trl:
            rows = [cada_step(cada, f"step {i + 1}") for i in range(args.steps)]
        elif not args.interleave:
            rows = [cada_step(cada, f"step {i + 1}") for i in range(args.steps)]
            trl_result, _ = run_trl_in_child(args, None)
            result.update(trl_result)
        else:
            if args.same_process:
                trl_result, rows = run_trl_interleaved(model_dir, args, target_id, out_dir, cada)
            else:
                trl_result, rows = run_trl_in_child(args, cada)
            rows = rows[1:]  # the one after TRL's warm-up step is not paired with a timed TRL step
            result.update(trl_result)
        cada.ckpt.close()
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    result.update(cada_step_s=med("step_s"), cada_sampling_s=med("sampling_s"), cada_reward_s=med("reward_s"),
                  cada_reference_s=med("reference_s"), cada_update_s=med("update_s"),
                  cada_tokens_per_step=rows[-1]["sampled_tokens"])
    if "trl_step_s" in result:
        result["ratio"] = result["trl_step_s"] / result["cada_step_s"]
    if args.device == "cuda":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            result["cada_peak_gpu_mb"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
        result.update(jax=jax.__version__, jax_backend=jax.default_backend())
    result.update(order="cada only" if args.no_trl else ("interleaved" if args.interleave else "cada, then trl"),
                  trl_process="none" if args.no_trl else ("same" if args.interleave and args.same_process else "child"),
                  load_avg_before=load_before, load_avg_after=os.getloadavg()[0], cpus=os.cpu_count(),
                  prompts=args.prompts, group=args.group, new_tokens=args.new_tokens, steps=args.steps)
    keys = ["cada_step_s", "trl_step_s", "ratio", "cada_sampling_s", "cada_reference_s", "cada_update_s"]
    ordered = {k: result[k] for k in keys if k in result}
    ordered.update({k: v for k, v in result.items() if k not in ordered})
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in ordered.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
