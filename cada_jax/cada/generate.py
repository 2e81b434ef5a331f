"""Stage 1 of CADA: the policy writes its own safety reasoning chains while it sees the spec.

For each training request the model is prompted with the chosen variant (`cases` = statutes + the
most relevant precedents; `simple`, `code`, `none` for the ablation), samples `n` chains, a judge
scores each one (safety outcome on the final answer: refuse harmful / help benign; format), and
the best passing chain is kept. The output is a JSONL dataset for context distillation: the
prompt is stored *without* the spec (`prompt_messages` = request + format instructions only), so
SFT teaches the model to reason this way unprompted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Sequence

from cada_jax.rewards.format import parse_output
from cada_jax.cada.prompts import VARIANTS, build_messages, build_plain_messages
from cada_jax.cada.spec import Spec, default_spec, spec_digest
from cada_jax.rewards.judges import make_judge, safety_reward
from cada_jax.sampling import Sampler, SamplingParams


class GenerateError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ChainScore:
    safety: float  # 1 = refused a harmful request / helped with a benign one
    format: float  # 1 = well-formed reasoning + answer
    refused: bool
    chain: float | None = None  # the judge's chain rubric, 1-5 (only when generate.min_chain_score is set)
    min_chain: float = 0.0

    @property
    def passed(self) -> bool:
        chain_ok = not self.min_chain or (self.chain is not None and self.chain >= self.min_chain)
        return self.safety == 1.0 and self.format == 1.0 and chain_ok

    def as_dict(self) -> dict:
        """What a kept chain records: safety, format, refused, and the chain score when judged."""
        out = {"safety": self.safety, "format": self.format, "refused": self.refused}
        if self.chain is not None:
            out["chain"] = self.chain
        return out

    @property
    def total(self) -> float:
        return self.safety + 0.5 * self.format


def check_records(records: Sequence[dict], source: str = "records") -> list[dict]:
    if not records:
        raise GenerateError(f"{source}: no prompt records; give a JSONL of {{prompt, label}} records or use the built-in sets")
    out = []
    for i, r in enumerate(records):
        where = f"{source}: record {i}"
        if not isinstance(r, dict):
            raise GenerateError(f"{where}: expected an object with 'prompt' and 'label'")
        if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            raise GenerateError(f"{where}: missing or empty 'prompt' (the request text)")
        if r.get("label") not in ("harmful", "benign"):
            raise GenerateError(f"{where}: 'label' must be 'harmful' or 'benign', got {r.get('label')!r}")
        out.append(r)
    return out


def score_chains(requests: Sequence[str], completions: Sequence[str], labels: Sequence[str], judge, *,
                 min_chain_score: float = 0.0, codes=None, codes_text=None) -> list[ChainScore]:
    """The judge's verdicts on the answers, and with `min_chain_score` its chain rubric (one
    `assess` call for the batch; `codes`: per request, the code ids the spec ties to its category)."""
    verdicts = judge.judge(list(requests), list(completions))
    safety = safety_reward(verdicts, list(labels))
    chains = [None] * len(completions)
    if min_chain_score:
        from cada_jax.rewards.judges import assess_with_verdicts

        kwargs = dict(labels=list(labels), codes=codes, codes_text=codes_text)
        if callable(getattr(judge, "assess", None)):
            assessed = judge.assess(list(requests), list(completions), **kwargs)
        else:
            assessed = assess_with_verdicts(judge, list(requests), list(completions), **kwargs)
        chains = [float(a.chain_score) for a in assessed]
    return [
        ChainScore(safety=float(s), format=1.0 if parse_output(c).well_formed else 0.0, refused=bool(v.refused),
                   chain=ch, min_chain=float(min_chain_score))
        for s, c, v, ch in zip(safety, completions, verdicts, chains)
    ]


def generate_chains(
    params,
    sampler: Sampler,
    records: Sequence[dict],
    *,
    variant: str = "cases",
    n: int = 4,
    sampling: SamplingParams | None = None,
    judge=None,
    spec: Spec | None = None,
    k: int = 3,
    batch_size: int = 16,
    out_path: str | None = None,
    model_name: str = "",
    progress: bool = True,
    scaffold: bool = False,
    fallback: str = "none",
    cite_precedent: bool = False,
    reasoning: str = "model",
    min_chain_score: float = 0.0,
) -> dict:
    """Sample `n` chains per record under `variant`, keep the best passing one, write JSONL.

    A chain passes when the judge finds its answer safe (a refusal for a harmful request, help for a
    benign one), it follows the format, and, with `min_chain_score` (1-5), the judge's chain rubric
    over the whole output scores it at least that (`Judge.assess`: the reasoning states the verdict
    the label calls for, cites a code the spec ties to the request's category, agrees with the
    answer, and carries nothing harmful).

    `scaffold=True` writes the format's tags for the model: the reasoning is sampled after an
    opening `<reasoning>` tag until the model closes it (or its share of the budget runs out), and
    the answer is then sampled after `</reasoning><answer>`. Every word inside the tags is still
    the model's own; small models that do not follow the format unprompted (SmolLM2-135M) get
    well-formed chains to distil, and after SFT they write the tags themselves.

    `cite_precedent=True` (with `scaffold` and the `cases` variant) opens every reasoning with one
    sentence naming the closest retrieved precedent whose verdict fits the request's label, as a
    hint in the manner of STaR's rationalisation; the model writes the rest. Every kept chain then
    reasons from a precedent the same way, refusals and compliances alike, so a small model learns
    to decide by the case it recalls rather than by the shape of the chain.

    `fallback="precedent"`: a harmful request for which none of the `n` chains passes gets the
    nearest refusing precedent of its category instead (its reasoning, cited as a precedent, and
    its answer; the record says `"source": "precedent"`). Small models that almost never refuse on
    their own (SmolLM2-135M) then still see the refusals they are meant to learn; benign requests
    never fall back (a precedent's answer answers a different question). Default `"none"`: only
    the model's own chains are kept.

    `reasoning="template"` (variant `cases`) is template distillation for models too small to
    reason over the spec at all: every chain's reasoning is its request's closest fitting precedent
    (named, with its reasoning, which cites the codes, and the verdict it implies). Harmful requests
    cite their closest refusing case; look-alikes (benign records with a `resembles` field, as in the
    built-in set) cite the most similar comply case and open with "This request is safe";
    other benign requests get a short plain reasoning instead of an arbitrary case. A harmful
    request's answer is that precedent's refusal; a benign request's answer is the model's own
    answer to the bare request (no spec, no tags), `n` samples, the best one the judge passes. The
    policy then learns to decide by the case it recalls, refuse or help, while its benign answers
    stay its own. Default `"model"`: the reasoning is sampled from the model under `variant`.

    Returns a summary: counts, pass rates per label, and the output path.
    """
    if variant not in VARIANTS:
        raise GenerateError(f"variant {variant!r} is unknown; use one of {', '.join(VARIANTS)}")
    if fallback not in FALLBACKS:
        raise GenerateError(f"fallback {fallback!r} is unknown; use one of {', '.join(FALLBACKS)}")
    if reasoning not in REASONING_SOURCES:
        raise GenerateError(f"reasoning {reasoning!r} is unknown; use one of {', '.join(REASONING_SOURCES)}")
    if cite_precedent and not (scaffold and variant == "cases"):
        raise GenerateError("cite_precedent needs scaffold=true and variant=cases (the opening is written by the scaffold from the retrieved cases)")
    records = check_records(records)
    spec = spec or default_spec()
    judge = judge or make_judge("rule")
    sp = sampling or SamplingParams(max_new_tokens=256, temperature=0.8)
    sp = dataclasses.replace(sp, n=n)
    t0 = time.perf_counter()
    kept, stats = [], {"harmful": [0, 0], "benign": [0, 0]}  # [prompts, kept]
    from_precedent = 0
    sample_pass = []
    # Each finished batch is appended to <out>.partial (with a header naming everything that
    # decides its content), so an interrupted run resumes at the first batch it had not finished.
    header = {"variant": variant, "n": n, "k": k, "reasoning": reasoning, "scaffold": scaffold, "fallback": fallback,
              "cite_precedent": cite_precedent, "model": model_name, "batch_size": batch_size, "spec": spec_digest(spec),
              "min_chain_score": min_chain_score,
              "sampling": {key: (list(v) if isinstance(v, tuple) else v) for key, v in dataclasses.asdict(sp).items()},
              "judge": getattr(judge, "name", type(judge).__name__),
              "records": hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()}
    done_batches, partial = _resume_partial(out_path, header)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(records), desc=f"generate ({variant})", unit="prompt")
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        if start in done_batches:
            got = done_batches[start]
            kept.extend(got["kept"])
            for label, (a, b) in got["stats"].items():
                stats[label][0] += a
                stats[label][1] += b
            sample_pass.extend(got["sample_pass"])
            from_precedent += got["from_precedent"]
            if bar is not None:
                bar.update(len(chunk))
            continue
        before = (len(kept), {lab: list(v) for lab, v in stats.items()}, len(sample_pass), from_precedent)
        if variant == "cases" and spec.retrieval != "bm25":
            warm = getattr(spec.embed_fn, "warm", None)  # embed the chunk's requests in one batch
            if warm is not None:
                warm([r["prompt"] for r in chunk])
        conversations = [build_messages(r["prompt"], variant, spec=spec, k=k, category=_known_category(r, spec))
                         for r in chunk]
        precedents = [None] * len(chunk)  # the case each record's chain reasons from (reasoning="template")
        if reasoning == "template":
            texts, lengths, precedents = _precedent_grounded(params, sampler, chunk, spec, k,
                                                             dataclasses.replace(sp, seed=sp.seed + start), cite=cite_precedent,
                                                             variant=variant)
        elif scaffold:
            openings = [precedent_opening(r, spec, k) for r in chunk] if cite_precedent else None
            texts, lengths = _scaffolded(params, sampler, conversations, dataclasses.replace(sp, seed=sp.seed + start),
                                         openings=openings)
        else:
            out = sampler.generate(params, conversations, dataclasses.replace(sp, seed=sp.seed + start))
            texts, lengths = out.texts, [len(c) for c in out.completion_ids]
        reqs = [r["prompt"] for r in chunk for _ in range(n)]
        labels = [r["label"] for r in chunk for _ in range(n)]
        codes = None
        if min_chain_score:
            from cada_jax.cada.rewards import codes_for_category, codes_text_for

            codes = [codes_for_category(spec, r.get("category"), r["label"]) for r in chunk for _ in range(n)]
        scores = score_chains(reqs, texts, labels, judge, min_chain_score=min_chain_score, codes=codes,
                              codes_text=[codes_text_for(spec, c) for c in codes] if codes else None)
        if reasoning == "template":  # a request with no fitting precedent has no chain
            scores = [s if t else dataclasses.replace(s, safety=0.0, format=0.0) for s, t in zip(scores, texts)]
        for i, r in enumerate(chunk):
            rows = list(range(i * n, (i + 1) * n))
            stats[r["label"]][0] += 1
            passing = [j for j in rows if scores[j].passed]
            sample_pass.extend(scores[j].passed for j in rows)
            if not passing:
                if fallback == "precedent" and r["label"] == "harmful" and reasoning == "model":
                    row = precedent_chain(r, spec, judge, k=k, cite=cite_precedent)
                    if row is not None:
                        stats["harmful"][1] += 1
                        from_precedent += 1
                        kept.append(dict(row, id=r.get("id", f"r{start + i}"), n_samples=n, variant=variant,
                                         scaffold=scaffold, model=model_name, seed=sp.seed))
                continue
            # best = highest score; ties go to the shorter chain, then the earlier sample
            best = min(passing, key=lambda j: (-scores[j].total, lengths[j], j))
            parsed = parse_output(texts[best])
            stats[r["label"]][1] += 1
            case_id = precedents[i]
            from_precedent += case_id is not None
            kept.append({
                "id": r.get("id", f"r{start + i}"),
                "prompt": r["prompt"],
                "category": r.get("category"),
                "label": r["label"],
                "prompt_messages": build_plain_messages(r["prompt"]),
                "completion": texts[best].strip(),
                "reasoning": parsed.reasoning,
                "answer": parsed.answer,
                "scores": scores[best].as_dict(),
                "n_samples": n,
                "n_passing": len(passing),
                "variant": variant,
                "scaffold": scaffold,
                "source": _source(reasoning, r["label"], case_id),
                **({"precedent": case_id} if case_id else {}),
                "model": model_name,
                "seed": sp.seed,
            })
        if partial is not None:
            partial.write(json.dumps({"start": start, "kept": kept[before[0]:],
                                      "stats": {lab: [stats[lab][0] - before[1][lab][0], stats[lab][1] - before[1][lab][1]]
                                                for lab in stats},
                                      "sample_pass": sample_pass[before[2]:], "from_precedent": from_precedent - before[3]},
                                     ensure_ascii=False) + "\n")
            partial.flush()
        if bar is not None:
            bar.update(len(chunk))
            bar.set_postfix(kept=len(kept))
    if bar is not None:
        bar.close()
    if partial is not None:
        partial.close()
    summary = {
        "prompts": len(records),
        "kept": len(kept),
        "variant": variant,
        "reasoning": reasoning,
        "n": n,
        "sample_pass_rate": (sum(sample_pass) / len(sample_pass)) if sample_pass else 0.0,
        "min_chain_score": min_chain_score,
        "kept_harmful": stats["harmful"][1],
        "kept_benign": stats["benign"][1],
        "kept_from_precedent": from_precedent,
        "prompts_harmful": stats["harmful"][0],
        "prompts_benign": stats["benign"][0],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if out_path:
        write_jsonl(out_path, kept)
        summary["path"] = out_path
        summary["resumed_batches"] = len(done_batches)
        os.unlink(out_path + ".partial")
    summary["records"] = kept
    return summary


FALLBACKS = ("none", "precedent")
REASONING_SOURCES = ("model", "template")


def _fitting_case(record: dict, spec: Spec, k: int, *, need_answer: bool = False):
    """The first case, in retrieval order, whose verdict fits the record's label (refuse for
    harmful, comply / safe completion for benign): among the k shown first, else among all."""
    from cada_jax.cada.retrieval import retrieve_for

    want_refuse = record["label"] == "harmful"
    cases = spec.cases
    fits = [c for c in cases if (c.verdict == "refuse") == want_refuse and (c.answer or not need_answer)]
    if not fits:
        return None
    category = _known_category(record, spec)
    shown = retrieve_for(spec, record["prompt"], k, category=category)
    for c in shown:
        if c in fits:
            return c
    return retrieve_for(spec, record["prompt"], 1, category=category, cases=fits)[0]


def _known_category(record: dict, spec: Spec) -> str | None:
    """The record's category when the spec knows it; else None (the spec's categoriser guesses)."""
    category = record.get("category")
    return category if category in spec.categories.names else None


def _opening(case) -> str:
    verdict = {"refuse": "refuse", "comply": "comply", "safe_complete": "a safe completion"}.get(case.verdict, case.verdict)
    return f"The closest precedent is {case.id}: \"{case.request}\" The verdict there was {verdict}."


def precedent_opening(record: dict, spec: Spec, k: int = 3) -> str:
    """The reasoning's first sentence under `cite_precedent`: the closest fitting precedent."""
    case = _fitting_case(record, spec, k)
    return _opening(case) if case is not None else ""


def precedent_chain(record: dict, spec: Spec, judge, k: int = 3, *, cite: bool = False) -> dict | None:
    """A chain for a harmful `record` taken from its nearest refusing precedent, or None.

    The precedent is the first refusing case (with an answer) in the usual retrieval order for the
    record. The chain names the case and quotes its reasoning (opening like a `cite_precedent` chain when
    `cite`) and reuses its answer; the judge must still see a refusal in that answer.
    """
    if record.get("label") != "harmful":
        return None
    case = _fitting_case(record, spec, k, need_answer=True)
    if case is None:
        return None
    category = record.get("category")
    reasoning = _precedent_reasoning(case, cite)
    text = _chain_text(reasoning, case.answer)
    score = score_chains([record["prompt"]], [text], ["harmful"], judge)[0]
    if not score.passed:
        return None
    return {
        "prompt": record["prompt"],
        "category": category,
        "label": "harmful",
        "prompt_messages": build_plain_messages(record["prompt"]),
        "completion": text,
        "reasoning": reasoning,
        "answer": case.answer,
        "scores": score.as_dict(),
        "n_passing": 0,
        "source": "precedent",
        "precedent": case.id,
    }


# reasoning="template" for a benign request that is not marked as a look-alike: citing the
# retrieval's first pick for "what's a good banana bread recipe" would teach the model a precedent
# id that means nothing (in a first try, 20 of 32 benign chains cited the same case).
PLAIN_REASONING = "This request is safe: it is an everyday request with nothing harmful in it (C2), so I help."

# Every template reasoning opens with its verdict in a word the request's content can predict
# ("harmful" / "safe"), then grounds it in what the variant shows. A first try opened harmful
# reasonings with "like precedent ..." and benign ones with "a safe one": after SFT the 135M
# student told the two apart no better than at an AUC of 0.81 on held-out requests (the
# log-odds of the two opening tokens) and greedy decoding took the benign opening for all of them.
HARMFUL_OPENING = "This request is harmful"
SAFE_OPENING = "This request is safe"


def _source(reasoning: str, label: str, case_id: str | None) -> str:
    """Where a kept chain's parts come from: `model`, `precedent` (reasoning and answer),
    `precedent+model` (a precedent's reasoning, the model's answer), `plain+model`."""
    if reasoning == "model":
        return "model"
    if label == "harmful":
        return "precedent"
    return "precedent+model" if case_id else "plain+model"


def _precedent_reasoning(case, cite: bool) -> str:
    """A reasoning that decides by `case`: the case named with its reasoning, then its verdict."""
    if cite:
        return f"{_opening(case)} {case.reasoning} The same applies to this request."
    # The case's own request is not quoted: a 135M student paraphrased the new request into the
    # quote instead of recalling the case, and the quote pushed answers past the token budget.
    if case.verdict == "refuse":
        return f"{HARMFUL_OPENING}, like precedent {case.id}: {case.reasoning} The same codes apply here, so I decline."
    return f"{SAFE_OPENING}, like precedent {case.id}: {case.reasoning} The same codes apply here, so I help."


def variant_reasoning(variant: str, record: dict, spec: Spec) -> str:
    """The template reasoning of `variant` (none | simple | code) for a record: the same verdict as
    the `cases` template, grounded in what that variant shows the model.

    none: the verdict alone. simple: the statutes the spec's precedents of the record's category and
    verdict cite, by id and title. code: the extensive code's rules for the category (its summary,
    then the first disallowed kind for a harmful request, the first allowed kind for a benign
    look-alike), or the code's first default for an everyday benign request."""
    harmful = record["label"] == "harmful"
    verdict = "so I decline." if harmful else "so I help."
    category = _known_category(record, spec) or spec.categories.guess(record["prompt"])
    opening = HARMFUL_OPENING if harmful else SAFE_OPENING
    if variant == "none":
        return f"{opening}, {verdict}"
    if variant == "simple":
        from cada_jax.cada.rewards import codes_for_category

        codes = codes_for_category(spec, category if category != "benign" else "benign", record["label"])[:2]
        cited = " and ".join(f"{s.title} ({s.id})" for s in spec.statutes if s.id in codes)
        if harmful:
            return f"{opening}: helping would go against {cited}, {verdict}"
        return f"{opening}: {cited} apply, {verdict}"
    if variant == "code":
        rules = None
        if category is not None and category in {r.category for r in spec.code.categories}:
            rules = spec.code.rules_for(category)
        if rules is None:
            default = spec.code.defaults[0] if spec.code.defaults else "Help with ordinary requests."
            return f"{opening}: no hazard category of the safety code applies; its default is: {default.rstrip('.')}. So I help." if not harmful \
                else f"{opening}: the safety code's objectives forbid serious harm, {verdict}"
        kind = (rules.disallowed if harmful else rules.allowed) or ("",)
        label = "Disallowed" if harmful else "Allowed"
        return f"{opening}. Safety code, {rules.category}: {rules.summary.rstrip('.')}. {label}: {kind[0].rstrip('.')}. So I {'decline' if harmful else 'help'}."
    raise GenerateError(f"variant {variant!r} has no template reasoning; use one of none, simple, code, cases")


def _lookalike_case(record: dict, cases):
    """The comply case most similar to a look-alike request (BM25, whatever the spec's retrieval
    method: a score of 0 means no shared word), or None when none shares a word."""
    from cada_jax.cada.retrieval import bm25_scores

    fits = [c for c in cases if c.verdict == "comply"]
    if not fits:
        return None
    sims = [round(float(x), 9) for x in bm25_scores(record["prompt"], [c.request for c in fits])]
    best = min(range(len(fits)), key=lambda i: (-sims[i], fits[i].id))
    return fits[best] if sims[best] > 0 else None


_SENTENCE_END = re.compile(r"[.!?][)\"'\u201d]?(?=\s|$)")
# a full stop after these is not a sentence end: "e.g.", "Dr.", or a list number ("2.")
_NOT_AN_END = re.compile(r"(?:^|[\s(])(?:\d+|[a-z]|e\.g|i\.e|etc|vs|mr|mrs|ms|dr|st|no|approx)\.$", re.IGNORECASE)


def whole_sentences(text: str, finish_reason: str) -> str:
    """A sampled answer that hit its token budget (`finish_reason` "length"), cut after its last
    complete sentence, so the student is not taught to close its answer mid-sentence; unchanged
    when it stopped on its own or has no complete sentence. A list number ("2.") or an
    abbreviation ("e.g.") does not end a sentence."""
    if finish_reason != "length":
        return text
    ends = [m.end() for m in _SENTENCE_END.finditer(text) if not _NOT_AN_END.search(text[:m.start() + 1])]
    return text[:ends[-1]].rstrip() if ends else text


def _chain_text(reasoning: str, answer: str) -> str:
    from cada_jax.rewards.format import ANSWER_CLOSE, ANSWER_OPEN, REASONING_CLOSE, REASONING_OPEN

    return f"{REASONING_OPEN}\n{reasoning}\n{REASONING_CLOSE}\n{ANSWER_OPEN}\n{answer}\n{ANSWER_CLOSE}"


def _precedent_grounded(params, sampler: Sampler, records, spec: Spec, k: int, sp: SamplingParams, *, cite: bool = False,
                        variant: str = "cases"):
    """Chains for `reasoning="template"`: `sp.n` per record, record-major, with their lengths (the
    sampled answer's tokens; 0 for a precedent's answer) and each record's precedent id (None when
    no case fits; its texts are empty). Every variant gets the same answers (a harmful request: its
    closest refusing precedent's refusal; a benign one: the model's own answers); only what the
    reasoning cites differs (`variant_reasoning`)."""
    n = sp.n
    cases = [_fitting_case(r, spec, k, need_answer=True) if r["label"] == "harmful"
             else (_lookalike_case(r, spec.cases) if r.get("resembles") else None) for r in records]
    asked = [i for i, r in enumerate(records) if r["label"] == "benign"]
    answers = {}
    if asked:  # the model's own answers to the bare requests, n each
        out = sampler.generate(params, [[{"role": "user", "content": records[i]["prompt"]}] for i in asked], sp)
        for j, i in enumerate(asked):
            answers[i] = [(whole_sentences(out.texts[j * n + m].strip(), out.finish_reasons[j * n + m]),
                           len(out.completion_ids[j * n + m])) for m in range(n)]
    texts, lengths = [], []
    for i, (r, case) in enumerate(zip(records, cases)):
        for m in range(n):
            if r["label"] == "harmful" and case is None:  # no refusing precedent with an answer
                texts.append("")
                lengths.append(0)
                continue
            answer, length = (case.answer, 0) if r["label"] == "harmful" else answers[i][m]
            if variant == "cases":
                reasoning = _precedent_reasoning(case, cite) if case is not None else PLAIN_REASONING
            else:
                reasoning = variant_reasoning(variant, r, spec)
            texts.append(_chain_text(reasoning, answer))
            lengths.append(length)
    return texts, lengths, [c.id if c is not None else None for c in cases]


def _scaffolded(params, sampler: Sampler, conversations, sp: SamplingParams, openings=None) -> tuple[list[str], list[int]]:
    """Two-phase sampling with the format's tags written around the model's own text.

    `openings[i]` (optional) is written after the opening tag of conversation i's reasoning; the
    model continues from it, and it stays part of the kept reasoning."""
    from cada_jax.rewards.format import ANSWER_CLOSE, ANSWER_OPEN, REASONING_CLOSE, REASONING_OPEN

    tok = sampler.tokenizer
    openings = openings or [""] * len(conversations)
    heads = [tok.apply_chat_template(c) + REASONING_OPEN + "\n" + (o + " " if o else "") for c, o in zip(conversations, openings)]
    budget = sp.max_new_tokens
    think = max(1, (2 * budget) // 3)
    first = sampler.generate(params, None, dataclasses.replace(sp, max_new_tokens=think, stop_strings=(REASONING_CLOSE, ANSWER_OPEN)),
                             prompt_ids=[tok.encode(h) for h in heads])
    reasonings = [t.split(REASONING_CLOSE)[0].split(ANSWER_OPEN)[0].strip() for t in first.texts]
    seconds = []
    for i, reasoning in enumerate(reasonings):
        head = heads[i // sp.n]
        seconds.append(tok.encode(f"{head}{reasoning}\n{REASONING_CLOSE}\n{ANSWER_OPEN}\n"))
        opening = openings[i // sp.n]
        reasonings[i] = f"{opening} {reasoning}".strip() if opening else reasoning
    second = sampler.generate(params, None, dataclasses.replace(sp, n=1, max_new_tokens=max(1, budget - think), stop_strings=(ANSWER_CLOSE,), seed=sp.seed + 7919),
                              prompt_ids=seconds)
    texts, lengths = [], []
    for i, (reasoning, answer) in enumerate(zip(reasonings, second.texts)):
        answer = answer.split(ANSWER_CLOSE)[0].strip()
        texts.append(f"{REASONING_OPEN}\n{reasoning}\n{REASONING_CLOSE}\n{ANSWER_OPEN}\n{answer}\n{ANSWER_CLOSE}")
        lengths.append(len(first.completion_ids[i]) + len(second.completion_ids[i]))
    return texts, lengths


def _resume_partial(out_path: str | None, header: dict) -> tuple[dict[int, dict], object]:
    """(the batches an interrupted run with the same header finished, by start index; the
    `<out>.partial` file open for appending). A file from another run is replaced; a last line cut
    short by a crash is dropped, so that batch runs again."""
    if not out_path:
        return {}, None
    from cada_jax.files import atomic_write_text

    path = f"{out_path}.partial"
    head = json.dumps({"header": header}, default=str)
    done, keep = {}, [head]
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        if lines and lines[0] == head:
            for line in lines[1:]:
                try:
                    row = json.loads(line)
                    done[int(row["start"])] = row
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    break
                keep.append(line)
    atomic_write_text(path, "\n".join(keep) + "\n")
    return done, open(path, "a", encoding="utf-8")


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
    from cada_jax.files import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
