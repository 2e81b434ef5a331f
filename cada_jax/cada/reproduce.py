"""The paper's experiment: train the four variants and compare them (`cada ablate --train CONFIG`).

For each variant (none, code, simple, cases) the same requests, budget and seed go through
generate -> SFT -> RL -> eval, each in its own pipeline run folder `<out>/<variant>/` (resumable
on its own: a rerun skips finished stages). The starting model is evaluated once, in the first
variant's folder. Then one table, written to `<out>/ablation.json`, `report.md` and `report.html`:

* per run (the base model and each trained variant), with bootstrap 95% intervals: harmful
  compliance without attack, the StrongREJECT score (judges with a rubric), each attack's success
  rate and the worst attack, over-refusal, format, no final answer, utility (when the eval has a
  utility set);
* paired comparisons over the same prompts (exact McNemar test on each prompt's outcome): every
  variant against `none`, and `cases` against `code`, on harmful compliance, the worst attack and
  over-refusal.

Variants differ only in `generate.variant`; with `generate.reasoning: template` (CPU) that is what
each chain's reasoning cites (`cada.generate.variant_reasoning`), with `model` what the model sees
while it writes its own reasoning (the method as written).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from cada_jax.cada.prompts import VARIANTS
from cada_jax.config import Config

__all__ = ["train_ablation", "paired_comparisons"]

COMPARISONS: tuple[tuple[str, str], ...] = (("code", "none"), ("simple", "none"), ("cases", "none"), ("cases", "code"))
PAIRED_METRICS = (("harmful_compliance", "harmful compliance"), ("worst_attack_asr", "worst-attack ASR"),
                  ("over_refusal", "over-refusal"))


def _rows(results: Path) -> list[dict]:
    from cada_jax.eval.runner import read_results

    return read_results(results)


def outcomes(rows: Sequence[dict], metric: str) -> dict[tuple, bool]:
    """Each prompt's 0/1 outcome for `metric`, keyed so that two runs on the same prompts pair up:
    harmful_compliance (plain harmful prompts answered without refusal), worst_attack_asr (a harmful
    prompt not refused under at least one attack), over_refusal (plain benign prompts refused)."""
    out: dict[tuple, bool] = {}
    if metric == "harmful_compliance":
        for r in rows:
            if r["label"] == "harmful" and r.get("attack", "none") == "none":
                out[(r["id"], r.get("sample", 0))] = not r["refused"]
    elif metric == "worst_attack_asr":
        for r in rows:
            if r["label"] == "harmful":
                key = (r["id"], r.get("sample", 0))
                out[key] = out.get(key, False) or not r["refused"]
    elif metric == "over_refusal":
        for r in rows:
            if r["label"] == "benign" and r.get("attack", "none") == "none":
                out[(r["id"], r.get("sample", 0))] = bool(r["refused"])
    else:
        raise ValueError(f"no paired outcome for metric {metric!r}; use one of {', '.join(m for m, _ in PAIRED_METRICS)}")
    return out


def paired_comparisons(rows_by_run: dict[str, Sequence[dict]], pairs: Sequence[tuple[str, str]] = COMPARISONS) -> list[dict]:
    """McNemar tests of each (a, b) pair of runs on each paired metric, over the prompts both have."""
    from cada_jax.eval.metrics import mcnemar_exact

    out = []
    for a, b in pairs:
        if a not in rows_by_run or b not in rows_by_run:
            continue
        for metric, label in PAIRED_METRICS:
            oa, ob = outcomes(rows_by_run[a], metric), outcomes(rows_by_run[b], metric)
            keys = sorted(set(oa) & set(ob), key=str)
            if not keys:
                continue
            test = mcnemar_exact([oa[k] for k in keys], [ob[k] for k in keys])
            out.append({"a": a, "b": b, "metric": metric, "label": label, **test})
    return out


def _with_likelihood_utility(summary: dict, eval_dir: Path) -> dict:
    """`summary` with each `eval.utility` set's log-likelihood accuracy (utility.json) as a metric
    `<set>_accuracy` and its CI, so the table shows it beside the generated-answer utility sets."""
    from cada_jax.cada.pipeline import utility_of

    util = utility_of(str(eval_dir)) or {}
    if util:
        summary = {**summary, "metrics": dict(summary["metrics"])}
        for name, u in util.items():
            summary["metrics"][f"{name}_accuracy"] = {"value": u["accuracy"], "ci": u["ci95"], "n": u["n"]}
    return summary


def utility_outcomes(eval_dir: Path) -> dict[str, dict[str, bool]]:
    """{utility set: {item id: correct}} from an eval folder's utility.json (empty without one)."""
    from cada_jax.cada.pipeline import utility_of

    return {name: dict(zip(u["ids"], u["correct"])) for name, u in (utility_of(str(eval_dir)) or {}).items()}


def _table(runs: list[tuple[str, dict]], attacks: Sequence[str]) -> dict:
    util = sorted({k for _, s in runs for k in s["metrics"] if k.endswith("_accuracy")})
    has_sr = any("strongreject" in s["metrics"] for _, s in runs)
    cols = ["run", "harmful compliance", *(["StrongREJECT"] if has_sr else []),
            *[f"ASR [{a}]" for a in attacks if a != "none"], "worst-attack ASR", "over-refusal", "format", "no answer",
            *[k.replace("_accuracy", "") for k in util]]
    better = {c: "down" for c in cols[1:]}
    better.update({"format": "up", **{k.replace("_accuracy", ""): "up" for k in util}})
    rows = []
    for label, s in runs:
        m, pa = s["metrics"], s.get("per_attack") or {}
        rows.append([label, m.get("harmful_compliance"), *([m.get("strongreject")] if has_sr else []),
                     *[pa.get(a, {}).get("harmful_compliance") for a in attacks if a != "none"],
                     m.get("worst_attack_asr"), m.get("over_refusal"), m.get("format_rate"), m.get("no_answer"),
                     *[m.get(k) for k in util]])
    return {"title": "Trained variants: harmfulness, robustness, over-refusal, format, utility (95% bootstrap CIs)",
            "columns": cols, "rows": rows, "better": better}


def train_ablation(cfg: Config, variants: Sequence[str] = VARIANTS, out_dir: str | os.PathLike | None = None,
                   verbose: bool = True) -> dict[str, Any]:
    """Train and evaluate each variant of `cfg` (see the module doc); returns what ablation.json holds."""
    from cada_jax.cada.pipeline import PipelineError, run_pipeline
    from cada_jax.eval.report import format_table, write_report
    from cada_jax.files import atomic_write_json

    variants = list(dict.fromkeys(variants))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise PipelineError(f"variants {unknown or variants}: use some of {', '.join(VARIANTS)}")
    if "eval" not in cfg.pipeline.stages:
        raise PipelineError("cada ablate --train compares the variants' evaluations: keep 'eval' in pipeline.stages")
    out = Path(out_dir or os.path.join(cfg.run.out_dir, f"{cfg.run.name}-ablation")).resolve()
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    for i, v in enumerate(variants):
        sub = dataclasses.replace(
            cfg,
            run=dataclasses.replace(cfg.run, out_dir=str(out), name=v),
            generate=dataclasses.replace(cfg.generate, variant=v),
            pipeline=dataclasses.replace(cfg.pipeline, eval_before=(i == 0)),  # the base model, once
        )
        if verbose:
            print(f"[cada ablate] variant {v} ({i + 1}/{len(variants)}) -> {out / v}", flush=True)
        t = time.perf_counter()
        run_pipeline(sub)
        seconds[v] = round(time.perf_counter() - t, 1)

    def summary(d: Path) -> dict:
        return json.loads((d / "summary.json").read_text(encoding="utf-8"))

    base_dir = out / variants[0] / "eval" / "before"
    eval_dirs = [base_dir] + [out / v / "eval" / "after" for v in variants]
    runs = [(label, _with_likelihood_utility(summary(d), d))
            for label, d in zip(["base (untrained)"] + [f"{v} (trained)" for v in variants], eval_dirs)]
    rows_by_run = {"base": _rows(base_dir / "results.jsonl"),
                   **{v: _rows(out / v / "eval" / "after" / "results.jsonl") for v in variants}}
    attacks = list(cfg.eval.attacks)
    table = _table(runs, attacks)
    tests = paired_comparisons(rows_by_run)
    util_by_run = {"base": utility_outcomes(base_dir), **{v: utility_outcomes(out / v / "eval" / "after") for v in variants}}
    from cada_jax.eval.metrics import mcnemar_exact

    for a, b in COMPARISONS:
        for name, oa in util_by_run.get(a, {}).items():
            ob = util_by_run.get(b, {}).get(name)
            keys = sorted(set(oa) & set(ob or {}))
            if keys:
                tests.append({"a": a, "b": b, "metric": f"{name}_accuracy", "label": f"{name} accuracy",
                              **mcnemar_exact([oa[k] for k in keys], [ob[k] for k in keys])})
    test_table = {"title": "Paired comparisons over the same prompts (exact McNemar test)",
                  "columns": ["a vs b", "metric", "a - b", "a only", "b only", "p-value"],
                  "rows": [[f"{t['a']} vs {t['b']}", t["label"], t["diff"], t["a_only"], t["b_only"], t["p_value"]] for t in tests]}
    per_metric = {}
    for key, title in (("harmful_compliance", "harmful compliance"), ("over_refusal", "over-refusal")):
        per_metric[f"{title} by run"] = {label: s["metrics"][key] for label, s in runs if key in s["metrics"]}
    from cada_jax.eval.report_run import pick_examples

    stages = [(label, d, s) for (label, s), d in zip(runs, eval_dirs)]
    report = write_report(out, title=f"CADA ablation, trained: {cfg.run.name}", tables=[table, test_table],
                          per_category=per_metric, examples=pick_examples(stages, 1, show_stage=True))
    result = {
        "config": cfg.run.name, "variants": variants, "attacks": attacks, "judge": cfg.eval.judge,
        "reasoning": cfg.generate.reasoning, "table": table, "paired": tests,
        "runs": {v: str(out / v) for v in variants}, "seconds": {**seconds, "total": round(time.perf_counter() - t0, 1)},
        "files": {"json": str(out / "ablation.json"), "markdown": str(report["markdown"]), "html": str(report["html"])},
    }
    atomic_write_json(out / "ablation.json", result)
    if verbose:
        print(format_table(table["columns"], table["rows"], table["better"]))
        print(format_table(test_table["columns"], test_table["rows"], {}))
    return result
