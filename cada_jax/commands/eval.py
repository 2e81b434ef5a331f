"""`cada eval`: safety / over-refusal / utility evaluation of one model, with a report.

    cada eval --model M --suite builtin [--attack none --attack role_play] [--variant cases] --out DIR
    cada eval --model M --suite xstest --data xstest_prompts.csv --judge llm --judge-model JUDGE_DIR
    cada eval --model M --prompts my.jsonl --label harmful [--field text] [--attack base64]

Writes results.jsonl, summary.json, report.md and report.html into --out; prints the summary table.
The helpers below (`add_eval_args`, `judge_from_args`, `sampling_from_args`) are shared with
`cada ablate`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_eval_args(p: argparse.ArgumentParser, *, variant: bool = True) -> None:
    """Options common to `cada eval` and `cada ablate`: data, attacks, judge, sampling."""
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"HF directory or '{DEFAULT_MODEL}' (default)")
    p.add_argument("--suite", default=None, help="builtin (default) or a benchmark loader name (strongreject, xstest, ...)")
    p.add_argument("--data", default=None, help="local file for a loader suite (else its hub copy is tried)")
    p.add_argument("--split", default=None, help="suite split (builtin: test|train; loaders: see cada_jax.data.loaders)")
    p.add_argument("--utility", action="append", default=[], metavar="NAME=PATH",
                   help="add a utility set, gsm8k=FILE or mmlu=FILE (repeatable)")
    if variant:
        p.add_argument("--variant", default="none", help="prompt variant: none|code|simple|cases (default none)")
    p.add_argument("--attack", action="append", default=None, metavar="NAME",
                   help="jailbreak transform applied to harmful prompts (repeatable; 'all' = every one; "
                        "default: none for eval; none, refusal_suppression, role_play for ablate)")
    p.add_argument("--attack-benign", action="store_true", help="apply the attacks to benign prompts too")
    p.add_argument("--judge", default="rule", help="rule (default) | llm | http")
    p.add_argument("--judge-model", default=None,
                   help="llm: judge model directory or name (default: the evaluated model); http: served model name")
    p.add_argument("--judge-url", default=None, help="http: base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-max-new-tokens", type=int, default=160, help="llm judge: tokens per rubric reply")
    p.add_argument("--limit", type=int, default=None, help="first N prompts (builtin: N per set)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--k", type=int, default=3, help="precedents shown by the cases variant")
    p.add_argument("--spec-dir", default="", help="spec directory (statutes.yaml, extensive_code.yaml, precedents.jsonl, "
                                                  "categories.yaml) shown by the code/simple/cases variants; default: the shipped one")
    p.add_argument("--retrieval", default="bm25", help="how the cases variant ranks precedents: bm25 (default) | embedding | hybrid")
    p.add_argument("--embedder", default="", help="embedding/hybrid: model directory or 'smollm2-135m-instruct' whose "
                                                  "hidden states embed texts (default: the evaluated model)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def attacks_from_args(args) -> tuple[str, ...]:
    from cada_jax.data.attacks import available_attacks, get_attack

    names = args.attack or ["none"]
    if "all" in names:
        return tuple(["none"] + [a for a in available_attacks() if a != "none"])
    out: list[str] = []
    for a in names:
        get_attack(a)  # "unknown attack ...; available: ..."
        if a not in out:
            out.append(a)
    return tuple(out)


def records_from_args(args, *, allow_prompts: bool = True):
    """The PromptRecords named by --suite/--data or --prompts/--label (+ --utility sets)."""
    from cada_jax.eval.suites import load_suite, load_utility

    prompts = getattr(args, "prompts", None) if allow_prompts else None
    if prompts is not None:
        if args.suite is not None or args.data is not None:
            raise ValueError("give either --prompts FILE --label L or --suite NAME [--data PATH], not both")
        if getattr(args, "label", None) is None:
            raise ValueError("--prompts needs --label harmful or --label benign")
        from cada_jax.data.readers import load_prompt_file

        records = load_prompt_file(prompts, label=args.label, field=args.field, limit=args.limit,
                                   category_field=getattr(args, "category_field", None))
        if not records:
            raise ValueError(f"{prompts}: no prompts found; write one prompt per record")
    else:
        records = load_suite(args.suite or "builtin", args.data, limit=args.limit, split=args.split)
    for spec in args.utility:
        records = records + load_utility(spec, limit=args.limit)
    return records


def sampling_from_args(args):
    from cada_jax.eval.runner import DEFAULT_SAMPLING
    from cada_jax.sampling import SamplingParams

    _positive("--max-new-tokens", args.max_new_tokens)
    _positive("--batch-size", args.batch_size)
    _positive("--limit", args.limit)
    sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                        stop_strings=DEFAULT_SAMPLING.stop_strings)
    sp.validate()
    return sp


def check_judge_args(args) -> None:
    """Validate judge options before any model is loaded."""
    from cada_jax.rewards.judges import available_judges

    if args.judge not in available_judges():
        raise ValueError(f"unknown judge {args.judge!r}; use one of {', '.join(available_judges())}")
    if args.judge == "http" and (not args.judge_url or not args.judge_model):
        raise ValueError("--judge http needs --judge-url URL and --judge-model NAME (the served model)")


def judge_from_args(args, *, batch_size: int):
    from cada_jax.rewards.build import local_llm_judge
    from cada_jax.rewards.judges import make_judge

    check_judge_args(args)
    if args.judge == "llm":
        return local_llm_judge(args.judge_model or args.model, batch_size=batch_size,
                               max_new_tokens=args.judge_max_new_tokens, dtype=args.dtype)
    if args.judge == "http":
        return make_judge("http", base_url=args.judge_url, model=args.judge_model)
    return make_judge(args.judge)


def spec_section_from_args(args):
    """The `spec` config section named by --spec-dir / --retrieval / --embedder, checked (the spec
    files are loaded) before any model is."""
    import dataclasses

    from cada_jax.cada.spec_config import check_spec_section
    from cada_jax.config import ConfigError, SpecSection

    if args.retrieval not in ("bm25", "embedding", "hybrid"):
        raise ConfigError(f"--retrieval {args.retrieval!r}: use bm25, embedding or hybrid")
    section = dataclasses.replace(SpecSection(), dir=args.spec_dir, retrieval=args.retrieval, embedder=args.embedder)
    check_spec_section(section)
    return section


def spec_from_args(section, *, stage_model=None, stage_model_path=None, dtype=None):
    """The spec to prompt with; precedent embeddings are cached in the user's cache folder."""
    from cada_jax.cada.spec_config import configured_spec, default_cache_dir

    return configured_spec(section, stage_model=stage_model, stage_model_path=stage_model_path,
                           cache_dir=default_cache_dir(), dtype=dtype)


def default_out(kind: str, args) -> Path:
    name = Path(str(args.model).rstrip("/")).name or "model"
    return Path("runs") / f"{kind}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_eval(args) -> int:
    from cada_jax.checkpoints.load import load_model
    from cada_jax.eval.report import format_table
    from cada_jax.eval.report_run import build_run_report
    from cada_jax.eval.runner import evaluate
    from cada_jax.eval.suites import check_variant
    from cada_jax.eval.summary import summary_rows

    # everything that can be checked without the model first
    check_variant(args.variant)
    attacks = attacks_from_args(args)
    sp = sampling_from_args(args)
    check_judge_args(args)
    section = spec_section_from_args(args)
    records = records_from_args(args)
    out = Path(args.out) if args.out else default_out("eval", args)

    model_dir, params, cfg, tok = load_model(args.model, args.dtype)
    spec = spec_from_args(section, stage_model=(params, cfg, tok, model_dir), dtype=args.dtype)
    if args.variant == "cases" and spec.embed_fn is not None:
        from cada_jax.eval.suites import build_items

        # embed every (attacked) request in batches now, rather than one at a time while prompting
        items = build_items(records, variant="none", attacks=attacks, attack_benign=args.attack_benign)
        spec.embed_fn.warm([it.attacked_prompt for it in items])
    judge = judge_from_args(args, batch_size=args.batch_size)
    try:
        summary = evaluate(
            params, cfg, tok, records, variant=args.variant, attacks=attacks, judge=judge, sampling=sp, spec=spec,
            batch_size=args.batch_size, out_dir=out, attack_benign=args.attack_benign, k=args.k,
            max_seq_len=args.max_seq_len, tag=args.tag, model_name=args.model, seed=args.seed,
            progress=not args.quiet,
        )
    finally:
        close = getattr(judge, "close", None)
        if callable(close):
            close()
    columns, rows = summary_rows(summary)
    print(f"cada eval: {args.model} · variant {args.variant} · attacks {', '.join(attacks)} · judge {summary['judge']}")
    print(format_table(columns, rows))
    paths = [out / "results.jsonl", out / "summary.json"]
    if not args.no_report:
        rep = build_run_report(out)
        paths += [rep["markdown"], rep["html"]]
    for p in paths:
        print(f"wrote {p}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate harmful compliance, jailbreak robustness, over-refusal and utility",
        description="Evaluate one model on a prompt suite (or your own prompt file) under jailbreak attacks.",
    )
    add_eval_args(p)
    p.add_argument("--prompts", default=None, help="your own prompts: a .jsonl, .json, .csv, .tsv or .txt file")
    p.add_argument("--label", choices=["harmful", "benign"], default=None, help="label of every prompt in --prompts")
    p.add_argument("--field", default="text", help="key / column holding the prompt in --prompts (default text)")
    p.add_argument("--category-field", default=None, help="key / column holding a category in --prompts")
    p.add_argument("--out", default=None, help="output folder (default runs/eval-<model>-<time>)")
    p.add_argument("--tag", default=None, help="label of this evaluation in reports (e.g. before, after)")
    p.add_argument("--no-report", action="store_true", help="skip report.md / report.html")
    p.set_defaults(fn=cmd_eval)

