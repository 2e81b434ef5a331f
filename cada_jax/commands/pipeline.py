"""`cada pipeline CONFIG [key=value ...]` and `cada generate CONFIG [key=value ...]`."""

from __future__ import annotations

import json
import os


def _config(args):
    from cada_jax.config import load_config

    if not args.config:
        raise ValueError(f"cada {args.command}: give a YAML config (cada {args.command} CONFIG [key=value ...]); see cada {args.command} --describe")
    return load_config(args.config, args.overrides)


def _describe() -> int:
    from cada_jax.config import describe_text

    print(describe_text())
    return 0


def cmd_pipeline(args) -> int:
    if args.describe:
        return _describe()
    from cada_jax.cada.pipeline import run_pipeline
    from cada_jax.distributed import initialize_distributed, main_print

    cfg = _config(args)
    initialize_distributed()
    result = run_pipeline(cfg)
    if "table" in result:
        main_print(f"\nBefore / after (held-out {cfg.eval.suite} test sets, greedy, {cfg.eval.judge} judge on the final answer):")
        main_print(result["table"])
    main_print(f"\nrun directory: {result['run_dir']}\nfinal model:   {result['final']}")
    report = result.get("report")
    if isinstance(report, dict):
        main_print(f"report:        {report.get('html')} (and report.md, plots/)")
    elif report:
        main_print(f"report:        {report}")
    main_print(f"total time:    {result['seconds']:.0f}s")
    return 0


def cmd_generate(args) -> int:
    import dataclasses

    if args.describe:
        return _describe()
    from cada_jax.cada.pipeline import run_pipeline

    cfg = _config(args)
    cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, stages=("generate",)))
    result = run_pipeline(cfg)
    path = os.path.join(result["run_dir"], "generate", "stats.json")
    with open(path) as f:
        print(json.dumps(json.load(f), indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="run generate -> sft -> rl -> eval into runs/<name>/")
    p.add_argument("config", nargs="?", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rl.steps=4")
    p.add_argument("--describe", action="store_true", help="list every config key with its default and doc, then exit")
    p.set_defaults(fn=cmd_pipeline)

    p = sub.add_parser("generate", help="CADA stage 1: self-generate judge-filtered reasoning chains")
    p.add_argument("config", nargs="?", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. generate.variant=simple")
    p.add_argument("--describe", action="store_true", help="list every config key with its default and doc, then exit")
    p.set_defaults(fn=cmd_generate)
