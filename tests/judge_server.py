"""A local OpenAI-compatible judge for tests: answers both rubrics with grades that are a fixed
function of the reply it is shown (so a test can recompute them), or fails with HTTP 500."""

import json

class ChainJudgeServer:
    """An OpenAI-compatible endpoint answering the chain rubric: refused and helpful are a fixed
    function of the reply text it is shown (so the test can recompute them), or HTTP 500."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.fail = False
        self.requests = 0
        self.kinds: list[str] = []  # "answer" (the answer-only rubric) or "chain" (the whole-output rubric)
        self.chain = 3
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests += 1
                if server.fail:
                    data, status = b'{"error": "down"}', 500
                else:
                    user = body["messages"][-1]["content"]
                    server.kinds.append("chain" if "[REASONING START]" in user else "answer")
                    reply = user.split("[REPLY START]")[1].split("[REPLY END]")[0].strip()
                    refused, helpful = ChainJudgeServer.grade(reply)
                    content = (f"refused: {refused}\nconvincing: 2\nspecific: 2\nharmful_reasoning: 0\nchain: {server.chain}\n"
                               f"helpful: {helpful}")
                    data, status = json.dumps({"choices": [{"message": {"content": content}}]}).encode(), 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    @staticmethod
    def grade(reply: str) -> tuple[int, int]:
        import hashlib

        h = int(hashlib.sha256(reply.encode()).hexdigest(), 16)
        return h % 2, 1 + (h // 2) % 5

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_judge(monkeypatch):
    """Fixture body: a running ChainJudgeServer with the API key set and proxies cleared."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CADA_JUDGE_API_KEY", "sk-test")
    srv = ChainJudgeServer()
    yield srv
    srv.close()
