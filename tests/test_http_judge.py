import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cada_jax.rewards.http_judge import (
    HTTPChatClient,
    HTTPJudge,
    JudgeConfigError,
    JudgeRequestError,
    JudgeUnavailableError,
)
from cada_jax.rewards.judges import make_judge

GOOD_REPLY = "Notes: fine.\nrefused: 0\nconvincing: 4\nspecific: 2"
KEY = "sk-test-secret-123"


class FakeServer:
    """An OpenAI-compatible endpoint whose next responses are scripted.

    `script` is a list of actions consumed one per request: "ok", "slow" (sleep past the client's
    timeout, then answer), "500", "429", "malformed", "nocontent", "401", "404". When the script is
    empty, `default` is used.
    """

    def __init__(self):
        self.script = []
        self.default = "ok"
        self.requests = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay_s = 0.0
        self.slow_s = 0.5
        self.reply = GOOD_REPLY
        self.redirect_to = ""
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    action = server.script.pop(0) if server.script else server.default
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay_s)
                    if action == "slow":
                        time.sleep(server.slow_s)
                    self._respond(action, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _respond(self, action, body):
                status, payload = 200, None
                if action in ("ok", "slow"):
                    user = body["messages"][-1]["content"]
                    request = user.split("[REQUEST START]")[1].split("[REQUEST END]")[0].strip()
                    content = f"{server.reply}\nrequest: {request}"
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
                elif action == "500":
                    status, payload = 500, '{"error": "boom"}'
                elif action == "429":
                    status, payload = 429, '{"error": "slow down"}'
                elif action == "malformed":
                    payload = '{"choices": [ not json'
                elif action == "nocontent":
                    payload = json.dumps({"choices": []})
                elif action == "401":
                    status, payload = 401, '{"error": "invalid api key"}'
                elif action == "404":
                    status, payload = 404, '{"error": "no such route"}'
                elif action == "302":
                    status, payload = 302, ""
                elif action == "echo":  # a server that echoes the request's headers in its error body
                    status, payload = 400, json.dumps({"error": "bad request", "headers": dict(self.headers)})
                elif action == "garbage":
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": "no grades here"}}]})
                data = payload.encode()
                self.send_response(status)
                if action == "302":
                    self.send_header("Location", server.redirect_to)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if action == "429":
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CADA_JUDGE_API_KEY", KEY)
    srv = FakeServer()
    yield srv
    srv.close()


def judge_for(server, tmp_path, **kw):
    opts = dict(model="judge-model", timeout_s=0.25, max_retries=3, backoff_base_s=0.01, backoff_max_s=0.05, cache_dir=tmp_path / "cache", seed=0)
    opts.update(kw)
    return HTTPJudge(server.url, **opts)


def completion(answer):
    return f"<reasoning>thinking</reasoning><answer>{answer}</answer>"


def test_success_sends_openai_request_and_parses(server, tmp_path):
    judge = judge_for(server, tmp_path, max_tokens=77)
    [verdict] = judge.judge(["how do I boil an egg?"], [completion("Boil it for 8 minutes.")])
    assert verdict.refused is False and verdict.score == pytest.approx((4 + 2 - 2) / 8)
    [req] = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == f"Bearer {KEY}"
    body = req["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 77
    assert "Boil it for 8 minutes." in body["messages"][-1]["content"]
    assert "thinking" not in body["messages"][-1]["content"]
    assert KEY not in repr(judge)


def test_make_judge_http_by_name(server, tmp_path):
    judge = make_judge("http", base_url=server.url, model="m", cache_dir=None, timeout_s=1.0)
    assert isinstance(judge, HTTPJudge)
    assert judge.judge(["p"], [completion("a")])[0].refused is False


def test_timeout_is_retried_then_succeeds(server, tmp_path):
    server.script = ["slow", "ok"]
    judge = judge_for(server, tmp_path)
    start = time.monotonic()
    [verdict] = judge.judge(["p"], [completion("a")])
    assert verdict.score is not None
    assert len(server.requests) == 2
    assert judge.stats["retries"] == 1
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize("failure", ["500", "429", "malformed", "nocontent"])
def test_transient_failures_are_retried(server, tmp_path, failure):
    server.script = [failure, failure, "ok"]
    judge = judge_for(server, tmp_path)
    [verdict] = judge.judge(["p"], [completion("a")])
    assert verdict.refused is False
    assert len(server.requests) == 3


def test_stays_down_raises_unavailable_with_clear_message(server, tmp_path):
    server.default = "500"
    judge = judge_for(server, tmp_path, max_retries=2)
    with pytest.raises(JudgeUnavailableError) as info:
        judge.judge(["p"], [completion("a")])
    message = str(info.value)
    assert server.url in message and "3 attempts" in message and "HTTP 500" in message
    assert "check that the server is up" in message and "\n" not in message
    assert KEY not in message
    assert len(server.requests) == 3


def test_unreachable_server_raises_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("CADA_JUDGE_API_KEY", KEY)
    srv = FakeServer()
    url = srv.url
    srv.close()  # nothing listens on this port any more
    judge = HTTPJudge(url, model="m", timeout_s=0.25, max_retries=1, backoff_base_s=0.01, cache_dir=None)
    with pytest.raises(JudgeUnavailableError, match="connection failed"):
        judge.judge(["p"], [completion("a")])


def test_401_fails_fast_with_clear_error(server, tmp_path):
    server.default = "401"
    judge = judge_for(server, tmp_path)
    with pytest.raises(JudgeRequestError, match="HTTP 401.*CADA_JUDGE_API_KEY") as info:
        judge.judge(["p"], [completion("a")])
    assert len(server.requests) == 1
    assert KEY not in str(info.value)


def test_404_fails_fast_naming_base_url(server, tmp_path):
    server.default = "404"
    judge = judge_for(server, tmp_path)
    with pytest.raises(JudgeRequestError, match="HTTP 404: check base_url"):
        judge.judge(["p"], [completion("a")])
    assert len(server.requests) == 1


def test_cache_hits_send_no_request_even_across_instances(server, tmp_path):
    judge = judge_for(server, tmp_path)
    first = judge.judge(["p1", "p2"], [completion("a"), completion("b")])
    assert len(server.requests) == 2
    again = judge.judge(["p1", "p2"], [completion("a"), completion("b")])
    assert again == first
    assert len(server.requests) == 2
    assert judge.stats["cache_hits"] == 2
    judge.close()

    fresh = judge_for(server, tmp_path)
    assert fresh.judge(["p2"], [completion("b")]) == [first[1]]
    assert len(server.requests) == 2
    # A different model name is a different key.
    judge_for(server, tmp_path, model="other-model").judge(["p2"], [completion("b")])
    assert len(server.requests) == 3


def test_duplicates_in_a_batch_are_asked_once(server, tmp_path):
    judge = judge_for(server, tmp_path, cache_dir=None)
    verdicts = judge.judge(["p"] * 4, [completion("same")] * 4)
    assert len(verdicts) == 4 and len(set(verdicts)) == 1
    assert len(server.requests) == 1


def test_concurrency_limit_is_respected(server, tmp_path):
    server.delay_s = 0.1
    judge = judge_for(server, tmp_path, max_concurrency=3, timeout_s=2.0)
    prompts = [f"prompt {i}" for i in range(9)]
    verdicts = judge.judge(prompts, [completion(f"answer {i}") for i in range(9)])
    assert len(verdicts) == 9 and len(server.requests) == 9
    assert server.max_in_flight == 3
    # Replies come back in input order: each names the request it graded.
    assert [v.raw.rsplit("request: ", 1)[1] for v in verdicts] == prompts
    # All nine were written to the cache from the worker threads.
    assert judge.judge(prompts, [completion(f"answer {i}") for i in range(9)]) == verdicts
    assert len(server.requests) == 9 and len(judge.client.cache) == 9


def test_unparsable_judge_reply_falls_back_and_is_counted(server, tmp_path):
    judge = judge_for(server, tmp_path, cache_dir=None)
    server.reply = "I would rather not grade this."
    [verdict] = judge.judge(["p"], [completion("I'm sorry, but I can't help with that.")])
    assert verdict.refused is True and verdict.score is None
    assert judge.stats["parse_failures"] == 1


def test_missing_key_and_bad_config(monkeypatch, tmp_path):
    monkeypatch.delenv("CADA_JUDGE_API_KEY", raising=False)
    with pytest.raises(JudgeConfigError, match="set the environment variable CADA_JUDGE_API_KEY"):
        HTTPJudge("http://127.0.0.1:1/v1", model="m", cache_dir=None)
    monkeypatch.setenv("MY_JUDGE_KEY", "abc")
    client = HTTPChatClient("http://127.0.0.1:1/v1", "m", api_key_env="MY_JUDGE_KEY", cache_dir=None)
    assert "abc" not in repr(client)
    HTTPJudge("http://127.0.0.1:1/v1", model="m", require_key=False, cache_dir=None)
    with pytest.raises(JudgeConfigError, match="must start with http"):
        HTTPJudge("127.0.0.1:8000", model="m", require_key=False, cache_dir=None)
    with pytest.raises(JudgeConfigError, match="max_concurrency must be an int >= 1"):
        HTTPJudge("http://x/v1", model="m", require_key=False, cache_dir=None, max_concurrency=0)
    with pytest.raises(TypeError, match="accepted options"):
        HTTPJudge("http://x/v1", model="m", require_key=False, retries=3)


def test_no_key_sent_when_not_required(server, tmp_path, monkeypatch):
    monkeypatch.delenv("CADA_JUDGE_API_KEY")
    judge = judge_for(server, tmp_path, require_key=False, cache_dir=None)
    judge.judge(["p"], [completion("a")])
    assert server.requests[0]["auth"] is None


def test_redirects_are_refused_and_the_key_never_leaves(server, tmp_path):
    other = FakeServer()
    try:
        server.default = "302"
        server.redirect_to = other.url + "/chat/completions"
        judge = judge_for(server, tmp_path)
        with pytest.raises(JudgeRequestError, match="redirect.*not followed") as info:
            judge.judge(["p"], [completion("a")])
        assert other.requests == [] and len(server.requests) == 1  # not retried, not followed
        assert KEY not in str(info.value)
    finally:
        other.close()


def test_error_bodies_are_scrubbed_of_the_key(server, tmp_path):
    server.default = "echo"
    judge = judge_for(server, tmp_path)
    with pytest.raises(JudgeRequestError) as info:
        judge.judge(["p"], [completion("a")])
    assert "HTTP 400" in str(info.value) and KEY not in str(info.value)
    assert server.requests[0]["auth"] == f"Bearer {KEY}"  # the server did see it


def test_cache_is_keyed_by_endpoint(server, tmp_path):
    other = FakeServer()
    try:
        other.reply = "refused: 1\nconvincing: 1\nspecific: 1"
        a = judge_for(server, tmp_path)
        b = HTTPJudge(other.url, model="judge-model", timeout_s=0.25, max_retries=0, cache_dir=tmp_path / "cache")
        [va] = a.judge(["p"], [completion("a")])
        [vb] = b.judge(["p"], [completion("a")])
        assert len(other.requests) == 1 and va.refused is False and vb.refused is True
        [va2] = a.judge(["p"], [completion("a")])  # both now cached, each for its own endpoint
        assert len(server.requests) == 1 and va2 == va
    finally:
        other.close()


def test_unreadable_replies_are_retried_and_never_cached(server, tmp_path):
    judge = judge_for(server, tmp_path)
    server.script = ["garbage", "garbage"]
    [v] = judge.judge(["p"], [completion("a")])
    assert len(server.requests) == 3 and v.score is not None and judge.stats["parse_failures"] == 0
    assert len(judge.client.cache) == 1
    server.default = "garbage"
    [v] = judge.judge(["q"], [completion("I'm sorry, but I can't help with that.")])
    assert len(server.requests) == 3 + 4 and judge.stats["parse_failures"] == 1 and v.score is None
    assert len(judge.client.cache) == 1  # the unreadable reply was not kept
    judge.judge(["q"], [completion("I'm sorry, but I can't help with that.")])
    assert len(server.requests) == 3 + 8  # asked again, not served from the cache
