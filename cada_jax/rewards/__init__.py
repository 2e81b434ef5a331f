"""Judges and the reward functions built on them.

Importing the package registers every built-in judge (``rule``, ``llm``, ``http``) and reward, so
``make_judge("http")`` works whichever module a caller imports first, with no import cycle.
"""

from cada_jax.rewards import judges as _judges  # noqa: F401  (rule, llm)
from cada_jax.rewards import http_judge as _http_judge  # noqa: F401  (http)
