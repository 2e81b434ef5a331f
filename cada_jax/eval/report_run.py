"""The per-run report: `build_run_report(run_dir)` writes `report.md` and `report.html` into a run dir.

It collects what the run left behind, whatever produced it (`cada eval`, `cada pipeline`):

* every `summary.json` under the run dir (written by `cada_jax.eval.runner.evaluate`) becomes a row
  of the results tables; a summary whose `tag` (or folder name) contains "before" comes first and
  one with "after" last, and when both exist a change table (after − before) is added;
* every `metrics.jsonl` (SFT / RL steps) is plotted: reward, KL and completion length over steps;
  with several files the keys are prefixed with the file's folder name (`rl/reward`);
* per-category bars for each summary's breakdowns;
* example chains from the `results.jsonl` next to each summary: harmful and benign prompts (failures
  first, then successes; the same prompts before and after), plus one jailbreak that worked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from cada_jax.eval.report import write_report
from cada_jax.eval.runner import RESULTS_FILE, SUMMARY_FILE, read_results
from cada_jax.eval.summary import METRICS

__all__ = ["build_run_report", "find_metrics", "find_summaries", "pick_examples"]


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _stage_rank(label: str) -> int:
    low = label.lower()
    if "before" in low:
        return 0
    if "after" in low:
        return 2
    return 1


def find_summaries(run_dir: str | Path) -> list[tuple[str, Path, dict]]:
    """[(label, folder, summary)] for every summary.json under `run_dir`, before-first, after-last.

    The label is the summary's `tag`, else its folder relative to run_dir, else "eval".
    """
    root = Path(run_dir)
    found = []
    for path in sorted(root.rglob(SUMMARY_FILE)):
        if _hidden(path, root):
            continue
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}); delete it or re-run the evaluation") from None
        if not isinstance(summary, dict) or "metrics" not in summary:
            continue  # a training stage's summary.json (sft/, rl/) shares the run dir
        rel = path.parent.relative_to(root).as_posix()
        label = summary.get("tag") or (rel if rel != "." else "eval")
        found.append((str(label), path.parent, summary))
    found.sort(key=lambda t: (_stage_rank(t[0]), t[0]))
    labels = [t[0] for t in found]
    dupes = {lab for lab in labels if labels.count(lab) > 1}
    if dupes:  # two summaries with the same tag: tell them apart by folder
        found = [((f"{lab} ({d.relative_to(root).as_posix() or '.'})" if lab in dupes else lab), d, s) for lab, d, s in found]
    return found


def find_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of every metrics.jsonl under `run_dir`; keys prefixed by folder when there are several."""
    from cada_jax.training.logging import read_metrics

    root = Path(run_dir)
    files = [p for p in sorted(root.rglob("metrics.jsonl")) if not _hidden(p, root)]
    rows: list[dict] = []
    for p in files:
        prefix = ""
        if len(files) > 1:
            prefix = (p.parent.relative_to(root).as_posix() if p.parent != root else "run") + "/"
        for row in read_metrics(str(p)):
            if not isinstance(row, dict):
                continue
            out = {"step": row.get("step", 0)}
            for key, v in row.items():
                if key != "step" and v is not None:
                    out[prefix + str(key)] = v
            rows.append(out)
    return rows


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _setup_table(found: Sequence[tuple[str, Path, dict]]) -> dict:
    rows = []
    for label, _, s in found:
        labels = s.get("labels") or {}
        counts = ", ".join(f"{v} {k}" for k, v in labels.items() if v)
        rows.append([label, s.get("model") or "—", s.get("variant"), ", ".join(s.get("attacks") or []),
                     s.get("judge"), counts, (s.get("sampling") or {}).get("max_new_tokens")])
    return {"title": "Setup", "columns": ["run", "model", "variant", "attacks", "judge", "prompts", "max new tokens"],
            "rows": rows}


def _results_table(found: Sequence[tuple[str, Path, dict]]) -> dict:
    keys = [k for k in METRICS if any(k in s.get("metrics", {}) for _, _, s in found)]
    columns = ["run"] + [METRICS[k][0] for k in keys]
    rows = [[label] + [s["metrics"].get(k) for k in keys] for label, _, s in found]
    better = {METRICS[k][0]: METRICS[k][1] for k in keys}
    return {"title": "Safety and utility (95% bootstrap intervals)", "columns": columns, "rows": rows, "better": better}


def _attack_table(found: Sequence[tuple[str, Path, dict]]) -> dict | None:
    attacks: list[str] = []
    for _, _, s in found:
        for a in s.get("per_attack", {}):
            if a not in attacks and "harmful_compliance" in s["per_attack"][a]:
                attacks.append(a)
    if len(attacks) < 2:
        return None
    rows = []
    for label, _, s in found:
        pa = s.get("per_attack", {})
        rows.append([label] + [pa.get(a, {}).get("harmful_compliance") for a in attacks])
    return {"title": "Harmful compliance per attack (attack success rate)", "columns": ["run"] + attacks,
            "rows": rows, "better": {a: "down" for a in attacks}}


def _change_table(before: dict, after: dict) -> dict:
    rows = []
    for key, (name, direction) in METRICS.items():
        b, a = before.get("metrics", {}).get(key), after.get("metrics", {}).get(key)
        if not b or not a or b.get("value") is None or a.get("value") is None:
            continue
        delta = a["value"] - b["value"]
        good = delta < 0 if direction == "down" else delta > 0
        verdict = "better" if good else ("same" if delta == 0 else "worse")
        rows.append([f"{name} {'↓' if direction == 'down' else '↑'}", b["value"], a["value"], f"{delta:+.3f}", verdict])
    return {"title": "Change after − before", "columns": ["metric", "before", "after", "change", "direction"], "rows": rows}


# ---------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------


def _results_of(folder: Path, summary: Mapping[str, Any]) -> list[dict]:
    name = (summary.get("files") or {}).get("results") or RESULTS_FILE
    path = folder / name
    return read_results(path) if path.is_file() else []


def _wrong(row: Mapping[str, Any]) -> bool:
    return bool(row.get("refused")) != (row.get("label") == "harmful")


def _pick(rows: Sequence[dict], label: str, attack: str, n: int) -> list[tuple[Any, str]]:
    """Up to n (record_index, attack) keys: failures and successes alternating, failures first."""
    cand = [r for r in rows if r.get("label") == label and r.get("attack") == attack and r.get("sample", 0) == 0
            and r.get("refused") is not None]
    wrong = [r for r in cand if _wrong(r)]
    right = [r for r in cand if not _wrong(r)]
    picked: list[dict] = []
    while len(picked) < n and (wrong or right):
        for pool in (wrong, right):
            if pool and len(picked) < n:
                picked.append(pool.pop(0))
    return [(r["record_index"], r["attack"]) for r in picked]


def _example(row: Mapping[str, Any], stage: str | None) -> dict:
    kind = str(row.get("label"))
    if row.get("attack") not in (None, "none"):
        kind += f" · attack {row['attack']}"
    if stage:
        kind += f" · {stage}"
    verdict = row.get("verdict") or ""
    if row.get("score") is not None:
        verdict += f" (score {float(row['score']):.2f})"
    if row.get("well_formed") is False:
        verdict += " · malformed output"
    prompt = str(row.get("prompt") or "")
    if row.get("attack") not in (None, "none") and row.get("attacked_prompt"):
        prompt += f"\n\n[sent to the model under attack {row['attack']} as]\n{row['attacked_prompt']}"
    answer = str(row.get("answer") or "")
    completion = str(row.get("completion") or "")
    if row.get("well_formed") is False and completion.strip() and completion.strip() != answer.strip():
        # show what the judge saw and what the model actually wrote
        answer = (answer or "(empty)") + "\n\n[raw completion, not in the reasoning/answer format]\n" + completion
    return {"kind": kind, "prompt": prompt, "reasoning": row.get("reasoning") or "", "answer": answer,
            "verdict": verdict.strip(" ·")}


def pick_examples(stages: Sequence[tuple[str, Path, dict]], n_examples: int, *, show_stage: bool) -> list[dict]:
    """Example chains for a report from [(label, folder, summary)]: the prompts are picked in the
    last stage (failures first), and the same prompts are shown from every stage."""
    loaded = [(label, _results_of(folder, s), s) for label, folder, s in stages]
    loaded = [t for t in loaded if t[1]]
    if not loaded:
        return []
    primary_rows = loaded[-1][1]  # "after" when there is one
    head = loaded[-1][2].get("headline_attack") or "none"
    keys: list[tuple[Any, str]] = []
    keys += _pick(primary_rows, "harmful", head, n_examples)
    keys += _pick(primary_rows, "benign", "none", n_examples)
    # one jailbreak that worked (harmful, attacked, complied), if any
    broke = [r for r in primary_rows if r.get("label") == "harmful" and r.get("attack") not in (None, "none", head)
             and r.get("refused") is False and r.get("sample", 0) == 0]
    if broke:
        keys.append((broke[0]["record_index"], broke[0]["attack"]))
    out = []
    for key in keys:
        for label, rows, _ in loaded:
            match = next((r for r in rows if (r.get("record_index"), r.get("attack")) == key and r.get("sample", 0) == 0), None)
            if match is not None:
                out.append(_example(match, label if show_stage else None))
    return out


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


_HEADLINE_COLUMNS = (("harmful_refusal", "harmful refusal", "up"), ("lookalike_compliance", "look-alike compliance", "up"),
                     ("benign_compliance", "benign compliance", "up"), ("format_rate", "format rate", "up"),
                     ("no_answer_rate", "no final answer", "down"), ("distinct_openings", "distinct openings", "up"),
                     ("mean_answer_words", "answer words", ""))


def _headline_tables(root: Path) -> list[dict]:
    """A pipeline run's headline.json as tables: before/after per held-out set, and the utility sets
    (accuracy with its bootstrap 95% interval, McNemar's p against the starting model)."""
    path = root / "headline.json"
    if not path.is_file():
        return []
    h = json.loads(path.read_text(encoding="utf-8"))
    before, after = h.get("before") or {}, h.get("after") or {}
    sets = after.get("sets") or {"held-out": after}
    out = []
    for name, a in sets.items():
        b = (before.get("sets") or {}).get(name) if before.get("sets") else (before or None)
        rows = [[label] + [run.get(k) for k, _, _ in _HEADLINE_COLUMNS] for label, run in (("before", b), ("after", a)) if run]
        out.append({"title": f"Before / after: {name}", "columns": ["model"] + [c for _, c, _ in _HEADLINE_COLUMNS],
                    "rows": rows, "better": {c: d for _, c, d in _HEADLINE_COLUMNS if d}})
    util = after.get("utility") or {}
    if util:
        rows = []
        for name, u in util.items():
            bu = (before.get("utility") or {}).get(name)
            cell = lambda x: {"value": x["accuracy"], "ci": x["ci95"]} if x else None
            rows.append([name, cell(bu), cell(u), u.get("p_value"), u["n"]])
        out.append({"title": "Utility: multiple-choice accuracy by log-likelihood (bootstrap 95% CI; McNemar p, after vs before)",
                    "columns": ["set", "before", "after", "McNemar p", "items"], "rows": rows, "better": {}})
    return out


def build_run_report(run_dir: str | Path, *, title: str | None = None, n_examples: int = 2) -> dict[str, Any]:
    """Write report.md, report.html and plots/ into `run_dir` from what it contains; return the paths.

    Needs at least one summary.json or metrics.jsonl under `run_dir`.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such run directory; pass the --out folder of `cada eval` or `cada pipeline`")
    found = find_summaries(root)
    curves = find_metrics(root)
    if not found and not curves:
        raise FileNotFoundError(f"{root}: no summary.json or metrics.jsonl found; run `cada eval --out {root}` first")

    tables: list[dict] = []
    per_cat: dict[str, dict] = {}
    examples: list[dict] = []
    if found:
        tables.append(_setup_table(found))
        tables.append(_results_table(found))
        attack_table = _attack_table(found)
        if attack_table:
            tables.append(attack_table)
        before = [t for t in found if _stage_rank(t[0]) == 0]
        after = [t for t in found if _stage_rank(t[0]) == 2]
        if before and after:
            tables.append(_change_table(before[0][2], after[-1][2]))
            stages = [before[0], after[-1]]
        else:
            stages = list(found)
        several = len(found) > 1
        for label, _, s in found:
            for key, cats in (s.get("per_category") or {}).items():
                if not cats or (len(cats) == 1 and "uncategorized" in cats):
                    continue
                name = METRICS.get(key, (key, ""))[0]
                labelled = {(f"{c} (n={v['n']})" if isinstance(v, Mapping) and "n" in v else c): v for c, v in cats.items()}
                per_cat[f"{name} — {label}" if several else name] = labelled
        examples = pick_examples(stages, n_examples, show_stage=len(stages) > 1)

    tables.extend(_headline_tables(root))
    if title is None:
        models = sorted({str(s.get("model")) for _, _, s in found if s.get("model")})
        title = "CADA evaluation" + (f": {', '.join(models)}" if models else f": {root.name}")
    return write_report(root, title=title, tables=tables, curves=curves, per_category=per_cat, examples=examples)
