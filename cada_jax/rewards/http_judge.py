"""A judge behind an OpenAI-compatible chat-completions server (vLLM, llama.cpp server, SGLang, a
hosted API).

`HTTPChatClient` is a batched chat function ``list[list[dict]] -> list[str]`` that sends
``POST {base_url}/chat/completions`` with ``{"model", "messages", "temperature": 0, "max_tokens"}``:

* the API key comes from the environment variable named by `api_key_env` (default
  ``CADA_JUDGE_API_KEY``) and is sent as ``Authorization: Bearer``; it is never logged or shown in
  errors or reprs (an error body that echoes it is scrubbed). A missing key is an error unless
  ``require_key=False`` (local servers);
* redirects are never followed, so the key is never sent to another address: a 3xx reply is an
  error naming where it pointed;
* at most `max_concurrency` requests are in flight at once (a thread pool);
* timeouts, connection errors, HTTP 408/409/425/429/5xx and malformed replies (bad JSON, no
  ``choices[0].message.content``) are retried with exponential backoff and jitter, honouring
  ``Retry-After``; other 4xx (400, 401, 403, 404, 422, ...) fail at once with `JudgeRequestError`;
  when retries run out, `JudgeUnavailableError` names the URL, the last error and the fix;
* a reply that `validate` rejects (for `HTTPJudge`: one the rubric parser cannot read) is asked
  again like a failed request and never cached; after the retries the last one is returned uncached;
* replies are cached on disk (sqlite3 in `cache_dir`, key = sha256 of the endpoint URL, the model
  and the messages, which hold the rubric), so a cache hit sends no request, also from a new process. Pass ``cache_dir=None`` to disable. When one item of
  a batch fails for good the whole call raises, but what did succeed stays cached, so a rerun only
  asks again for the rest.

`HTTPJudge` is the `llm` judge with this client as its generate function, registered as ``http``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import inspect
import json
import os
import random
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

from cada_jax.rewards.judges import LLMJudge, register_judge
from cada_jax.rewards.rubric import RubricParseError, parse_chain_rubric, parse_rubric

__all__ = [
    "HTTPChatClient",
    "HTTPJudge",
    "VerdictCache",
    "JudgeUnavailableError",
    "JudgeRequestError",
    "JudgeConfigError",
    "cache_key",
    "DEFAULT_API_KEY_ENV",
    "DEFAULT_CACHE_DIR",
]

DEFAULT_API_KEY_ENV = "CADA_JUDGE_API_KEY"
DEFAULT_CACHE_DIR = "~/.cache/cada_jax/judge"
_CACHE_FILE = "judge_cache.sqlite3"
_RETRY_STATUSES = frozenset({408, 409, 425, 429})
_EXCERPT_CHARS = 120


class JudgeUnavailableError(RuntimeError):
    """The judge server could not give an answer."""


class JudgeRequestError(JudgeUnavailableError):
    """The judge server rejected the request in a way retrying cannot fix (bad key, URL, model)."""


class JudgeConfigError(ValueError):
    """The judge was configured wrongly (URL, key, limits)."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect: following one would send the Authorization header to another address."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise JudgeRequestError(
            f"judge at {req.full_url} answered HTTP {code}, a redirect to {urllib.parse.urlsplit(newurl).netloc or newurl!r}; "
            "redirects are not followed (the API key would go with them): set judge.url to the final address"
        )


class _RetryableError(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _excerpt(data: bytes | str) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    flat = " ".join(text.split())
    return flat if len(flat) <= _EXCERPT_CHARS else flat[: _EXCERPT_CHARS - 3] + "..."


def cache_key(url: str, model: str, messages: list[dict]) -> str:
    """sha256 over the endpoint URL, the model name and the exact messages (rubric included)."""
    blob = json.dumps({"url": url, "model": model, "messages": messages}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class VerdictCache:
    """Judge replies keyed by `cache_key`, in one sqlite3 file; safe to share between threads."""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        directory = Path(cache_dir).expanduser()
        self.path = directory / _CACHE_FILE
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
                "content TEXT NOT NULL, created REAL NOT NULL)"
            )
            self._conn.commit()
        except (OSError, sqlite3.Error) as err:
            raise JudgeConfigError(
                f"judge cache at {self.path} cannot be opened ({err}); delete the file, pick another "
                "cache_dir, or pass cache_dir=None"
            ) from None
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT content FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, model: str, content: str) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO replies (key, model, content, created) VALUES (?, ?, ?, ?)",
                (key, model, content, time.time()),
            )
            self._conn.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class HTTPChatClient:
    """Batched, cached, retrying chat-completions client: ``client(list_of_messages) -> list[str]``."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        require_key: bool = True,
        max_tokens: int = 512,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 30.0,
        max_concurrency: int = 8,
        cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
        seed: int | None = None,
        validate: Callable[[str], bool] | None = None,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise JudgeConfigError(
                f"judge base_url {base_url!r} must start with http:// or https:// "
                "(e.g. http://127.0.0.1:8000/v1)"
            )
        if not isinstance(model, str) or not model.strip():
            raise JudgeConfigError(f"judge model must be a non-empty str, got {model!r}; name the served model")
        for name, value, low in (
            ("max_tokens", max_tokens, 1),
            ("max_retries", max_retries, 0),
            ("max_concurrency", max_concurrency, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise JudgeConfigError(f"judge {name} must be an int >= {low}, got {value!r}")
        for name, value in (("timeout_s", timeout_s), ("backoff_base_s", backoff_base_s), ("backoff_max_s", backoff_max_s)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (
                name == "timeout_s" and value == 0
            ):
                raise JudgeConfigError(f"judge {name} must be a positive number of seconds, got {value!r}")

        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env, "").strip()
        if not key and require_key:
            raise JudgeConfigError(
                f"judge API key missing: set the environment variable {api_key_env}, or pass "
                "require_key=False for a local server without auth"
            )
        self._api_key = key or None
        self.max_tokens = max_tokens
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.max_concurrency = max_concurrency
        self.cache = None if cache_dir is None else VerdictCache(cache_dir)
        self._rng = random.Random(seed)
        self.validate = validate
        self._opener = urllib.request.build_opener(_NoRedirects())
        self._stats_lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0}

    def __repr__(self) -> str:
        key_state = "set" if self._api_key else "not set"
        return (
            f"HTTPChatClient(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r} "
            f"[{key_state}], max_concurrency={self.max_concurrency}, cache={self.cache.path if self.cache else None})"
        )

    def _scrub(self, text: str) -> str:
        """`text` with the API key replaced, for every message that may reach a log or a screen."""
        return text.replace(self._api_key, "[key]") if self._api_key else text

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    # -- one request ---------------------------------------------------------------------------

    def _request_once(self, messages: list[dict]) -> str:
        payload = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(payload).encode("utf-8"), headers=headers, method="POST"
        )
        self._count("requests")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            try:
                detail = _excerpt(self._scrub((err.read(2000) or b"").decode("utf-8", "replace")))
            except (OSError, http.client.HTTPException):
                detail = ""
            status = err.code
            if status in _RETRY_STATUSES or status >= 500:
                raise _RetryableError(f"HTTP {status} {detail}".strip(), _retry_after(err.headers)) from None
            raise JudgeRequestError(self._rejection_message(status, detail)) from None
        except (TimeoutError, socket.timeout):
            raise _RetryableError(f"timed out after {self.timeout_s:g}s") from None
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _RetryableError(f"timed out after {self.timeout_s:g}s") from None
            raise _RetryableError(self._scrub(f"connection failed: {reason}")) from None
        except (http.client.HTTPException, OSError) as err:
            raise _RetryableError(self._scrub(f"connection failed: {type(err).__name__}: {err}")) from None

        try:
            data = json.loads(body)
        except ValueError:
            raise _RetryableError(f"malformed JSON in reply: {_excerpt(self._scrub(body.decode('utf-8', 'replace')))!r}") from None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise _RetryableError(f"reply has no choices[0].message.content: {_excerpt(self._scrub(body.decode('utf-8', 'replace')))!r}")
        return content

    def _rejection_message(self, status: int, detail: str) -> str:
        where = f"judge at {self.url}"
        if status == 401:
            if self._api_key:
                fix = f"set a valid key in ${self.api_key_env}"
            else:
                fix = f"no key was sent: set ${self.api_key_env} (and keep require_key=True)"
            return f"{where} refused the API key (HTTP 401): {fix}"
        if status == 403:
            return f"{where} forbade the request (HTTP 403): the key in ${self.api_key_env} lacks access to model {self.model!r}"
        if status == 404:
            return (
                f"{where} returned HTTP 404: check base_url (OpenAI-compatible servers usually end in /v1) "
                f"and the model name {self.model!r}"
            )
        return (
            f"{where} rejected the request (HTTP {status}: {detail or 'no detail'}): check the model name "
            f"{self.model!r} and max_tokens={self.max_tokens}"
        )

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.backoff_max_s, self.backoff_base_s * (2.0**attempt))
        delay = cap * (0.5 + 0.5 * self._rng.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay

    def _request_with_retries(self, messages: list[dict], abort: threading.Event) -> tuple[str, bool]:
        """(reply, valid): a reply `validate` accepts, or after the retries the last one it rejected."""
        last_error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if abort.is_set():
                raise JudgeUnavailableError(f"judge at {self.url}: batch aborted after another item failed")
            try:
                content = self._request_once(messages)
                if self.validate is None or self.validate(content):
                    return content, True
                if attempt == self.max_retries:
                    return content, False
                raise _RetryableError(f"unreadable reply: {_excerpt(self._scrub(content))!r}")
            except _RetryableError as err:
                last_error = str(err)
                if attempt == self.max_retries:
                    break
                self._count("retries")
                if abort.wait(self._backoff(attempt, err.retry_after)):
                    raise JudgeUnavailableError(
                        f"judge at {self.url}: batch aborted after another item failed"
                    ) from None
        raise JudgeUnavailableError(
            f"judge at {self.url} gave no usable reply after {self.max_retries + 1} attempts "
            f"(last error: {last_error}); check that the server is up and serves model {self.model!r}, "
            "or raise timeout_s / max_retries"
        )

    def _complete_and_cache(self, key: str, messages: list[dict], abort: threading.Event) -> str:
        content, valid = self._request_with_retries(messages, abort)
        if valid and self.cache is not None:
            self.cache.put(key, self.model, content)
        return content

    # -- batches -------------------------------------------------------------------------------

    def __call__(self, conversations: Sequence[list[dict]]) -> list[str]:
        """Replies for each conversation, in order; cached ones without a request."""
        if isinstance(conversations, (str, dict)):
            raise TypeError("HTTPChatClient takes a list of conversations (each a list of message dicts)")
        keys = []
        for i, messages in enumerate(conversations):
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            ):
                raise TypeError(
                    f"conversation #{i} must be a list of {{'role': str, 'content': str}} dicts; "
                    "build it with build_rubric_messages"
                )
            keys.append(cache_key(self.url, self.model, messages))

        replies: dict[str, str] = {}
        todo: dict[str, list[dict]] = {}
        for key, messages in zip(keys, conversations):
            if key in replies or key in todo:
                continue
            cached = self.cache.get(key) if self.cache is not None else None
            if cached is not None and self.validate is not None and not self.validate(cached):
                cached = None  # written before replies were validated: ask again
            if cached is not None:
                replies[key] = cached
                self._count("cache_hits")
            else:
                todo[key] = messages

        if todo:
            abort = threading.Event()
            workers = min(self.max_concurrency, len(todo))
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge-http") as pool:
                futures = {
                    pool.submit(self._complete_and_cache, key, messages, abort): key
                    for key, messages in todo.items()
                }
                try:
                    for future in concurrent.futures.as_completed(futures):
                        replies[futures[future]] = future.result()
                except BaseException:
                    abort.set()
                    for future in futures:
                        future.cancel()
                    raise
        return [replies[key] for key in keys]


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _rubric_parses(text: str) -> bool:
    """A reply to either rubric (answer-only or chain) parses; others are asked again."""
    for parse in (parse_chain_rubric, parse_rubric):
        try:
            parse(text)
            return True
        except RubricParseError:
            pass
    return False


@register_judge("http")
class HTTPJudge(LLMJudge):
    """The rubric judge served by an OpenAI-compatible endpoint; kwargs go to `HTTPChatClient`."""

    name = "http"

    def __init__(self, base_url: str, model: str, **client_kwargs) -> None:
        try:
            inspect.signature(HTTPChatClient).bind(base_url, model, **client_kwargs)
        except TypeError as err:
            options = ", ".join(list(inspect.signature(HTTPChatClient).parameters)[2:])
            raise TypeError(f"HTTPJudge: {err}; accepted options: {options}") from None
        client_kwargs.setdefault("validate", _rubric_parses)
        self.client = HTTPChatClient(base_url, model, **client_kwargs)
        super().__init__(generate_fn=self.client)

    @property
    def stats(self) -> dict:
        return {**self._stats, **self.client.stats}

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "HTTPJudge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HTTPJudge({self.client!r})"
