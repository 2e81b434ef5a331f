"""Judges built from the config's `judge` section: one place for every stage (generate's chain
filter, the RL rewards, the eval).

* ``rule``: no settings.
* ``llm``: a local model (``judge.model``, or the stage's own model when empty) answering the rubrics
  through our sampler, greedy, in batches of ``judge.batch_size``. With a `mesh` its weights are
  placed on it as the trainers place the policy's (`checkpoints.load.load_model`), and the sampler
  runs on it.
* ``http``: an OpenAI-compatible server (``judge.url``, ``judge.model``), its key read from the
  environment variable ``judge.api_key_env`` (never from a file), concurrent over
  ``judge.max_concurrency`` requests, cached on disk under ``judge.cache_dir``.
"""

from __future__ import annotations

import os
from typing import Callable

__all__ = ["JudgeConfigError", "check_judge_config", "judge_from_config", "local_llm_judge", "sampler_generate_fn"]


class JudgeConfigError(ValueError):
    """A configured judge that cannot be built; the message names the key and the fix."""


def check_judge_config(judge_section, names) -> None:
    """Fail before any model loads when one of the judges `names` cannot be built."""
    if "http" in set(names):
        if not judge_section.url or not judge_section.model:
            raise JudgeConfigError("an http judge needs judge.url (an OpenAI-compatible base URL) and judge.model (the served model name)")
        if not os.environ.get(judge_section.api_key_env, "").strip():
            raise JudgeConfigError(f"the http judge reads its API key from ${judge_section.api_key_env}, which is not set; "
                                   "export it (keys never go in configs)")


def sampler_generate_fn(sampler, params, sp, batch_size: int = 16) -> Callable[[list[list[dict]]], list[str]]:
    """`generate_fn(list_of_message_lists) -> list[str]` backed by our sampler (for `LLMJudge`):
    conversations sorted by length and sampled `batch_size` at a time, replies in input order."""

    def generate_fn(conversations: list[list[dict]]) -> list[str]:
        conversations = list(conversations)
        if not conversations:
            return []
        ids = sampler.encode_prompts(conversations)
        order = sorted(range(len(conversations)), key=lambda i: len(ids[i]))
        texts: list[str] = [""] * len(conversations)
        for s in range(0, len(order), batch_size):
            chunk = order[s: s + batch_size]
            res = sampler.generate(params, [conversations[i] for i in chunk], sp, prompt_ids=[list(ids[i]) for i in chunk])
            for pos, i in enumerate(chunk):
                texts[i] = res.texts[pos * sp.n]
        return texts

    return generate_fn


def local_llm_judge(model: str, *, batch_size: int = 16, max_new_tokens: int = 160, dtype: str | None = None,
                    max_seq_len: int | None = None, mesh=None, progress: bool = False):
    """An `llm` judge backed by a local model directory (or `smollm2-135m-instruct`) and our sampler."""
    from cada_jax.checkpoints.load import load_model
    from cada_jax.rewards.judges import make_judge
    from cada_jax.sampling import Sampler, SamplingParams

    m = load_model(model, dtype, mesh=mesh, progress=progress)
    sampler = Sampler(m.config, m.tokenizer, max_seq_len=max_seq_len, mesh=mesh if mesh is not None and mesh.size > 1 else None)
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, truncate_prompt="left")
    return make_judge("llm", generate_fn=sampler_generate_fn(sampler, m.params, sp, batch_size))


def judge_from_config(cfg, name: str, model_dir: str = "", *, mesh=None):
    """The judge `name` (rule | llm | http | a registered one) with the settings of ``cfg.judge``.

    `model_dir`: the stage's own model, judging for an `llm` judge when ``judge.model`` is empty."""
    import cada_jax.rewards.http_judge  # noqa: F401  (registers the rule, llm and http judges)
    from cada_jax.rewards.judges import make_judge

    j = cfg.judge
    check_judge_config(j, [name])
    if name == "http":
        from cada_jax.rewards.http_judge import DEFAULT_CACHE_DIR

        return make_judge("http", base_url=j.url, model=j.model, api_key_env=j.api_key_env,
                          max_concurrency=j.max_concurrency, timeout_s=j.timeout_s, max_retries=j.max_retries,
                          cache_dir=j.cache_dir or DEFAULT_CACHE_DIR)
    if name == "llm":
        if not (j.model or model_dir):
            raise JudgeConfigError("an llm judge needs judge.model (a model directory or smollm2-135m-instruct)")
        return local_llm_judge(j.model or model_dir, batch_size=j.batch_size, max_new_tokens=j.max_new_tokens,
                               dtype=cfg.model.dtype, mesh=mesh, progress=cfg.run.progress)
    return make_judge(name)
