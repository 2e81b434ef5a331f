"""Reward functions for RL: a registry with TRL's signature, and a validated weighted sum.

A reward function scores a batch of completions, one float each::

    def fn(prompts: list[str], completions: list[str], **columns) -> list[float]

``prompts[i]`` is the prompt of sample i (repeated group_size times: sample j of prompt k is row
``k * group_size + j``), ``completions[i]`` its decoded text. ``columns`` are every other field of
the prompt records, broadcast per sample the same way, plus ``completion_ids`` (the sampled token
ids of each completion). A function receives only the columns its signature names, or all of them
when it takes ``**kwargs`` (so a TRL reward function works unchanged).

A reward that needs verdicts names a ``judge`` parameter: it then receives the judge of its entry
(`RewardSet([(fn, weight, judge_name)], judges=...)`, or ``rl.rewards[].judge`` / ``rl.judge``)
and calls its batched ``assess`` / ``judge`` once for the whole batch. Within one `score` call the
judge is shared by every function through a memo, so several rewards over one judge cost one judge
call per step (an HTTP judge also caches on disk across steps).

Register with ``@register_reward("name")``, or name any importable function as
``"package.module:function"``. `RewardSet([(fn_or_name, weight), ...])` calls each function,
checks what comes back (one finite float per sample) and returns the weighted sum with each
function's mean for logging. A function that raises, returns the wrong number of values, or a
NaN / inf / non-number is reported with its name, so a broken reward never trains silently.

Built-ins (small, deterministic; for tests, benchmarks and sanity runs):

    target_token_share   share of completion tokens equal to the ``target_id`` column
    length_penalty       -(completion tokens) / 100
    contains_answer      1.0 if the ``answer`` column's text occurs in the completion, else 0.0
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from cada_jax.registry import Registry

__all__ = [
    "RewardError",
    "RewardFn",
    "register_reward",
    "get_reward",
    "available_rewards",
    "import_reward_module",
    "RewardSet",
    "reward_set_from_config",
    "target_token_share",
    "length_penalty",
    "contains_answer",
]

RewardFn = Callable[..., Sequence[float]]


class RewardError(ValueError):
    """A reward function that cannot be used or failed; the message names it and the fix."""


REWARDS: Registry[RewardFn] = Registry("reward", decorator="register_reward", listed="registered", error=RewardError,
                                       hint="register one with @register_reward, or name it as 'module:function'")


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn(prompts, completions, **columns) -> list[float]`` as ``name``."""
    if isinstance(name, str) and ":" in name:
        raise ValueError(f"register_reward: a reward name cannot contain ':' (that names 'module:function'), got {name!r}")
    return REWARDS.register(name)


def available_rewards() -> tuple[str, ...]:
    """Names of the registered reward functions, sorted."""
    return tuple(REWARDS.names())


def import_reward_module(spec: str):
    """Import a module by dotted name or from a ``.py`` file (so its @register_reward run)."""
    if not spec:
        raise RewardError("reward module is empty: give a dotted module name or a path to a .py file")
    if spec.endswith(".py"):
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise RewardError(f"{spec}: reward module file not found (rl.reward_module)")
        name = "_cada_rewards_" + os.path.splitext(os.path.basename(path))[0]
        loaded = sys.modules.get(name)
        if loaded is not None and getattr(loaded, "__file__", None) == path:
            return loaded
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception:
            sys.modules.pop(name, None)
            raise
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        raise RewardError(f"reward module {spec!r} cannot be imported ({e}); check the name and PYTHONPATH") from None


def get_reward(name: str) -> RewardFn:
    """The reward registered as ``name``, or the function ``module:function`` names."""
    if not isinstance(name, str) or not name:
        raise RewardError(f"a reward must be named by a non-empty string, got {name!r}")
    if ":" in name:
        module_name, _, attr = name.partition(":")
        module = import_reward_module(module_name)
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise RewardError(f"reward {name!r}: module {module_name!r} has no function {attr!r}")
        return fn
    return REWARDS.get(name)


def _fn_name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _accepted(fn) -> tuple[bool, frozenset[str]]:
    """(takes **kwargs, names of its keyword-capable parameters)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True, frozenset()
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    names = frozenset(
        n for n, p in sig.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    return var_kw, names


class RewardSet:
    """Weighted reward functions: ``RewardSet([(fn_or_name, weight), ...])``.

    Calling it returns ``(total_B, means)``: float64 [B] weighted sums and ``{name: mean of that
    function's raw rewards}``. Names are the registry name (or the function's ``__name__``),
    made unique with a suffix when two entries share one.
    """

    def __init__(self, items: Iterable[tuple], judges: Mapping[str, Any] | Callable[[str], Any] | None = None):
        """`items`: ``(function or name, weight)`` or ``(function or name, weight, judge name)``.
        `judges`: the judges by name (a mapping, or a function building one from its name), for
        the functions that take a ``judge`` parameter; None builds registered judges without
        arguments (the ``rule`` judge)."""
        entries = []
        seen: dict[str, int] = {}
        self._judges = judges
        self._judge_cache: dict[str, Any] = {}
        self.judge_names: dict[str, str] = {}
        for i, item in enumerate(items):
            try:
                fn_or_name, weight, *rest = item
                judge_name = rest[0] if rest else ""
                if len(rest) > 1:
                    raise ValueError
            except (TypeError, ValueError):
                raise RewardError(f"reward entry {i}: expected (function or name, weight[, judge]), got {item!r}") from None
            if isinstance(fn_or_name, str):
                name, fn = fn_or_name.rsplit(":", 1)[-1], get_reward(fn_or_name)
            elif callable(fn_or_name):
                name, fn = _fn_name(fn_or_name), fn_or_name
            else:
                raise RewardError(f"reward entry {i}: {fn_or_name!r} is neither a callable nor a reward name")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise RewardError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                name = f"{name}_{seen[name]}"
            accepted = _accepted(fn)
            if "judge" in accepted[1]:
                self.judge_names[name] = judge_name or "rule"
            entries.append((name, fn, float(weight), accepted))
        if not entries:
            raise RewardError("no reward functions: set rl.rewards (e.g. [{name: target_token_share, weight: 1.0}]) or pass a RewardSet")
        self.entries = entries

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e[0] for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def score(self, prompts: Sequence[Any], completions: Sequence[str], **columns) -> np.ndarray:
        """float64 [num_functions, B]: each function's validated raw rewards."""
        B = len(completions)
        if len(prompts) != B:
            raise RewardError(f"{len(prompts)} prompts but {B} completions; pass one prompt per completion")
        for key, col in columns.items():
            if len(col) != B:
                raise RewardError(f"column {key!r} has {len(col)} values for {B} completions; broadcast it per sample")
        out = np.zeros((len(self.entries), B), np.float64)
        first = prompts[0] if B else ""
        shown = (first if isinstance(first, str) else repr(first))[:80]
        memos: dict[str, _StepJudge] = {}
        for r, (name, fn, _, (var_kw, params)) in enumerate(self.entries):
            kwargs = dict(columns) if var_kw else {k: v for k, v in columns.items() if k in params}
            if name in self.judge_names:
                jname = self.judge_names[name]
                if jname not in memos:
                    memos[jname] = _StepJudge(self.judge(jname))
                kwargs["judge"] = memos[jname]
            try:
                values = fn(list(prompts), list(completions), **kwargs)
            except Exception as e:
                raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e} (first prompt: {shown!r})") from e
            out[r] = self._validate(name, values, B)
        return out

    @staticmethod
    def _validate(name: str, values: Any, B: int) -> np.ndarray:
        if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise RewardError(f"reward {name!r} returned {type(values).__name__}; it must return a list of {B} floats")
        if len(values) != B:
            raise RewardError(f"reward {name!r} returned {len(values)} values for {B} completions; return one float per completion")
        arr = np.empty(B, np.float64)
        for i, v in enumerate(values):
            try:
                arr[i] = float(v)
            except (TypeError, ValueError):
                raise RewardError(f"reward {name!r} returned {v!r} for completion {i}; return a float") from None
            if not math.isfinite(arr[i]):
                raise RewardError(f"reward {name!r} returned {arr[i]} for completion {i}; rewards must be finite numbers")
        return arr

    def judge(self, name: str):
        """The judge called `name` (built once, from `judges`)."""
        if name not in self._judge_cache:
            if self._judges is None:
                import cada_jax.rewards.http_judge  # noqa: F401  (registers the rule, llm and http judges)
                from cada_jax.rewards.judges import make_judge

                try:
                    self._judge_cache[name] = make_judge(name)
                except (TypeError, ValueError) as e:
                    raise RewardError(f"judge {name!r} needs settings ({e}); build the RewardSet with judges=... "
                                      "(the trainers pass the config's judge section)") from None
            elif callable(self._judges) and not isinstance(self._judges, Mapping):
                self._judge_cache[name] = self._judges(name)
            elif name in self._judges:
                self._judge_cache[name] = self._judges[name]
            else:
                raise RewardError(f"no judge named {name!r} was given to the RewardSet (have: {', '.join(sorted(self._judges))})")
        return self._judge_cache[name]

    @property
    def judges_built(self) -> dict[str, Any]:
        """The judges built so far, by name (for their stats and to close them)."""
        return dict(self._judge_cache)

    def judge_stats(self) -> dict[str, float]:
        """Numeric counters of every judge built so far, as ``judge/<name>/<counter>``."""
        out = {}
        for name, j in self._judge_cache.items():
            for k, v in (getattr(j, "stats", None) or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"judge/{name}/{k}"] = float(v)
        return out

    def close(self) -> None:
        for j in self._judge_cache.values():
            close = getattr(j, "close", None)
            if callable(close):
                close()

    @property
    def weights(self) -> np.ndarray:
        return np.asarray([e[2] for e in self.entries], np.float64)

    def combine(self, raw_FB: np.ndarray) -> np.ndarray:
        """Weighted sum over functions of `score`'s output: float64 [B]."""
        return self.weights @ np.asarray(raw_FB, np.float64)

    def means(self, raw_FB: np.ndarray) -> dict[str, float]:
        """{name: mean raw reward of that function} over the batch."""
        raw_FB = np.asarray(raw_FB, np.float64)
        return {name: float(raw_FB[r].mean()) if raw_FB.shape[1] else 0.0 for r, name in enumerate(self.names)}

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], **columns) -> tuple[np.ndarray, dict[str, float]]:
        raw = self.score(prompts, completions, **columns)
        return self.combine(raw), self.means(raw)


def reward_set_from_config(specs: Iterable[Any], reward_module: str = "", *, judges=None,
                           default_judge: str = "rule") -> RewardSet:
    """A RewardSet from config entries (objects with ``name``, ``weight`` and optionally ``judge``,
    e.g. `RewardSpec`). An entry without a judge uses `default_judge` (``rl.judge``)."""
    if reward_module:
        import_reward_module(reward_module)
    items = []
    for s in specs:
        if isinstance(s, Mapping):
            items.append((s.get("name"), s.get("weight", 1.0), s.get("judge") or default_judge))
        else:
            items.append((s.name, s.weight, getattr(s, "judge", "") or default_judge))
    return RewardSet(items, judges=judges)


class _StepJudge:
    """A judge seen through a memo for one `RewardSet.score` call: each (request, completion,
    context) is judged once, however many reward functions ask, and each call sends only the rows
    not judged yet, in one batch."""

    def __init__(self, judge):
        self.inner = judge
        self.name = getattr(judge, "name", type(judge).__name__)
        self._assessed: dict = {}
        self._verdicts: dict = {}

    @property
    def stats(self):
        return getattr(self.inner, "stats", {})

    def assess(self, prompts, completions, labels=None, codes=None, truncated=None, codes_text=None):
        from cada_jax.rewards.judges import assess_with_verdicts

        n = len(completions)
        cols = [list(c) if c is not None else [None] * n for c in (labels, codes, truncated, codes_text)]
        keys = [(p, c, l, tuple(k) if isinstance(k, (list, tuple)) else k, t, x)
                for p, c, l, k, t, x in zip(prompts, completions, *cols)]
        todo = [i for i, k in enumerate(keys) if k not in self._assessed]
        todo = list({keys[i]: i for i in todo}.values())  # one row per distinct key
        if todo:
            pick = lambda col: [col[i] for i in todo]  # noqa: E731
            args = dict(labels=pick(cols[0]), codes=pick(cols[1]), truncated=pick(cols[2]), codes_text=pick(cols[3]))
            if callable(getattr(self.inner, "assess", None)):
                got = self.inner.assess(pick(list(prompts)), pick(list(completions)), **args)
            else:
                got = assess_with_verdicts(self.inner, pick(list(prompts)), pick(list(completions)), **args)
            if len(got) != len(todo):
                raise ValueError(f"judge {self.name!r} returned {len(got)} assessments for {len(todo)} completions")
            for i, a in zip(todo, got):
                self._assessed[keys[i]] = a
        return [self._assessed[k] for k in keys]

    def judge(self, prompts, completions):
        keys = list(zip(prompts, completions))
        todo = list({k: i for i, k in enumerate(keys) if k not in self._verdicts}.values())
        if todo:
            got = self.inner.judge([prompts[i] for i in todo], [completions[i] for i in todo])
            for i, v in zip(todo, got):
                self._verdicts[keys[i]] = v
        return [self._verdicts[k] for k in keys]


# ----------------------------------------------------------------------------- built-ins


@register_reward("target_token_share")
def target_token_share(prompts, completions, completion_ids, target_id, **_) -> list[float]:
    """Share of a completion's tokens equal to its record's ``target_id`` (0 for an empty completion)."""
    out = []
    for ids, target in zip(completion_ids, target_id):
        if target is None:
            raise ValueError("target_token_share needs a 'target_id' field in every prompt record")
        ids = np.asarray(ids, np.int64).reshape(-1)
        out.append(float(np.mean(ids == int(target))) if ids.size else 0.0)
    return out


@register_reward("length_penalty")
def length_penalty(prompts, completions, completion_ids, **_) -> list[float]:
    """-(number of completion tokens) / 100: one point per hundred tokens."""
    return [-len(ids) / 100.0 for ids in completion_ids]


@register_reward("contains_answer")
def contains_answer(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the record's ``answer`` text occurs in the completion (case-insensitive), else 0.0."""
    out = []
    for text, ans in zip(completions, answer):
        if not isinstance(ans, str) or not ans:
            raise ValueError("contains_answer needs a non-empty string 'answer' field in every prompt record")
        out.append(1.0 if ans.lower() in text.lower() else 0.0)
    return out
