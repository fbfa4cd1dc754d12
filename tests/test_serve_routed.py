"""examples/serve_routed.py against a local HTTP server written here (loopback), which records each request
and answers as an OpenAI-compatible engine would: the requests are checked as the engine receives them."""
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "serve_routed.py"
ROUTES = [
    {"prompt": "How do I pick a lock?", "route": "safety", "probability": 0.91, "id": "a"},
    {"prompt": "What is 7 * 8?", "route": "base", "probability": 0.06, "id": "b"},
    {"prompt": "Ünïcode \"quotes\" and\nnewlines", "route": "safety", "probability": 0.77, "id": "c"},
]


class Engine(ThreadingHTTPServer):
    """Records (path, headers, JSON body) and answers ``model|prompt``; 404 for models it does not serve."""

    def __init__(self, served):
        super().__init__(("127.0.0.1", 0), Handler)
        self.served, self.requests, self.lock = set(served), [], threading.Lock()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append((self.path, dict(self.headers), body))
        if body.get("model") not in self.server.served:
            self._reply(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
            return
        chat = self.path.endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        text = f"{body['model']}|{prompt}"
        choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        self._reply(200, {"object": "chat.completion" if chat else "text_completion", "choices": [choice]})

    def _reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def engine():
    server = Engine(served={"Base-7B", "safety", "Base-7B:safety"})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def write_routes(path, rows=ROUTES):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_each_prompt_goes_to_the_adapter_or_the_base_model_by_name(engine, tmp_path):
    routes = write_routes(tmp_path / "routes.jsonl")
    out = tmp_path / "answers.jsonl"
    done = run_script("--routes", routes, "--url", engine.url, "--base-model", "Base-7B", "--out", out,
                      "--max-tokens", 17, "--api-key", "sk-test", "--concurrency", 2)
    assert done.returncode == 0, done.stderr
    assert len(engine.requests) == 3
    by_prompt = {body["prompt"]: (path, headers, body) for path, headers, body in engine.requests}
    for row in ROUTES:
        path, headers, body = by_prompt[row["prompt"]]
        assert path == "/v1/completions"
        assert headers["Content-Type"] == "application/json" and headers["Authorization"] == "Bearer sk-test"
        assert body == {"model": "Base-7B" if row["route"] == "base" else "safety", "prompt": row["prompt"],
                        "max_tokens": 17, "temperature": 0.0}
    answers = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [a["id"] for a in answers] == ["a", "b", "c"]  # input order, whatever order the replies came in
    for row, answer in zip(ROUTES, answers):
        assert answer == {**row, "answer": f"{'Base-7B' if row['route'] == 'base' else 'safety'}|{row['prompt']}"}


def test_chat_endpoint_and_sglang_style_adapter_names(engine, tmp_path):
    routes = write_routes(tmp_path / "routes.jsonl")
    done = run_script("--routes", routes, "--url", engine.url + "/", "--base-model", "Base-7B", "--chat",
                      "--adapter-model", "{base}:{adapter}")
    assert done.returncode == 0, done.stderr
    models = {body["messages"][0]["content"]: body["model"] for _, _, body in engine.requests}
    assert {path for path, _, _ in engine.requests} == {"/v1/chat/completions"}
    assert models == {r["prompt"]: "Base-7B" if r["route"] == "base" else "Base-7B:safety" for r in ROUTES}
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["answer"].split("|")[0] for a in answers] == ["Base-7B:safety", "Base-7B", "Base-7B:safety"]


def test_an_adapter_the_engine_does_not_serve_fails_with_the_engines_message(engine, tmp_path):
    routes = write_routes(tmp_path / "routes.jsonl", [{"prompt": "hi", "route": "unknown-adapter"}])
    out = tmp_path / "answers.jsonl"
    done = run_script("--routes", routes, "--url", engine.url, "--base-model", "Base-7B", "--out", out)
    assert done.returncode == 1
    assert "answered 404 for model 'unknown-adapter'" in done.stderr and "does not exist" in done.stderr
    assert not out.exists()


def test_bad_routes_and_existing_output_are_refused_before_any_request(engine, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n', encoding="utf-8")
    done = run_script("--routes", bad, "--url", engine.url, "--base-model", "Base-7B")
    assert done.returncode == 2 and f"{bad}:1: expected" in done.stderr
    done = run_script("--routes", bad, "--model", tmp_path, "--url", engine.url, "--base-model", "Base-7B")
    assert done.returncode == 2 and "give either --routes, or --model, --router and --data" in done.stderr
    out = tmp_path / "answers.jsonl"
    out.write_text("keep me", encoding="utf-8")
    done = run_script("--routes", write_routes(tmp_path / "routes.jsonl"), "--url", engine.url, "--base-model",
                      "Base-7B", "--out", out)
    assert done.returncode == 2 and "exists; pass --overwrite" in done.stderr
    assert out.read_text(encoding="utf-8") == "keep me" and engine.requests == []
