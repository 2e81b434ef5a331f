"""Multiple-choice utility by log-likelihood: score every option of an item as a continuation of
its question and pick the most likely one (no sampling, no judge; suited to small models).

For a record with `choices`, option i is scored by the summed log-probability of the tokens of
`" " + choices[i]` after the plain-text context `f"Question: {question}\\nAnswer:"` (no chat
template). `question` is `meta["question"]` when the record has one (the MMLU and BIG-bench loaders
keep the bare question there; MMLU's `prompt` also lists the lettered options), else `prompt`.

Tokenisation: the context and the option are tokenised separately and their ids concatenated
(context with the tokenizer's own special tokens, e.g. a BOS where the model's tokenizer adds one;
the option without). So the option's tokens are exactly `encode(" " + option)` whatever a
tokenizer would merge across the boundary, and every option of an item shares one context.

The forward is the one that scores sampled completions for the GRPO reference model
(`cada_jax.training.grpo_batch.reference_logprob_fn`): contexts left-padded, options right-padded,
contexts to a multiple of 16 tokens and options to a multiple of 8 (most options are a few tokens),
batches to `batch_size` rows, so few programs are compiled and little of each row is padding.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cada_jax.data.records import OPTION_LETTERS, PromptRecord, option_index
from cada_jax.eval.metrics import bootstrap_ci
from cada_jax.training.grpo_batch import reference_logprob_fn

__all__ = ["LENGTH_BUCKET", "OPTION_BUCKET", "choice_logprobs", "mc_accuracy", "mc_context"]

LENGTH_BUCKET = 16  # contexts are padded to a multiple of this many tokens
OPTION_BUCKET = 8  # and options to a multiple of this many


def mc_context(record: PromptRecord) -> str:
    """The text an item's options continue: "Question: <question>\\nAnswer:"."""
    question = record.meta.get("question") if isinstance(record.meta, dict) else None
    if not isinstance(question, str) or not question.strip():
        question = record.prompt
    return f"Question: {question}\nAnswer:"


def _check_records(records: Sequence[PromptRecord]) -> None:
    for r in records:
        if not r.choices or len(r.choices) < 2:
            raise ValueError(f"record {r.id!r} ({r.source or 'records'}): no choices to score; a multiple-choice "
                             f"record needs at least 2 options in `choices`")
        if len(r.choices) > len(OPTION_LETTERS):
            raise ValueError(f"record {r.id!r}: {len(r.choices)} options; at most {len(OPTION_LETTERS)} are supported")


def _round_up(n: int, m: int = LENGTH_BUCKET) -> int:
    return max(m, -(-n // m) * m)


def choice_logprobs(params, cfg, tokenizer, records: Sequence[PromptRecord], *, batch_size: int = 16,
                    progress: bool = False) -> list[list[float]]:
    """Per record, the summed log-probability of each option (see the module docstring), in
    `choices` order. `tokenizer` is a `cada_jax.tokenizer.Tokenizer` (`encode`, `pad_id`)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"choice_logprobs: batch_size must be a positive int, got {batch_size!r}")
    _check_records(records)
    pairs: list[tuple[int, int, list[int], list[int]]] = []  # (record, option, context ids, option ids)
    for ri, r in enumerate(records):
        ctx = tokenizer.encode(mc_context(r), add_special_tokens=True)
        if not ctx:
            raise ValueError(f"record {r.id!r}: the context tokenises to nothing")
        for oi, option in enumerate(r.choices):
            pairs.append((ri, oi, ctx, tokenizer.encode(" " + str(option), add_special_tokens=False)))
    # similar lengths side by side: each batch pads little and the shapes repeat
    order = sorted(range(len(pairs)), key=lambda i: (_round_up(len(pairs[i][2])), _round_up(len(pairs[i][3]), OPTION_BUCKET), i))
    out: list[list[float]] = [[float("nan")] * len(r.choices) for r in records]
    score = reference_logprob_fn(cfg)
    pad = int(tokenizer.pad_id)
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="choice log-probs", unit="batch")
    for s in starts:
        chunk = [pairs[i] for i in order[s:s + batch_size]]
        rows = chunk + [chunk[0]] * (batch_size - len(chunk))  # a fixed batch size: one program per length bucket
        P = _round_up(max(len(c[2]) for c in rows))
        C = _round_up(max(len(c[3]) for c in rows), OPTION_BUCKET)
        ptok = np.full((batch_size, P), pad, np.int32)
        pmask = np.zeros((batch_size, P), np.int32)
        ctok = np.full((batch_size, C), pad, np.int32)
        cmask = np.zeros((batch_size, C), np.int32)
        for b, (_, _, ctx, opt) in enumerate(rows):
            ptok[b, P - len(ctx):] = ctx
            pmask[b, P - len(ctx):] = 1
            ctok[b, :len(opt)] = opt
            cmask[b, :len(opt)] = 1
        logp = np.asarray(score(params, ptok, pmask, ctok, cmask), np.float64)  # zero where cmask is 0
        totals = logp.sum(axis=1)
        for b, (ri, oi, _, _) in enumerate(chunk):
            out[ri][oi] = float(totals[b])
    return out


def mc_accuracy(params, cfg, tokenizer, records: Sequence[PromptRecord], *, n_boot: int = 1000, seed: int = 0,
                **kw: Any) -> dict[str, Any]:
    """Accuracy of the most likely option (`choice_logprobs`; ties go to the first option).

    A record is correct when the chosen letter is its `answer`, or one of `meta["answers"]` where
    an item has several correct options (BIG-bench's multiple_choice_grade credits any of them).
    Returns {accuracy, n, correct: [bool per record], ci95: [lo, hi] (percentile bootstrap over
    items, `metrics.bootstrap_ci`), predicted: [letter per record]}.
    """
    records = list(records)
    gold: list[set[int]] = []
    for r in records:
        n = len(r.choices or ())
        try:
            letters = [r.answer] + list((r.meta or {}).get("answers") or [])
            gold.append({option_index(letter, n) for letter in letters if letter is not None})
        except ValueError as e:
            raise ValueError(f"record {r.id!r} ({r.source or 'records'}): {e}") from None
        if not gold[-1]:
            raise ValueError(f"record {r.id!r} ({r.source or 'records'}): no gold answer; set `answer` to an option letter")
    scores = choice_logprobs(params, cfg, tokenizer, records, **kw)
    picked = [int(np.argmax(np.asarray(s))) for s in scores]  # argmax: the first of equal maxima
    correct = [p in g for p, g in zip(picked, gold)]
    lo, hi = bootstrap_ci(correct, n_boot=n_boot, seed=seed)
    return {
        "accuracy": float(np.mean(correct)) if correct else float("nan"),
        "n": len(records),
        "correct": correct,
        "ci95": [lo, hi],
        "predicted": [OPTION_LETTERS[p] for p in picked],
    }
