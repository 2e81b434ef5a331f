"""`cada sft`: supervised fine-tuning (CADA's context distillation) on prompt/completion records.

    cada sft CONFIG.yaml [key=value ...]
    cada sft configs/smollm2_cpu.yaml sft.data=runs/smollm2_cpu/generate/chains.jsonl sft.steps=20

Runs (or resumes, from the newest checkpoint in the run directory) `cada_jax.training.sft.train_sft`,
exports the model to <run dir>/final and prints its summary as one JSON line (process 0 only in a
multi-host job; every process runs the same command, see launch/README.md).
`cada sft --describe` (or `cada config --describe`) lists every config key with its default.
"""

from __future__ import annotations

import json


def cmd_sft(args) -> int:
    from cada_jax.config import describe_text, load_config

    if args.describe:
        print(describe_text())
        return 0
    if not args.config:
        raise ValueError("cada sft: give a YAML config (cada sft CONFIG [key=value ...]); see cada sft --describe")
    from cada_jax.distributed import initialize_distributed, main_print

    initialize_distributed()  # joins a multi-host job (TPU pod, SLURM, CADA_COORDINATOR ...); no-op on one host
    from cada_jax.training.sft import train_sft

    summary = train_sft(load_config(args.config, args.overrides))
    main_print(json.dumps(summary, default=str))
    if summary.get("preempted"):
        from cada_jax.errors import EXIT_PREEMPTED

        main_print(f"cada sft: preempted at step {summary.get('steps')} after saving a checkpoint; rerun the same command to resume")
        return EXIT_PREEMPTED
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("sft", help="supervised fine-tuning / context distillation on prompt+completion records")
    p.add_argument("config", nargs="?", help="YAML config (sections run, model, optim, lora, checkpoint, mesh, sft)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sft.data=chains.jsonl sft.steps=20")
    p.add_argument("--describe", action="store_true", help="list every config key with its default and doc, then exit")
    p.set_defaults(fn=cmd_sft)
