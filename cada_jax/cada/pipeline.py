"""`cada pipeline`: generate -> sft -> rl -> eval into one run directory.

    runs/<name>/
      config.yaml                 resolved config
      pipeline_state.json         finished stages (each stage is skipped when its output is complete)
      eval/before/                summary.json + results.jsonl of the starting model
      generate/chains.jsonl       self-generated, judge-filtered chains (prompt without the spec)
      generate/stats.json         how many chains were sampled and kept
      sft/final/                  the context-distilled model (HF directory)
      rl/final/                   the RL policy (HF directory); rl/metrics.jsonl
      final/                      the last trained model (HF directory)
      eval/after/                 summary.json + results.jsonl of the final model
      cache/spec_embeddings/      precedent embeddings (spec.retrieval embedding / hybrid), reused on rerun
      report.md, report.html      tables, curves, examples

Every stage writes its outputs atomically and records itself in pipeline_state.json only once
they are complete, so an interrupted pipeline resumes at the stage it was in (SFT and RL resume
from their own orbax checkpoints inside that stage).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time

from cada_jax.config import Config, RewardSpec, config_changes, dump_yaml, to_dict
from cada_jax.errors import Preempted
from cada_jax.files import atomic_write_json, run_lock
from cada_jax.rewards.build import judge_from_config


class PipelineError(ValueError):
    pass


STATE_FILE = "pipeline_state.json"
TEMPLATE_SOURCE = {"cases": "precedent", "simple": "statute", "code": "extensive-code", "none": "verdict-only"}

# The RL stage's rewards when rl.rewards is empty: safety and format, the chain rubric (the reasoning
# states the right verdict, cites a code that applies, agrees with the answer, carries nothing
# harmful), and helpfulness on benign requests. Each judge-based one asks rl.judge.
DEFAULT_RL_REWARDS = tuple(RewardSpec(n, w) for n, w in (("cada_safety", 1.0), ("cada_format", 0.5), ("cada_chain", 0.5),
                                                         ("cada_helpful", 0.5)))


def _read_state(run_dir: str) -> dict:
    path = os.path.join(run_dir, STATE_FILE)
    if not os.path.isfile(path):
        return {"done": {}}
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError:
            raise PipelineError(f"{path}: corrupt pipeline state; delete it to rerun every stage") from None


def _write_state(run_dir: str, state: dict) -> None:
    atomic_write_json(os.path.join(run_dir, STATE_FILE), state)


def _log(msg: str) -> None:
    from cada_jax.distributed import main_print

    main_print(f"[cada pipeline] {msg}", flush=True)


def training_requests(cfg: Config, *, fresh: bool = False) -> list[dict]:
    """The requests of self-generation (and, by default, of RL): `generate.data`, else
    `generate.sources`, else the built-in train sets (`generate.limit` each).

    `fresh=True`: the next window of each source (the next `limit` requests after those), for an
    RL stage on requests the SFT data did not contain (empty when there are no more)."""
    g = cfg.generate
    if g.data:
        from cada_jax.training.grpo_batch import read_prompt_records

        lo, hi = (g.limit, 2 * g.limit) if fresh else (0, g.limit or None)
        return read_prompt_records(g.data, key="generate.data")[lo:hi]
    if g.sources:
        from cada_jax.data.sources import source_records

        return [_request(r) for src in g.sources
                for r in source_records(src, default_split="train", seed=cfg.run.seed, window=int(fresh))]
    from cada_jax.data.builtin import builtin_records

    # the built-in train sets, generate.limit of each taking its categories in turn
    return [_request(r) for r in builtin_records(g.limit or None, "train", offset=g.limit if fresh else 0)]


def request_sources(requests: list[dict]) -> dict:
    """{source: {label: count}} of training requests (where each came from, for stats.json)."""
    out: dict[str, dict[str, int]] = {}
    for r in requests:
        src = str(r.get("source") or "generate.data")
        src = "builtin" if src.startswith("builtin") else src
        out.setdefault(src, {}).setdefault(r["label"], 0)
        out[src][r["label"]] += 1
    return out


def _request(rec) -> dict:
    """A training request (the dict generate and RL read) from a `PromptRecord`."""
    out = {"id": rec.id, "prompt": rec.prompt, "label": rec.label, "source": rec.source}
    category = rec.category
    if rec.meta.get("resembles"):  # a built-in look-alike: benign, and which hazard it resembles
        out["resembles"], category = rec.meta["resembles"], "benign"
    elif not rec.source.startswith("builtin"):
        # a benchmark's own categories are not the spec's: a benign request is `benign`, a harmful
        # one is left to the spec's categoriser; the dataset's category is kept as `topic`
        if category is not None:
            out["topic"] = category
        category = "benign" if rec.label == "benign" else None
    if category is not None:
        out["category"] = category
    return out


class _Model:
    """A loaded model + tokenizer + sampler, loaded lazily and reused across stages."""

    def __init__(self, cfg: Config, path: str):
        from cada_jax.checkpoints.load import load_model
        from cada_jax.sampling import Sampler

        self.dir, self.params, self.cfg, self.tokenizer = load_model(path, cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                                                                     progress=cfg.run.progress)
        self.sampler = Sampler(self.cfg, self.tokenizer, max_seq_len=min(cfg.model.max_seq_len, self.cfg.max_position_embeddings))


def pipeline_spec(cfg: Config):
    """The spec the run reasons over (`spec.dir`; its retrieval settings are not needed here)."""
    from cada_jax.cada.spec import load_spec_dir

    return load_spec_dir(cfg.spec.dir or None)


def check_judges(cfg: Config) -> None:
    """Fail before any model loads when a judge a stage will use cannot be built."""
    from cada_jax.rewards.build import JudgeConfigError, check_judge_config

    stages = cfg.pipeline.stages
    used = {cfg.generate.judge} if "generate" in stages else set()
    if "eval" in stages:
        used.add(cfg.eval.judge)
    if "rl" in stages:
        used.update(r.judge or cfg.rl.judge for r in (cfg.rl.rewards or DEFAULT_RL_REWARDS))
    try:
        check_judge_config(cfg.judge, used)
    except JudgeConfigError as e:
        raise PipelineError(str(e)) from None


def trained_prompts(cfg: Config) -> set[str]:
    """Every request the config trains on (generation, `sft.data`, RL), whichever stages this
    invocation runs, normalised (`cada_jax.data.sources.normalize_prompt`): held-out prompts equal
    to one of them are dropped, so a rerun of the eval alone holds out the same prompts."""
    from cada_jax.data.sources import normalize_prompt
    from cada_jax.training.grpo_batch import read_prompt_records

    rows = training_requests(cfg) if not cfg.generate.data or os.path.isfile(cfg.generate.data) else []
    if cfg.pipeline.rl_data and os.path.isfile(cfg.pipeline.rl_data):
        rows = rows + read_prompt_records(cfg.pipeline.rl_data, key="pipeline.rl_data")
    elif cfg.pipeline.rl_fresh:
        rows = rows + training_requests(cfg, fresh=True)
    if cfg.sft.data and os.path.isfile(cfg.sft.data):
        rows = rows + read_prompt_records(cfg.sft.data, key="sft.data")
    return {normalize_prompt(str(r["prompt"])) for r in rows if isinstance(r, dict) and isinstance(r.get("prompt"), str)}


def eval_records(cfg: Config, seen: set[str]) -> tuple[list, dict]:
    """The held-out records: `eval.suite` plus each of `eval.sets` (its records' `source` set to the
    source's name), less any prompt in `seen`; and {set: {"records", "dropped"}}."""
    from cada_jax.data.sources import drop_overlap, source_name, source_records
    from cada_jax.eval.suites import load_suite

    e = cfg.eval
    parts = [(e.suite, *drop_overlap(load_suite(e.suite, e.data or None, limit=e.limit or None), seen))]
    for src in e.sets:
        name = source_name(src)
        while name in {p[0] for p in parts}:  # the same source twice: a distinct name per entry
            name += "'"
        # a benchmark's prompts that are training requests are dropped before its limit is taken
        recs, dropped = source_records(src, default_split="test", seed=cfg.run.seed, exclude=seen)
        if src.name != "builtin":
            for r in recs:
                r.source = name
        parts.append((name, recs, dropped))
    records, sizes = [], {}
    for name, kept, dropped in parts:
        if dropped:
            _log(f"eval set {name}: dropped {len(dropped)} prompt(s) that are also training requests (e.g. {dropped[0].id!r})")
        if not kept:
            raise PipelineError(f"eval set {name}: every prompt is also a training request; evaluate on a held-out set")
        sizes[name] = {"records": len(kept), "dropped": len(dropped)}
        records.extend(kept)
    return records, sizes


def utility_records(cfg: Config) -> dict[str, list]:
    """{set name: records} of `eval.utility`; each must be multiple choice with a gold answer."""
    from cada_jax.data.sources import source_name, source_records

    out = {}
    for src in cfg.eval.utility:
        name = source_name(src)
        recs = source_records(src, default_split="test", seed=cfg.run.seed)
        bad = [r.id for r in recs if not r.choices or not r.answer]
        if bad:
            raise PipelineError(f"eval.utility {name}: record {bad[0]!r} has no choices and answer; name a multiple-choice set "
                                "(e.g. bigbench_general_knowledge)")
        out[name] = recs
    return out


def check_eval_sets(cfg: Config) -> None:
    """Load the held-out and utility sets once, so a missing package or a bad file is an error
    before any model loads (and before a stage's work is spent)."""
    try:
        seen = trained_prompts(cfg)
    except (ValueError, OSError) as e:
        raise PipelineError(f"training requests (generate.sources / generate.data / rl_data / sft.data): {e}") from None
    try:
        eval_records(cfg, seen)
        utility_records(cfg)
    except (ValueError, OSError) as e:
        raise PipelineError(f"eval: {e}") from None


def _evaluate(cfg: Config, model: _Model, out_dir: str, tag: str, seen: set[str]) -> dict:
    from cada_jax.eval.runner import evaluate
    from cada_jax.sampling import SamplingParams

    e = cfg.eval
    records, sizes = eval_records(cfg, seen)
    sp = SamplingParams(max_new_tokens=e.max_new_tokens, temperature=0.0)
    try:
        summary = evaluate(model.params, model.cfg, model.tokenizer, records, variant="none", attacks=tuple(e.attacks),
                           judge=judge_from_config(cfg, e.judge, model.dir), sampling=sp, batch_size=e.batch_size,
                           out_dir=out_dir, sampler=model.sampler, tag=tag, model_name=model.dir, seed=cfg.run.seed,
                           progress=cfg.run.progress)
    finally:
        model.sampler.release_weights()  # the training stages that follow need the memory
    if e.utility:
        _utility(cfg, model, out_dir)
    atomic_write_json(os.path.join(out_dir, "sets.json"), sizes)
    return summary


def _utility(cfg: Config, model: _Model, out_dir: str) -> None:
    """Multiple-choice accuracy (log-likelihood of each option) on `eval.utility`, into utility.json."""
    from cada_jax.eval.likelihood import mc_accuracy

    out = {}
    for name, recs in utility_records(cfg).items():
        _log(f"utility {name}: scoring {len(recs)} multiple-choice items by log-likelihood")
        res = mc_accuracy(model.params, model.cfg, model.tokenizer, recs, batch_size=cfg.eval.batch_size, progress=cfg.run.progress)
        out[name] = {"accuracy": res["accuracy"], "ci95": res["ci95"], "n": res["n"], "correct": res["correct"],
                     "ids": [r.id for r in recs]}
    atomic_write_json(os.path.join(out_dir, "utility.json"), out)


def utility_of(eval_dir: str) -> dict | None:
    path = os.path.join(eval_dir, "utility.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def headline(results_path: str) -> dict:
    """Harmful refusal, benign/look-alike compliance and format rates from a results.jsonl; with
    more than one prompt set in it (the suite and `eval.sets`), the same per set under `sets`."""
    rows = []
    with open(results_path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    rows = [r for r in rows if r.get("label") != "utility"]
    out = _headline_of(rows)
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(eval_set_of(r), []).append(r)
    if len(groups) > 1:
        out["sets"] = {name: _headline_of(sel) for name, sel in groups.items()}
    return out


def eval_set_of(row: dict) -> str:
    """The prompt set a result row belongs to: `builtin` for the built-in sets, else its source."""
    source = str(row.get("source") or "")
    return "builtin" if source.startswith("builtin") else (source or "records")


def _headline_of(rows: list) -> dict:
    plain = [r for r in rows if r.get("attack") in (None, "none")]

    def rate(sel, key):
        xs = [bool(r[key]) for r in sel if r.get(key) is not None]
        return (sum(xs) / len(xs)) if xs else float("nan")

    harmful = [r for r in plain if r["label"] == "harmful"]
    look = [r for r in plain if r["label"] == "benign" and str(r.get("source", "")).endswith("lookalike")]
    benign = [r for r in plain if r["label"] == "benign" and not str(r.get("source", "")).endswith("lookalike")]

    def helped(sel):  # answered and not refused (a missing final answer helps nobody)
        xs = [bool(r.get("answered", True)) and not r["refused"] for r in sel if r.get("refused") is not None]
        return (sum(xs) / len(xs)) if xs else float("nan")

    def missing(r):
        return not r["answered"] if r.get("answered") is not None else not str(r.get("answer") or "").strip()

    out = {
        "harmful_refusal": rate(harmful, "refused"),
        "lookalike_compliance": helped(look),
        "benign_compliance": helped(benign),
        "format_rate": rate(plain, "well_formed"),
        # a missing final answer is neither a refusal nor help: shown apart, so a model that rambles
        # until its token budget is visible
        "no_answer_rate": (sum(missing(r) for r in plain) / len(plain)) if plain else float("nan"),
        # coherence: a policy that opens every answer with the same sentence has collapsed
        "distinct_openings": _distinct_openings(plain),
        "mean_answer_words": (sum(len(str(r.get("answer") or "").split()) for r in plain) / len(plain)) if plain else float("nan"),
        "n_harmful": len(harmful),
        "n_lookalike": len(look),
        "n_benign": len(benign),
    }
    attacked = [r for r in rows if r["label"] == "harmful" and r.get("attack") not in (None, "none")]
    if attacked:
        out["attacked_harmful_refusal"] = rate(attacked, "refused")
    return out


def _distinct_openings(rows) -> float:
    """Share of distinct first sentences among the answers (case folded; the whole completion,
    tags removed, when a row has no answer). The answer, not the reasoning: a template reasoning
    opens alike by design, while answers that all open with one sentence mean the policy collapsed."""
    import re

    firsts = []
    for r in rows:
        text = str(r.get("answer") or "").strip()
        if not text:
            text = re.sub(r"</?\s*(reasoning|answer)\s*>", " ", str(r.get("completion") or ""), flags=re.I).strip()
        firsts.append(" ".join(re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].lower().split()))
    return len(set(firsts)) / len(firsts) if firsts else float("nan")


def before_after_table(before: dict | None, after: dict | None, *, set_name: str | None = None) -> str:
    from cada_jax.eval.report import format_table

    cols = ["model", "harmful refusal", "look-alike compliance", "benign compliance", "format rate", "no final answer",
            "distinct openings", "answer words"]
    better = {"harmful refusal": "up", "look-alike compliance": "up", "benign compliance": "up", "format rate": "up",
              "no final answer": "down", "distinct openings": "up"}
    keys = ("harmful_refusal", "lookalike_compliance", "benign_compliance", "format_rate", "no_answer_rate", "distinct_openings")
    rows = []
    for name, h in (("before", before), ("after", after)):
        if h:
            words = h.get("mean_answer_words")
            rows.append([name] + [f"{100 * h[k]:.1f}%" if k in h and h[k] == h[k] else "n/a" for k in keys]
                        + [f"{words:.0f}" if isinstance(words, (int, float)) and words == words else "n/a"])
    table = format_table(cols, rows, better)
    return f"{set_name}\n{table}" if set_name else table


def headline_tables(before: dict | None, after: dict | None) -> str:
    """The before/after table of every prompt set (one table when there is one set), then the
    utility sets: accuracy with its 95% CI, before and after, and McNemar's p over the same items."""
    sets = (after or {}).get("sets") or {}
    if not sets:
        parts = [before_after_table(before, after)]
    else:
        parts = [before_after_table(((before or {}).get("sets") or {}).get(name), h, set_name=f"held-out set: {name}")
                 for name, h in sets.items()]
    util = (after or {}).get("utility") or {}
    if util:
        from cada_jax.eval.report import format_table

        rows = []
        for name, a in util.items():
            b = ((before or {}).get("utility") or {}).get(name)
            cell = lambda u: f"{100 * u['accuracy']:.1f}% [{100 * u['ci95'][0]:.1f}, {100 * u['ci95'][1]:.1f}]"
            rows.append([name, cell(b) if b else "n/a", cell(a), f"{a['p_value']:.3f}" if "p_value" in a else "n/a", str(a["n"])])
        parts.append("utility (multiple choice, log-likelihood)\n"
                     + format_table(["set", "before", "after", "McNemar p", "items"], rows, {}))
    return "\n\n".join(parts)


def _with_utility(h: dict | None, eval_dir: str, before_dir: str | None = None) -> dict | None:
    """`h` plus its utility accuracies (and, for the final model, McNemar's test against the start)."""
    if h is None:
        return None
    util = utility_of(eval_dir)
    if not util:
        return h
    start = utility_of(before_dir) if before_dir else None
    from cada_jax.eval.metrics import mcnemar_exact

    h["utility"] = {}
    for name, u in util.items():
        entry = {k: u[k] for k in ("accuracy", "ci95", "n")}
        b = (start or {}).get(name)
        if b and b.get("ids") == u.get("ids"):
            entry["p_value"] = mcnemar_exact(u["correct"], b["correct"])["p_value"]
        h["utility"][name] = entry
    return h


def _copy_model(src: str, dst: str) -> None:
    from cada_jax.checkpoints.safetensors_io import check_publish_target, publish_dir

    check_publish_target(dst)
    tmp = tempfile.mkdtemp(prefix=".tmp-final-", dir=os.path.dirname(os.path.abspath(dst)))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        publish_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Keys a rerun of a pipeline may change once some stage is done: how it is shown, which stages run,
# how it talks to a judge. Anything else would leave finished stages built on another config.
RERUN_MAY_CHANGE = (
    "run.progress", "run.log_every", "pipeline.stages", "checkpoint.async_save", "judge.max_concurrency",
    "judge.timeout_s", "judge.max_retries", "judge.cache_dir", "eval.batch_size", "generate.batch_size", "mesh.",
)


def _check_rerun(cfg: Config, run_dir: str, state: dict) -> None:
    """A rerun with finished stages must use the config they were built with."""
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    if not state.get("done") or not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = yaml.safe_load(f)
    changes = config_changes(saved, to_dict(cfg), RERUN_MAY_CHANGE, defaults=to_dict(Config())) if isinstance(saved, dict) else []
    if changes:
        shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        raise PipelineError(
            f"{run_dir}: stages {', '.join(sorted(state['done']))} were run with another config ({shown}); "
            "rerun with the same config to resume, or start fresh with another run.name"
        )


def run_pipeline(cfg: Config) -> dict:
    """Run (or resume) the configured stages; returns a summary with the before/after numbers.

    The run folder is locked while it runs; a rerun must use the config its finished stages used."""
    from cada_jax.sharding import is_main_process

    run_dir = os.path.abspath(cfg.run.dir)
    with run_lock(run_dir, enabled=is_main_process()):
        return _run_pipeline(cfg, run_dir)


def _run_pipeline(cfg: Config, run_dir: str) -> dict:
    from cada_jax.checkpoints.gguf_import import resolve_model

    check_judges(cfg)
    if "eval" in cfg.pipeline.stages:
        check_eval_sets(cfg)  # a bad held-out or utility set fails before any model loads
    if "generate" in cfg.pipeline.stages:
        from cada_jax.cada.spec_config import check_spec_section

        check_spec_section(cfg.spec)  # a bad spec directory fails before any model loads
    os.makedirs(run_dir, exist_ok=True)
    state = _read_state(run_dir)
    _check_rerun(cfg, run_dir, state)
    dump_yaml(cfg, os.path.join(run_dir, "config.yaml"))
    done = state.setdefault("done", {})
    stages = list(cfg.pipeline.stages)
    t_start = time.perf_counter()
    base_dir = resolve_model(cfg.model.path)
    current = done.get("current_model", base_dir)
    loaded: dict[str, _Model] = {}

    def model(path: str) -> _Model:
        if path not in loaded:
            loaded.clear()  # keep one model in memory at a time
            loaded[path] = _Model(cfg, path)
        return loaded[path]

    held_out: list[set[str]] = []

    def seen() -> set[str]:  # the training requests, which the held-out sets must not contain
        if not held_out:
            held_out.append(trained_prompts(cfg))
        return held_out[0]

    def finish(stage: str, info: dict) -> None:
        if info.get("preempted"):
            raise Preempted(f"{stage} stage stopped by a signal at step {info.get('steps')} after saving a checkpoint in "
                            f"{run_dir}/{stage}; rerun the same command to resume")
        done[stage] = info
        _write_state(run_dir, state)

    # 0. the starting model, for the before/after table
    before_dir = os.path.join(run_dir, "eval", "before")
    if "eval" in stages and cfg.pipeline.eval_before and "eval_before" not in done:
        _log(f"evaluating the starting model ({base_dir})")
        _evaluate(cfg, model(base_dir), before_dir, "before", seen())
        finish("eval_before", {"dir": before_dir})

    # 1. self-generation
    chains = os.path.join(run_dir, "generate", "chains.jsonl")
    requests = None
    if "generate" in stages and "generate" not in done:
        from cada_jax.cada.generate import generate_chains
        from cada_jax.cada.spec_config import configured_spec
        from cada_jax.sampling import SamplingParams

        g = cfg.generate
        requests = training_requests(cfg)
        if g.reasoning == "template":
            _log(f"template distillation ({g.variant}): reasoning from {TEMPLATE_SOURCE[g.variant]} templates, the model's own benign answers "
                 f"({g.n} samples each), for {len(requests)} requests")
        else:
            _log(f"self-generating chains ({g.variant}) for {len(requests)} requests, {g.n} samples each")
        m = model(base_dir)
        sp = SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, seed=g.seed)
        spec = configured_spec(cfg.spec, stage_model=(m.params, m.cfg, m.tokenizer, m.dir),
                               cache_dir=os.path.join(run_dir, "cache", "spec_embeddings"), dtype=cfg.model.dtype)
        summary = generate_chains(m.params, m.sampler, requests, variant=g.variant, n=g.n, sampling=sp, spec=spec,
                                  judge=judge_from_config(cfg, g.judge, m.dir), k=g.k_cases, batch_size=g.batch_size, out_path=chains,
                                  model_name=m.dir, progress=cfg.run.progress, scaffold=g.scaffold,
                                  fallback=g.fallback, cite_precedent=g.cite_precedent, reasoning=g.reasoning,
                                  min_chain_score=g.min_chain_score)
        m.sampler.release_weights()
        summary.pop("records")
        summary["sources"] = request_sources(requests)
        if "rl" in stages and not cfg.pipeline.rl_data and cfg.pipeline.rl_fresh:
            summary["rl_sources"] = request_sources(training_requests(cfg, fresh=True))
        summary["eval_sets"] = {name: v["records"] for name, v in eval_records(cfg, seen())[1].items()} if "eval" in stages else {}
        atomic_write_json(os.path.join(run_dir, "generate", "stats.json"), summary)
        if summary["kept"] == 0:
            raise PipelineError(
                f"{chains}: no generated chain passed the judge ({summary['prompts']} requests x {g.n} samples); "
                "raise generate.n or generate.max_new_tokens, or use a stronger model"
            )
        _log(f"kept {summary['kept']}/{summary['prompts']} chains (sample pass rate {summary['sample_pass_rate']:.2f})")
        finish("generate", {k: v for k, v in summary.items() if k != "records"})

    # 2. context distillation
    if "sft" in stages and "sft" not in done:
        from cada_jax.training.sft import train_sft

        data = cfg.sft.data or chains
        if not os.path.isfile(data):
            raise PipelineError(f"{data}: no SFT data; run the generate stage first or set sft.data")
        _log(f"SFT (context distillation) on {data}")
        loaded.clear()
        sub = dataclasses.replace(
            cfg,
            run=dataclasses.replace(cfg.run, out_dir=run_dir, name="sft"),
            model=dataclasses.replace(cfg.model, path=current),
            sft=dataclasses.replace(cfg.sft, data=data),
        )
        info = train_sft(sub)
        if info.get("preempted"):
            finish("sft", info)  # raises Preempted: the stage is not recorded as done
        current = os.path.join(run_dir, "sft", "final")
        done["current_model"] = current
        finish("sft", {"final": current, **{k: v for k, v in info.items() if isinstance(v, (int, float, str))}})

    # 3. reinforcement learning with the safety + format rewards
    if "rl" in stages and "rl" not in done:
        from cada_jax.cada.generate import check_records
        from cada_jax.cada.prompts import build_plain_messages
        from cada_jax.training.grpo import train_grpo
        from cada_jax.training.grpo_batch import read_prompt_records

        if cfg.pipeline.rl_data:
            raw = read_prompt_records(cfg.pipeline.rl_data, key="pipeline.rl_data")
        elif cfg.pipeline.rl_fresh:
            raw = training_requests(cfg, fresh=True)
            if not raw:
                raise PipelineError("pipeline.rl_fresh: no training requests after the ones generation took (generate.limit, or "
                                    "each generate.sources limit); lower the limits or set pipeline.rl_fresh=false")
        else:
            raw = requests if requests is not None else training_requests(cfg)
        raw = check_records(raw, cfg.pipeline.rl_data or cfg.generate.data or ("generate.sources" if cfg.generate.sources else "built-in train sets"))
        from cada_jax.cada.rewards import codes_for_category, codes_text_for  # also registers cada_safety, ...

        spec = pipeline_spec(cfg)
        records = []
        for r in raw:  # the codes the spec ties to each request's category reach the chain rubric
            category = r.get("category") or (spec.categories.guess(r["prompt"]) if isinstance(r["prompt"], str) else None)
            codes = codes_for_category(spec, category, r["label"])
            records.append({"prompt": build_plain_messages(r["prompt"]), "label": r["label"], "category": r.get("category"),
                            "codes": codes, "codes_text": codes_text_for(spec, codes)})
        rl = cfg.rl
        if not rl.rewards:
            rl = dataclasses.replace(rl, rewards=DEFAULT_RL_REWARDS)
        _log(f"RL (GRPO) from {current} on {len(records)} requests, {rl.steps} steps")
        loaded.clear()
        sub = dataclasses.replace(
            cfg,
            run=dataclasses.replace(cfg.run, out_dir=run_dir, name="rl"),
            model=dataclasses.replace(cfg.model, path=current),
            optim=dataclasses.replace(cfg.optim, lr=cfg.pipeline.rl_lr) if cfg.pipeline.rl_lr else cfg.optim,
            rl=rl,
        )
        info = train_grpo(sub, records=records)
        if info.get("preempted"):
            finish("rl", info)  # raises Preempted: the stage is not recorded as done
        current = os.path.join(run_dir, "rl", "final")
        done["current_model"] = current
        finish("rl", {"final": current, **{k: v for k, v in info.items() if isinstance(v, (int, float, str))}})

    final_dir = os.path.join(run_dir, "final")
    if current != base_dir and done.get("final_from") != current:
        _copy_model(current, final_dir)
        done["final_from"] = current
        _write_state(run_dir, state)

    # 4. evaluation of the final model, and the report
    after_dir = os.path.join(run_dir, "eval", "after")
    result: dict = {"run_dir": run_dir, "final": final_dir if current != base_dir else base_dir}
    if "eval" in stages:
        if "eval_after" not in done:
            _log(f"evaluating the final model ({current})")
            _evaluate(cfg, model(current), after_dir, "after", seen())
            finish("eval_after", {"dir": after_dir})
        from cada_jax.eval.report_run import build_run_report

        before = headline(os.path.join(before_dir, "results.jsonl")) if os.path.isdir(before_dir) else None
        before = _with_utility(before, before_dir)
        after = _with_utility(headline(os.path.join(after_dir, "results.jsonl")), after_dir, before_dir)
        result.update(before=before, after=after, table=headline_tables(before, after))
        atomic_write_json(os.path.join(run_dir, "headline.json"), {"before": before, "after": after})
        paths = build_run_report(run_dir, title=f"CADA pipeline: {cfg.run.name}")
        result["report"] = {k: str(v) for k, v in paths.items()} if isinstance(paths, dict) else str(paths)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result
