"""Judges and the reward functions built on them.

`judges` / `http_judge` (the judges), `refusal` / `rubric` / `chain` / `format` (the checks they
run), `functions` (RewardSet, the reward registry, the built-in reward functions), `build` (judges
from the config). Importing the package registers every built-in judge (``rule``, ``llm``,
``http``) and reward, so ``make_judge("http")`` works whichever module a caller imports first,
with no import cycle.
"""

from cada_jax.rewards import judges as _judges  # noqa: F401  (rule, llm)
from cada_jax.rewards import http_judge as _http_judge  # noqa: F401  (http)
from cada_jax.rewards import functions as _functions  # noqa: F401  (target_token_share, length_penalty, ...)
