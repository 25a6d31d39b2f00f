"""A fault-injection stand-in for vLLM's OpenAI server whose answers are slow, for tests/test_draining.py: not vLLM.

With `tests/slow_engine` first on PYTHONPATH, the worker's usual engine command (`python -m
vllm.entrypoints.openai.api_server --model ... --served-model-name ALIAS --port P ...`) runs this instead: it starts
in a moment, uses no CPU to speak of, and generates on a clock, so a request is still running when a test drains,
deletes or stops what serves it, and a cut request shows.

- `POST /v1/completions`, `POST /v1/chat/completions`: `max_tokens` tokens, one every SLOW_ENGINE_TOKEN_MS
  milliseconds (default 100). Streamed: one SSE event per token (OpenAI's completion or chat chunk shape), then a
  usage event and `data: [DONE]`. Not streamed: the whole answer after the same time, with its `usage`.
- `GET /health`, `GET /v1/models`.
- SIGTERM (the worker stopping the engine) ends it at once, cutting whatever runs, as vLLM's own shutdown does.

Every start, request and exit is appended as one JSON line to SLOW_ENGINE_LOG (if set): `{"event": "start" |
"request" | "exit", "model", "pid", ...}`; a request says when it began and ended (unix seconds), how many tokens it
sent and whether it was `completed` (False: its connection broke first); an exit says how many requests were
running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from typing import Any

INTERVAL_S = float(os.environ.get("SLOW_ENGINE_TOKEN_MS", "100")) / 1000.0
LOG = os.environ.get("SLOW_ENGINE_LOG")


def record(event: str, model: str, **fields: Any) -> None:
    if LOG:
        line = json.dumps({"event": event, "model": model, "pid": os.getpid(), "t": time.time(), **fields})
        with open(LOG, "a") as f:
            f.write(line + "\n")


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _usage(n: int) -> dict[str, int]:
    return {"prompt_tokens": 4, "completion_tokens": n, "total_tokens": 4 + n}


def _event(model: str, chat: bool, i: int) -> bytes:
    if chat:
        delta = {"role": "assistant", "content": f" t{i}"} if i == 0 else {"content": f" t{i}"}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
        body = {"id": "chatcmpl-slow", "object": "chat.completion.chunk", "model": model, "choices": [choice]}
    else:
        choice = {"index": 0, "text": f" t{i}", "logprobs": None, "finish_reason": None}
        body = {"id": "cmpl-slow", "object": "text_completion", "model": model, "choices": [choice]}
    body["created"] = int(time.time())
    return f"data: {json.dumps(body)}\n\n".encode()


def _whole(model: str, chat: bool, n: int) -> bytes:
    text = "".join(f" t{i}" for i in range(n))
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "length",
        }
        body = {"id": "chatcmpl-slow", "object": "chat.completion", "model": model, "choices": [choice]}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        body = {"id": "cmpl-slow", "object": "text_completion", "model": model, "choices": [choice]}
    return json.dumps({**body, "created": int(time.time()), "usage": _usage(n)}).encode()


class Server:
    def __init__(self, name: str) -> None:
        self.name = name
        self.running = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path = line.split()[:2]
                length = 0
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b""):
                        break
                    if h[:15].lower() == b"content-length:":
                        length = int(h.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                if method == b"POST" and path in (b"/v1/completions", b"/v1/chat/completions"):
                    req = json.loads(body)
                    n = int(req.get("max_tokens") or req.get("max_completion_tokens") or 16)
                    await self.generate(writer, path == b"/v1/chat/completions", bool(req.get("stream")), n)
                elif path == b"/health":
                    self.reply(writer, 200, b"")
                elif path == b"/v1/models":
                    self.reply(writer, 200, json.dumps({"object": "list", "data": [{"id": self.name}]}).encode())
                else:
                    self.reply(writer, 404, b'{"detail":"Not Found"}')
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    @staticmethod
    def reply(writer: asyncio.StreamWriter, status: int, payload: bytes) -> None:
        head = f"HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
        writer.write(head.encode() + payload)

    async def generate(self, writer: asyncio.StreamWriter, chat: bool, stream: bool, n: int) -> None:
        began, sent, completed = time.time(), 0, False
        self.running += 1
        try:
            start = time.monotonic()
            if stream:
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
            for i in range(n):
                # On a fixed schedule: a late wake-up does not shift the following tokens.
                await asyncio.sleep(max(0.0, start + (i + 1) * INTERVAL_S - time.monotonic()))
                if stream:
                    writer.write(_chunk(_event(self.name, chat, i)))
                    await writer.drain()
                sent += 1
            if stream:
                obj = "chat.completion.chunk" if chat else "text_completion"
                usage = {"id": "slow", "object": obj, "model": self.name, "choices": [], "usage": _usage(n)}
                tail = _chunk(f"data: {json.dumps(usage)}\n\n".encode()) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
                writer.write(tail)
            else:
                self.reply(writer, 200, _whole(self.name, chat, n))
            await writer.drain()
            completed = True
        finally:
            self.running -= 1
            record(
                "request", self.name, stream=stream, n=n, sent=sent, begin=began, end=time.time(), completed=completed
            )


async def serve(host: str, port: int, name: str) -> None:
    server = Server(name)

    def terminate() -> None:
        record("exit", name, running=server.running)
        os._exit(0)

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminate)
    listener = await asyncio.start_server(server.handle, host, port, backlog=1024)
    record("start", name, port=port)
    async with listener:
        await listener.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default="slow")
    args, _ = p.parse_known_args()  # every other vLLM argument is accepted and ignored
    print(f"slow stand-in engine on http://{args.host}:{args.port} ({INTERVAL_S * 1000:.0f} ms a token)", flush=True)
    asyncio.run(serve(args.host, args.port, args.served_model_name))


if __name__ == "__main__":
    main()
