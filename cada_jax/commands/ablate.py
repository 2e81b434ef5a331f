"""`cada ablate`: the paper's ablation table (none / code / simple / cases prompting, trained runs).

    cada ablate --model smollm2-135m-instruct --limit 10 --attack none --attack role_play
    cada ablate --model M --trained cada=runs/pipeline-1 --trained da=runs/pipeline-2 --out runs/abl
    cada ablate --train configs/ablation_cpu.yaml [--set key=value ...] [--variants none cases]

With --train, each variant is trained (generate -> SFT -> RL -> eval) from the config, in
<out>/<variant>/, and the trained variants are compared with paired tests (`cada.reproduce`).

Writes <out>/<run>/{results.jsonl,summary.json}, <out>/ablation.json, report.md and report.html;
prints the table.
"""

from __future__ import annotations

from pathlib import Path

from cada_jax.commands.eval import (
    add_eval_args,
    attacks_from_args,
    check_judge_args,
    default_out,
    judge_from_args,
    records_from_args,
    sampling_from_args,
    spec_from_args,
    spec_section_from_args,
)


def _trained(specs) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--trained {spec!r}: write NAME=DIR, e.g. --trained cada=runs/pipeline-1")
        if name.strip() in out:
            raise ValueError(f"--trained {spec!r}: the name {name.strip()!r} is used twice; give each run its own name")
        out[name.strip()] = path.strip()
    return out


def cmd_ablate_train(args) -> int:
    from cada_jax.cada.reproduce import train_ablation
    from cada_jax.config import load_config

    cfg = load_config(args.train, list(args.set or []))
    result = train_ablation(cfg, args.variants, out_dir=args.out, verbose=not args.quiet)
    for p in result["files"].values():
        print(f"wrote {p}")
    print(f"{result['seconds']['total']:.0f} s in all ({', '.join(f'{v} {t:.0f} s' for v, t in result['seconds'].items() if v != 'total')})")
    return 0


def cmd_ablate(args) -> int:
    from cada_jax.eval.ablation import DEFAULT_ABLATION_ATTACKS, ablate
    from cada_jax.eval.suites import check_variant

    if args.train:
        return cmd_ablate_train(args)
    if args.set:
        raise ValueError("--set overrides a --train config; without --train, use the eval options")

    variants = tuple(args.variants)
    for v in variants:
        check_variant(v)
    attacks = attacks_from_args(args) if args.attack else DEFAULT_ABLATION_ATTACKS
    sp = sampling_from_args(args)
    check_judge_args(args)
    trained = _trained(args.trained)
    # the prompted model embeds for embedding/hybrid retrieval unless --embedder names another (loaded when first needed)
    spec = spec_from_args(spec_section_from_args(args), stage_model_path=args.model, dtype=args.dtype)
    records = records_from_args(args, allow_prompts=False)
    out = Path(args.out) if args.out else default_out("ablate", args)
    judge = judge_from_args(args, batch_size=args.batch_size)
    try:
        result = ablate(
            args.model, variants, args.limit, trained, attacks=attacks, records=records, judge=judge, sampling=sp,
            batch_size=args.batch_size, max_seq_len=args.max_seq_len, dtype=args.dtype, k=args.k, spec=spec,
            attack_benign=args.attack_benign, out_dir=out, seed=args.seed, progress=not args.quiet,
        )
    finally:
        close = getattr(judge, "close", None)
        if callable(close):
            close()
    for p in result["files"].values():
        print(f"wrote {p}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ablate", help="compare the none/code/simple/cases prompt variants (and trained runs) in one table",
        description="The paper's ablation: harmfulness, robustness (worst attack), over-refusal and utility.",
    )
    add_eval_args(p, variant=False)
    p.add_argument("--variants", nargs="+", default=["none", "code", "simple", "cases"],
                   help="prompt variants to compare (default: all four)")
    p.add_argument("--trained", action="append", default=[], metavar="NAME=DIR",
                   help="a trained model (pipeline run dir or exported HF dir), evaluated with the plain prompt (repeatable)")
    p.add_argument("--out", default=None, help="output folder (default runs/ablate-<model>-<time>; with --train <run.out_dir>/<run.name>-ablation)")
    p.add_argument("--train", default=None, metavar="CONFIG",
                   help="train each variant from this pipeline config (generate -> SFT -> RL -> eval) and compare the trained models")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --train: a config override (repeatable), e.g. --set rl.steps=4")
    p.set_defaults(fn=cmd_ablate)
