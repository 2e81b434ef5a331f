"""`cada rl`: GRPO-family reinforcement learning on a prompt set.

    cada rl CONFIG.yaml [key=value ...]
    cada rl configs/rl.yaml rl.data=prompts.jsonl rl.rewards='[{name: my_rewards:score, weight: 1.0}]'

Runs (or resumes, from the newest checkpoint in the run directory) `cada_jax.training.grpo.train_grpo`
with CADA's rewards (`cada_safety`, `cada_format`, `cada_chain`, ...) registered by name,
and prints its summary as one JSON line (process 0 only in a multi-host job; every process runs the
same command, see launch/README.md). `cada rl --describe` (or `cada config --describe`) lists every config key with its
default.
"""

from __future__ import annotations

import json


def cmd_rl(args) -> int:
    from cada_jax.config import describe_text, load_config

    if args.describe:
        print(describe_text())
        return 0
    if not args.config:
        raise ValueError("cada rl: give a YAML config (cada rl CONFIG [key=value ...]); see cada rl --describe")
    from cada_jax.distributed import initialize_distributed, main_print

    initialize_distributed()  # joins a multi-host job (TPU pod, SLURM, CADA_COORDINATOR ...); no-op on one host
    import cada_jax.cada.rewards  # noqa: F401  (CADA's rewards, cada_safety ..., can be named in rl.rewards)
    from cada_jax.training.grpo import train_grpo

    cfg = load_config(args.config, args.overrides)
    summary = train_grpo(cfg)
    main_print(json.dumps(summary))
    if summary.get("preempted"):
        from cada_jax.errors import EXIT_PREEMPTED

        main_print(f"cada rl: preempted at step {summary.get('steps')} after saving a checkpoint; rerun the same command to resume")
        return EXIT_PREEMPTED
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("rl", help="GRPO-family RL (sample groups, score with reward functions, update)")
    p.add_argument("config", nargs="?", help="YAML config (sections run, model, optim, lora, checkpoint, mesh, rl)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. rl.steps=50 optim.lr=1e-6")
    p.add_argument("--describe", action="store_true", help="list every config key with its default and doc, then exit")
    p.set_defaults(fn=cmd_rl)
