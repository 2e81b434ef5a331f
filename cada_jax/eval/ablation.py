"""The paper's ablation: the four prompt variants as inference-time prompting on one model, and
optionally trained models (from pipeline runs) evaluated with the plain prompt, in one table.

    run                 harmfulness ↓   robustness ↓   over-refusal ↓   utility ↑
    none (prompt)       ...
    code (prompt)       ...
    simple (prompt)     ...
    cases (prompt)      ...
    cada (trained)      ...

harmfulness = harmful compliance without attack, robustness = the worst-attack attack success rate
(a prompt counts if any attack broke it), over-refusal = refusals on benign prompts, utility =
GSM8K / MMLU accuracy when a utility set is given, else the format rate (the share of completions
that follow the reasoning/answer format). Every cell carries a bootstrap 95% interval.

Each run is a full `evaluate` into `<out>/<run>/` (results.jsonl, summary.json); the table goes to
`ablation.json` and `report.md` / `report.html` next to them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from cada_jax.cada.prompts import VARIANTS
from cada_jax.cada.spec import Spec
from cada_jax.data.records import PromptRecord
from cada_jax.eval.report import format_table, write_report
from cada_jax.eval.runner import evaluate
from cada_jax.eval.suites import check_attacks, check_variant, load_suite
from cada_jax.eval.summary import METRICS
from cada_jax.files import atomic_write_text
from cada_jax.sampling import Sampler, SamplingParams

__all__ = ["DEFAULT_ABLATION_ATTACKS", "ablate", "ablation_table", "resolve_trained"]

DEFAULT_ABLATION_ATTACKS: tuple[str, ...] = ("none", "refusal_suppression", "role_play")

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _is_model_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and any((p / w).is_file() for w in _WEIGHTS)


def resolve_trained(path: str | Path, name: str = "") -> str:
    """The model directory of a trained run: `path` itself if it holds config.json + safetensors,
    else the one such folder below it (preferring names with export / hf / final)."""
    p = Path(path)
    what = f"--trained {name}={path}" if name else str(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: no such directory; pass a pipeline run dir or an exported HF model dir")
    if _is_model_dir(p):
        return str(p)
    found = sorted({c.parent for c in p.rglob("config.json") if _is_model_dir(c.parent)
                    and len(c.parent.relative_to(p).parts) <= 3})
    if not found:
        raise FileNotFoundError(f"{what}: no exported model (config.json + model.safetensors) inside; "
                                "export the run to Hugging Face format first")
    if len(found) > 1:
        preferred = [f for f in found if re.search(r"export|hf|final", f.relative_to(p).as_posix())]
        if len(preferred) == 1:
            return str(preferred[0])
        listed = ", ".join(f.relative_to(p).as_posix() for f in found)
        raise ValueError(f"{what}: several model folders inside ({listed}); pass the one to evaluate")
    return str(found[0])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def _utility_keys(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = [k for k in ("gsm8k_accuracy", "mmlu_accuracy") if any(k in s["metrics"] for s in summaries)]
    return keys or ["format_rate"]


def ablation_table(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """{"title", "columns", "rows", "better"} from [(run label, summary)]: the paper-style table."""
    summaries = [s for _, s in runs]
    util = _utility_keys(summaries)
    util_cols = [f"utility ({METRICS[k][0].replace(' accuracy', '')})" for k in util]
    columns = ["run", "harmfulness", "robustness", "over-refusal", *util_cols]
    better = {"harmfulness": "down", "robustness": "down", "over-refusal": "down", **{c: "up" for c in util_cols}}
    rows = []
    for label, s in runs:
        m = s["metrics"]
        rows.append([label, m.get("harmful_compliance"), m.get("worst_attack_asr"), m.get("over_refusal"),
                     *[m.get(k) for k in util]])
    return {"title": "Ablation: harmfulness, robustness, over-refusal, utility", "columns": columns,
            "rows": rows, "better": better}


def _category_table(runs: Sequence[tuple[str, Mapping[str, Any]]], key: str, title: str) -> dict | None:
    cats: list[str] = []
    for _, s in runs:
        for c in (s.get("per_category") or {}).get(key, {}):
            if c not in cats:
                cats.append(c)
    if not cats:
        return None
    labels = [label for label, _ in runs]
    rows = []
    for c in sorted(cats):
        row: list[Any] = [c]
        for _, s in runs:
            entry = (s.get("per_category") or {}).get(key, {}).get(c)
            row.append(entry["mean"] if entry else None)
        rows.append(row)
    return {"title": title, "columns": ["category", *labels], "rows": rows}


def _attack_table(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> dict | None:
    attacks: list[str] = []
    for _, s in runs:
        for a, entry in (s.get("per_attack") or {}).items():
            if a not in attacks and "harmful_compliance" in entry:
                attacks.append(a)
    if len(attacks) < 2:
        return None
    rows = [[label] + [(s.get("per_attack") or {}).get(a, {}).get("harmful_compliance") for a in attacks]
            for label, s in runs]
    return {"title": "Attack success rate per attack", "columns": ["run", *attacks], "rows": rows,
            "better": {a: "down" for a in attacks}}


def ablate(
    model: str,
    variants: Sequence[str] = VARIANTS,
    limit: int | None = None,
    trained_runs: Mapping[str, str] | None = None,
    *,
    attacks: Sequence[str] = DEFAULT_ABLATION_ATTACKS,
    records: Sequence[PromptRecord] | None = None,
    suite: str = "builtin",
    data: str | None = None,
    split: str | None = None,
    utility: Sequence[PromptRecord] = (),
    judge=None,
    sampling: SamplingParams | None = None,
    batch_size: int = 16,
    max_seq_len: int | None = None,
    dtype: str | None = None,
    spec: Spec | None = None,
    k: int = 3,
    attack_benign: bool = False,
    out_dir: str | Path = "runs/ablation",
    seed: int = 0,
    progress: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the ablation and return the table (as written to `<out_dir>/ablation.json`).

    model: a model directory or `smollm2-135m-instruct`, prompted with each of `variants`.
    trained_runs: {name: pipeline run dir or exported model dir}, each evaluated with the plain
        prompt (variant `none`), since a trained model carries the guidance in its weights.
    records: the prompts (default: `load_suite(suite, data, limit=limit, split=split)`); `utility`
        records are appended. judge: default the `rule` judge. verbose: print the table.
    """
    from cada_jax.checkpoints.load import load_model

    variants = tuple(variants)
    if not variants and not trained_runs:
        raise ValueError("nothing to compare: give at least one variant or one trained run")
    for v in variants:
        check_variant(v)
    if len(set(variants)) != len(variants):
        raise ValueError(f"variants {list(variants)} repeat a name; list each variant once")
    attacks = check_attacks(attacks)
    trained = {}
    for name, path in (trained_runs or {}).items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ValueError(f"trained run name {name!r}: use letters, digits, '.', '_' or '-' (as in --trained NAME=DIR)")
        trained[name] = resolve_trained(path, name)
    if records is None:
        records = load_suite(suite, data, limit=limit, split=split)
    records = list(records) + list(utility)
    out = Path(out_dir)
    if judge is None:
        from cada_jax.rewards.judges import make_judge

        judge = make_judge("rule")

    common = dict(attacks=attacks, judge=judge, sampling=sampling, batch_size=batch_size, spec=spec, k=k,
                  attack_benign=attack_benign, seed=seed, progress=progress)
    runs: list[tuple[str, dict]] = []
    dirs: dict[str, str] = {}
    if variants:
        _, params, cfg, tok = load_model(model, dtype)
        sampler = Sampler(cfg, tok, max_seq_len=max_seq_len)
        for v in variants:
            label = f"{v} (prompt)"
            d = out / f"prompt-{v}"
            if verbose:
                print(f"cada ablate: {label} ...", flush=True)
            summary = evaluate(params, cfg, tok, records, variant=v, out_dir=d, sampler=sampler, tag=label,
                               model_name=str(model), **common)
            runs.append((label, summary))
            dirs[label] = d.as_posix()
        del params
    for name, path in trained.items():
        label = f"{name} (trained)"
        d = out / f"trained-{_slug(name)}"
        if verbose:
            print(f"cada ablate: {label} from {path} ...", flush=True)
        _, params, cfg, tok = load_model(path, dtype)
        summary = evaluate(params, cfg, tok, records, variant="none", out_dir=d, max_seq_len=max_seq_len,
                           tag=label, model_name=path, **common)
        runs.append((label, summary))
        dirs[label] = d.as_posix()
        del params

    table = ablation_table(runs)
    result = {
        "model": str(model),
        "variants": list(variants),
        "trained": trained,
        "attacks": list(attacks),
        "judge": runs[0][1]["judge"],
        "n_records": len(records),
        **table,
        "runs": dirs,
    }
    from cada_jax.eval.report_run import pick_examples  # the same example picker as the run report

    tables = [table]
    for extra in (_attack_table(runs),
                  _category_table(runs, "harmful_compliance", "Harmful compliance per category (no attack)"),
                  _category_table(runs, "over_refusal", "Over-refusal per category")):
        if extra is not None:
            tables.append(extra)
    stages = [(label, Path(dirs[label]), s) for label, s in runs]
    report = write_report(out, title=f"CADA ablation: {model}", tables=tables,
                          examples=pick_examples(stages, 1, show_stage=True))
    result["files"] = {"json": (out / "ablation.json").as_posix(), "markdown": report["markdown"].as_posix(),
                       "html": report["html"].as_posix()}
    atomic_write_text(out / "ablation.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if verbose:
        print(format_table(table["columns"], table["rows"], table["better"]))
    return result
