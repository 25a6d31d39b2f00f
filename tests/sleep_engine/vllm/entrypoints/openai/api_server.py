"""A test double of vLLM's OpenAI server with its sleep mode, for tests/test_sleep_levels.py: not vLLM.

There is no GPU on the machines the tests run on, and vLLM's CPU build refuses sleep mode, so this stands in for an
engine started with `--enable-sleep-mode` under VLLM_SERVER_DEV_MODE=1. With `tests/sleep_engine` first on
PYTHONPATH, the worker's usual engine command (`python -m vllm.entrypoints.openai.api_server --model ...`) runs it.

It keeps the part of vLLM's contract the worker relies on (vllm/entrypoints/serve/dev/sleep/api_router.py,
vllm/v1/executor/abstract.py, vllm/snapshot/server.py):

- `POST /sleep?level=N`: the weights and the KV cache go to sleep; level 2 discards the weights' contents.
- `POST /wake_up` (all memory) or `POST /wake_up?tags=weights|kv_cache`: that memory is back; a wake of a tag that is
  awake already is a no-op, as in vLLM.
- `POST /collective_rpc {"method": "reload_weights"}`: the weights are read from disk again (their memory awake).
- Inference while any memory sleeps is refused (503), and after a level-2 sleep whose weights were not reloaded it
  fails (500): a worker that woke a level-2 engine with a plain `/wake_up` would be caught.

Every call to those endpoints is appended as one JSON line ({"model", "call", ...}) to the file SLEEP_DOUBLE_LOG.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

TAGS = ("weights", "kv_cache")


class Engine:
    def __init__(self, name: str, log_path: str | None) -> None:
        self.name = name
        self.log_path = log_path
        self.sleeping: set[str] = set()
        self.weights_valid = True
        self.lock = threading.Lock()

    def record(self, call: str, **fields: Any) -> None:
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"model": self.name, "call": call, **fields}) + "\n")

    def sleep(self, level: int) -> None:
        self.sleeping = set(TAGS)
        if level >= 2:
            self.weights_valid = False
        self.record("sleep", level=level)

    def wake_up(self, tags: list[str]) -> None:
        self.sleeping -= set(tags or TAGS)
        self.record("wake_up", tags=tags)

    def rpc(self, method: str) -> tuple[int, str]:
        self.record("collective_rpc", method=method)
        if method != "reload_weights":
            return 400, f"unknown method {method}"
        if "weights" in self.sleeping:
            return 500, "reload_weights while the weights' memory sleeps"
        self.weights_valid = True
        return 200, ""

    def chat(self) -> tuple[int, dict[str, Any]]:
        if self.sleeping:
            return 503, {"error": {"message": f"engine is sleeping ({sorted(self.sleeping)})"}}
        if not self.weights_valid:
            return 500, {"error": {"message": "weights were discarded by a level-2 sleep and never reloaded"}}
        message = {"role": "assistant", "content": "awake"}
        return 200, {
            "id": "chatcmpl-double",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }


def handler(engine: Engine) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def reply(self, status: int, body: Any = None) -> None:
            payload = json.dumps(body if body is not None else {}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            path = urlparse(self.path).path
            if path == "/health":
                self.reply(200)
            elif path == "/v1/models":
                self.reply(200, {"object": "list", "data": [{"id": engine.name, "object": "model"}]})
            elif path == "/is_sleeping":
                self.reply(200, {"is_sleeping": bool(engine.sleeping)})
            else:
                self.reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            url = urlparse(self.path)
            query = parse_qs(url.query)
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            body = json.loads(raw) if raw else {}
            with engine.lock:
                if url.path == "/sleep":
                    engine.sleep(int(query.get("level", ["1"])[0]))
                    self.reply(200, {"status": "sleeping"})
                elif url.path == "/wake_up":
                    engine.wake_up(query.get("tags", []))
                    self.reply(200, {"status": "sleeping" if engine.sleeping else "awake"})
                elif url.path == "/collective_rpc":
                    status, error = engine.rpc(str(body.get("method")))
                    self.reply(status, {"results": [None]} if status == 200 else {"error": error})
                elif url.path == "/v1/chat/completions":
                    self.reply(*engine.chat())
                else:
                    self.reply(404, {"error": "not found"})

    return Handler


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default="double")
    args, _ = p.parse_known_args()  # every other vLLM argument is accepted and ignored
    engine = Engine(args.served_model_name, os.environ.get("SLEEP_DOUBLE_LOG"))
    server = ThreadingHTTPServer((args.host, args.port), handler(engine))
    print(f"sleep-mode engine double on http://{args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
