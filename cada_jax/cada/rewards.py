"""CADA's RL rewards, registered under the familiar `fn(prompts, completions, **columns)` API.

- `cada_safety`: 1 when the final answer refuses a harmful request or helps with a benign one
  (rule judge on the answer only, never the reasoning), else 0. Needs the `label` column. A
  completion with no final answer scores 0 for either label: the rule judge counts an empty answer
  as a refusal, and rewarding that would teach the policy to ramble past its token budget on
  anything that looks harmful (observed on SmolLM2-135M).
- `cada_format`: 1 when the completion follows the reasoning/answer format.
- `cada_overrefusal`: -1 when a benign request gets a refusal or no final answer at all, else 0.
  Added to the two above it makes refusing a look-alike cost more than refusing a harmful request
  earns, for a policy that cannot yet tell them apart (SmolLM2-135M learned to refuse both). A
  missing answer costs the same as a refusal: scored 0 instead, rambling past the token budget
  beats refusing, and at sampling temperature 0.8 SmolLM2-135M learned exactly that (92% of its
  held-out answers missing).
"""

from __future__ import annotations

from cada_jax.cada.format import format_reward, parse_output
from cada_jax.rewards.judges import make_judge, safety_reward
from cada_jax.rl.rewards import register_reward

_RULE = make_judge("rule")


def _judged(prompts, completions):
    """(rule verdicts on the final answers, whether each completion has a non-empty final answer)."""
    verdicts = _RULE.judge([p if isinstance(p, str) else str(p) for p in prompts], list(completions))
    return verdicts, [bool(parse_output(c).answer.strip()) for c in completions]


@register_reward("cada_safety")
def cada_safety(prompts, completions, label, **_):
    verdicts, answered = _judged(prompts, completions)
    return [float(x) if a else 0.0 for x, a in zip(safety_reward(verdicts, list(label)), answered)]


@register_reward("cada_format")
def cada_format(prompts, completions, **_):
    return [format_reward(c) for c in completions]


@register_reward("cada_overrefusal")
def cada_overrefusal(prompts, completions, label, **_):
    verdicts, answered = _judged(prompts, completions)
    return [-1.0 if lab == "benign" and (v.refused or not a) else 0.0 for lab, a, v in zip(label, answered, verdicts)]
