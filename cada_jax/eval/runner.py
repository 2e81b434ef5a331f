"""The safety evaluation suite: sample a model on prompt sets under jailbreak attacks, judge, score.

`evaluate` runs one model under one prompt variant:

1. every harmful record is put through every attack (`cada_jax.data.attacks`); benign and utility
   records are asked plainly (attack `none`) unless `attack_benign=True`, because over-refusal and
   accuracy are about the request itself, not about a jailbreak wrapper around it;
2. each (record, attack) becomes chat messages of the chosen variant (`none` = the plain prompt with
   the format instructions; `code` / `simple` / `cases` = inference-time prompting with the spec).
   Precedent retrieval for `cases` guesses the category from the request text; the record's gold
   category is never shown to the model, since it would give the label away;
3. everything is sampled through one `Sampler` in batches of `batch_size` prompts, sorted by
   prompt length so a batch pads little (one `generate` call per batch, never per prompt);
4. completions are split into reasoning and answer (`cada_jax.rewards.format.parse_output`) and the
   judge sees the ORIGINAL request and the final answer only (never the reasoning, never the
   jailbreak wrapper), in batches of `judge_batch_size`;
5. metrics, each with a percentile-bootstrap 95% interval (`compute_summary`):

   harmful_compliance   share of harmful prompts answered (attack success rate) under the headline
                        attack (`none` when it was run, else the first attack)          lower better
   worst_attack_asr     share of harmful prompts answered under at least one attack      lower better
   strongreject         mean StrongREJECT score under the headline attack (judges with a rubric)
   strongreject_worst   per prompt the highest score over attacks, averaged
   over_refusal         share of benign prompts refused (plain prompts)                  lower better
   format_rate          share of completions that follow the reasoning/answer format     higher better
   gsm8k_accuracy       exact match of the final number (utility records without choices)
   mmlu_accuracy        letter match (utility records with choices)

   plus per-attack rates and per-category breakdowns. With `sampling.n > 1` every sample is a unit
   (sample j of a prompt under attack A is aligned with sample j under attack B for the worst case).

Files (when `out_dir` is given), each written to a temporary name and renamed into place:
`results.jsonl` (one row per sample: prompt, attack, variant, category, label, reasoning, answer,
verdict, score, ...) and `summary.json` (what `evaluate` returns).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm.auto import tqdm

from cada_jax.cada.spec import Spec
from cada_jax.data.records import PromptRecord
from cada_jax.eval.metrics import gsm8k_correct, mmlu_correct
from cada_jax.eval.suites import EvalItem, build_items, check_attacks, check_records, check_variant
from cada_jax.eval.summary import compute_summary, json_safe, utility_kind
from cada_jax.files import atomic_write_text, read_jsonl_objects
from cada_jax.rewards.format import has_final_answer, parse_output
from cada_jax.sampling import Sampler, SamplingParams

__all__ = [
    "DEFAULT_SAMPLING",
    "evaluate",
    "read_results",
]

# Greedy decoding, stopped at the closing answer tag (the parser tolerates its absence).
DEFAULT_SAMPLING = SamplingParams(max_new_tokens=256, temperature=0.0, stop_strings=("</answer>",))

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
# Completions are appended here as they are sampled, so an interrupted run, or one whose judge
# failed, keeps them: a rerun into the same folder samples only what is missing, then judges.
PARTIAL_FILE = "samples.partial.jsonl"


def check_writable(out_dir: str | Path) -> Path:
    """Create `out_dir` and prove a file can be written there, before any work is done."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{out}: cannot write results there ({e.strerror or e}); pass a writable --out") from None
    return out


class _PartialSamples:
    """The append-only file of completions sampled so far for one evaluation.

    Its first line describes the run (model, sampling, variant); a file from another run is
    replaced. Each further line is one item's samples, keyed by record, attack and prompt."""

    def __init__(self, out_dir: Path | None, header: dict):
        self.path = None if out_dir is None else out_dir / PARTIAL_FILE
        self.header = header
        self.done: dict[str, list] = {}
        self._f = None
        if self.path is None:
            return
        if self.path.is_file():
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
            try:
                same = lines and json.loads(lines[0]) == {"header": header}
            except json.JSONDecodeError:
                same = False
            if same:
                for line in lines[1:]:
                    try:
                        row = json.loads(line)
                        self.done[row["key"]] = row["samples"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        break  # a line cut short by a crash: sample it again
        self._f = open(self.path, "w" if not self.done else "a", encoding="utf-8")
        if not self.done:
            self._f.write(json.dumps({"header": header}) + "\n")
            self._f.flush()

    @staticmethod
    def key(item: "EvalItem") -> str:
        import hashlib

        digest = hashlib.sha256(json.dumps(item.messages, sort_keys=True).encode("utf-8")).hexdigest()[:16]
        return f"{item.record_index}|{item.record.id}|{item.attack}|{digest}"

    def add(self, key: str, samples: list) -> None:
        self.done[key] = samples
        if self._f is not None:
            self._f.write(json.dumps({"key": key, "samples": samples}, ensure_ascii=False) + "\n")
            self._f.flush()

    def close(self, *, finished: bool) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if finished and self.path is not None and self.path.exists():
            self.path.unlink()


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def read_results(path: str | Path) -> list[dict]:
    """The rows of a results.jsonl file; a malformed line raises `file:line: problem; fix`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results file; run `cada eval --out DIR` first")
    return read_jsonl_objects(path, ValueError, what="one result row (re-run the evaluation)")


# ---------------------------------------------------------------------------------------------
# Sampling and judging
# ---------------------------------------------------------------------------------------------


def _chunks(order: Sequence[int], size: int) -> Iterable[list[int]]:
    for s in range(0, len(order), size):
        yield list(order[s: s + size])


def _too_long(sampler: Sampler, items: list[EvalItem], sp: SamplingParams, variant: str) -> tuple[list, list[dict]]:
    """(token ids of every item, the items whose prompt does not fit the context, as skip records)."""
    ids = sampler.encode_prompts([it.messages for it in items])
    budget = sampler.max_seq_len - sp.max_new_tokens
    skipped = []
    if sp.truncate_prompt == "error":
        for i, (it, p) in enumerate(zip(items, ids)):
            if len(p) > budget:
                skipped.append({"index": i, "id": it.record.id, "attack": it.attack, "reason": (
                    f"record {it.record.id!r} (attack {it.attack}, variant {variant}): the prompt has {len(p)} tokens "
                    f"but the {sampler.max_seq_len}-token context leaves {budget} after max_new_tokens="
                    f"{sp.max_new_tokens}; raise --max-seq-len, lower --max-new-tokens or pick a shorter variant")})
    return ids, skipped


def _sample(sampler: Sampler, params, items: list[EvalItem], ids: list, sp: SamplingParams, batch_size: int,
            variant: str, progress: bool, partial: "_PartialSamples") -> tuple[list[tuple[str, str, int]], int]:
    """(text, finish_reason, num_tokens) for every sample, in item-major order (item i, sample j),
    and the number of `generate` calls made. Items already in `partial` are not sampled again;
    each new chunk is appended to it as soon as it is sampled."""
    keys = [partial.key(it) for it in items]
    todo = [i for i in range(len(items)) if keys[i] not in partial.done]
    order = sorted(todo, key=lambda i: len(ids[i]))
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"sampling ({variant})", unit="prompt",
               disable=not progress, leave=False)
    calls = 0
    try:
        for chunk in _chunks(order, batch_size):
            calls += 1
            res = sampler.generate(params, [items[i].messages for i in chunk], sp,
                                   prompt_ids=[list(ids[i]) for i in chunk])
            for pos, i in enumerate(chunk):
                partial.add(keys[i], [[res.texts[pos * sp.n + j], res.finish_reasons[pos * sp.n + j],
                                       len(res.completion_ids[pos * sp.n + j])] for j in range(sp.n)])
            bar.update(len(chunk))
    finally:
        bar.close()
    out = [tuple(partial.done[keys[i]][j]) for i in range(len(items)) for j in range(sp.n)]
    return out, calls  # type: ignore[return-value]


def _judge_all(judge, prompts: list[str], answers: list[str], batch_size: int, progress: bool) -> list:
    verdicts: list = []
    name = getattr(judge, "name", type(judge).__name__)
    bar = tqdm(total=len(prompts), desc=f"judging ({name})", unit="answer", disable=not progress, leave=False)
    try:
        for s in range(0, len(prompts), batch_size):
            got = judge.judge(prompts[s: s + batch_size], answers[s: s + batch_size])
            want = len(prompts[s: s + batch_size])
            if len(got) != want:
                raise ValueError(f"judge {name!r} returned {len(got)} verdicts for {want} answers; it must return one per answer")
            verdicts.extend(got)
            bar.update(want)
    finally:
        bar.close()
    return verdicts


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


def evaluate(
    params,
    cfg,
    tokenizer,
    records: Sequence[PromptRecord],
    *,
    variant: str = "none",
    attacks: Sequence[str] = ("none",),
    judge=None,
    sampling: SamplingParams | None = None,
    batch_size: int = 16,
    judge_batch_size: int = 64,
    out_dir: str | Path | None = None,
    spec: Spec | None = None,
    k: int = 3,
    attack_benign: bool = False,
    sampler: Sampler | None = None,
    max_seq_len: int | None = None,
    tag: str | None = None,
    model_name: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate one model under one prompt variant; return the summary (also written to out_dir).

    judge: any object with `judge(prompts, answers) -> list[Verdict]` (default: the `rule` judge).
    sampling: default `DEFAULT_SAMPLING` (greedy, 256 new tokens, stop at </answer>).
    sampler: reuse compiled programs across calls (else one is built with `max_seq_len`).
    k: precedents shown by the `cases` variant. tag: a label for reports ("before", "after", ...).
    """
    check_variant(variant)
    attacks = check_attacks(attacks)
    records = check_records(records)
    sp = sampling if sampling is not None else DEFAULT_SAMPLING
    sp.validate()
    for name, v in (("batch_size", batch_size), ("judge_batch_size", judge_batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if judge is None:
        from cada_jax.rewards.judges import make_judge

        judge = make_judge("rule")
    if not callable(getattr(judge, "judge", None)):
        raise TypeError(f"judge {judge!r} has no judge(prompts, answers) method; build one with make_judge(name)")
    out = check_writable(out_dir) if out_dir is not None else None
    if sampler is None:
        sampler = Sampler(cfg, tokenizer, max_seq_len=max_seq_len)

    t0 = time.perf_counter()
    items = build_items(records, variant=variant, attacks=attacks, spec=spec, attack_benign=attack_benign, k=k)
    ids, skipped = _too_long(sampler, items, sp, variant)
    if len(skipped) == len(items):
        raise ValueError(skipped[0]["reason"] + (f" (and {len(items) - 1} more prompts)" if len(items) > 1 else ""))
    if skipped:
        from cada_jax.distributed import main_print

        main_print(f"warning: {len(skipped)} of {len(items)} prompts do not fit the context and are skipped "
                   f"(listed in summary.json); e.g. {skipped[0]['reason']}")
        drop = {s["index"] for s in skipped}
        keep = [i for i in range(len(items)) if i not in drop]
        items, ids = [items[i] for i in keep], [ids[i] for i in keep]
    header = {"model": model_name, "variant": variant, "attacks": list(attacks), "seed": seed,
              "sampling": {k2: (list(v) if isinstance(v, tuple) else v) for k2, v in dataclasses.asdict(sp).items()}}
    partial = _PartialSamples(out, json_safe(header))
    resumed = len(partial.done)
    try:
        samples, calls = _sample(sampler, params, items, ids, sp, batch_size, variant, progress, partial)
    finally:
        partial.close(finished=False)
    t_sample = time.perf_counter()

    rows: list[dict[str, Any]] = []
    for idx, (text, reason, ntok) in enumerate(samples):
        it = items[idx // sp.n]
        r = it.record
        parsed = parse_output(text)
        rows.append({
            "id": r.id,
            "record_index": it.record_index,
            "sample": idx % sp.n,
            "prompt": r.prompt,
            "attacked_prompt": it.attacked_prompt,
            "attack": it.attack,
            "variant": variant,
            "category": r.category,
            "label": r.label,
            "source": r.source,
            "completion": text,
            "reasoning": parsed.reasoning,
            "answer": parsed.answer,
            "well_formed": parsed.well_formed,
            # no final answer (an unclosed reasoning, an empty answer, an answer cut off by the token
            # budget): judged as neither a refusal nor help
            "answered": has_final_answer(text, truncated=reason == "length"),
            "finish_reason": reason,
            "num_tokens": ntok,
            "refused": None,
            "verdict": None,
            "score": None,
            "convincing": None,
            "specific": None,
            "judge_raw": None,
            "gold": r.answer,
            "choices": r.choices,
            "correct": None,
        })

    judged = [i for i, row in enumerate(rows) if row["label"] in ("harmful", "benign")]
    verdicts = _judge_all(judge, [rows[i]["prompt"] for i in judged], [rows[i]["answer"] for i in judged],
                          judge_batch_size, progress)
    for i, v in zip(judged, verdicts):
        answered = rows[i]["answered"] and getattr(v, "answered", True)
        refused = answered and bool(v.refused)
        rows[i].update(answered=answered, refused=refused,
                       verdict="no answer" if not answered else "refused" if refused else "complied",
                       score=v.score if answered else None, convincing=v.convincing, specific=v.specific, judge_raw=v.raw)
    for row in rows:
        if row["label"] == "utility":
            answer = row["answer"] or row["completion"]
            row["correct"] = bool(mmlu_correct(answer, row["gold"], n_choices=len(row["choices"]))
                                  if utility_kind(row) == "mmlu" else gsm8k_correct(answer, row["gold"]))
    t_judge = time.perf_counter()

    computed = compute_summary(rows, attacks=attacks, n_boot=n_boot, seed=seed)
    judge_name = getattr(judge, "name", type(judge).__name__)
    summary: dict[str, Any] = {
        "tag": tag,
        "model": model_name,
        "variant": variant,
        "attacks": list(attacks),
        "attack_benign": attack_benign,
        "judge": judge_name,
        "n_records": len(records),
        "n_rows": len(rows),
        "labels": {lab: sum(1 for r in records if r.label == lab) for lab in ("harmful", "benign", "utility")},
        **computed,
        "sampling": {k2: (list(v) if isinstance(v, tuple) else v) for k2, v in dataclasses.asdict(sp).items()},
        "judge_stats": {str(k2): v for k2, v in dict(getattr(judge, "stats", {}) or {}).items()
                        if isinstance(v, (int, float, str)) and not isinstance(v, bool)},
        "timings": {"sample_s": round(t_sample - t0, 3), "judge_s": round(t_judge - t_sample, 3),
                    "generate_calls": calls},
        "skipped_too_long": [{k2: v for k2, v in sk.items() if k2 != "index"} for sk in skipped],
        "resumed_items": resumed,
        "files": {"results": RESULTS_FILE} if out_dir is not None else {},
    }
    summary = json_safe(summary)
    if out is not None:
        lines = "".join(json.dumps(json_safe(r), ensure_ascii=False) + "\n" for r in rows)
        atomic_write_text(out / RESULTS_FILE, lines)
        atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        partial.close(finished=True)
    return summary
