"""A stand-in for `python -m vllm.entrypoints.openai.api_server` that answers at once: the upstream of
bench/hot_path.py --fake-engine, which measures what the proxies themselves cost with no model behind them.

With this directory first on PYTHONPATH, the worker's engine subprocess (same command line as for real vLLM)
imports this module instead of vLLM. It serves GET /health, GET /v1/models, POST /v1/completions and
/v1/chat/completions: non-streaming requests get a fixed completion immediately; streaming ones get
`max_tokens` SSE events, the first at once and then one every FAKE_TOKEN_INTERVAL_MS milliseconds (default 10),
then a usage event and [DONE] -- a generator with known timing, so any buffering on the way shows.
Raw asyncio streams on uvloop: it costs the machine far less than a proxy in front of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

INTERVAL_S = float(os.environ.get("FAKE_TOKEN_INTERVAL_MS", "10")) / 1000.0


def _completion(model: str, n: int) -> bytes:
    # As vLLM 0.32 answers (CompletionResponse.model_dump() through Starlette's JSONResponse: compact, every field,
    # its usage in UsageInfo's order), so that what the router reads of an answer is what it reads of vLLM's.
    return json.dumps(
        {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "text": " lorem" * n,
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                    "token_ids": None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": None,
                    "routed_experts": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": {
                "prompt_tokens": 26,
                "total_tokens": 26 + n,
                "completion_tokens": n,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()


def _event(model: str, i: int, continuous_usage: bool = False) -> bytes:
    event = {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": f" tok{i}", "logprobs": None, "finish_reason": None, "stop_reason": None}],
    }
    if continuous_usage:  # vLLM's `stream_options.continuous_usage_stats` (the router asks for it: stream migration)
        event["usage"] = {"prompt_tokens": 26, "total_tokens": 27 + i, "completion_tokens": i + 1}
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()  # compact, as vLLM writes it


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class Server:
    def __init__(self, name: str) -> None:
        self.name = name

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
                    model = str(req.get("model", self.name))
                    if req.get("stream"):
                        options = req.get("stream_options") or {}
                        await self.stream(writer, model, n, bool(options.get("continuous_usage_stats")))
                        continue
                    self.reply(writer, 200, _completion(model, n))
                elif path == b"/health":
                    self.reply(writer, 200, b"")
                elif path == b"/v1/models":
                    self.reply(writer, 200, json.dumps({"object": "list", "data": [{"id": self.name}]}).encode())
                else:
                    self.reply(writer, 404, b'{"error": "not found"}')
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    @staticmethod
    def reply(writer: asyncio.StreamWriter, status: int, payload: bytes) -> None:
        writer.write(
            f"HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
            + payload
        )

    async def stream(self, writer: asyncio.StreamWriter, model: str, n: int, continuous_usage: bool = False) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        start = time.monotonic()
        for i in range(n):
            if i:
                # On a fixed schedule: a late wake-up does not shift the following tokens.
                await asyncio.sleep(max(0.0, start + i * INTERVAL_S - time.monotonic()))
            writer.write(_chunk(_event(model, i, continuous_usage)))
            await writer.drain()
        usage = {
            "id": "cmpl-fake",
            "object": "text_completion",
            "model": model,
            "choices": [],
            "usage": {"prompt_tokens": 26, "total_tokens": 26 + n, "completion_tokens": n},
        }
        writer.write(
            _chunk(f"data: {json.dumps(usage, separators=(',', ':'))}\n\n".encode())
            + _chunk(b"data: [DONE]\n\n")
            + b"0\r\n\r\n"
        )
        await writer.drain()


async def serve(host: str, port: int, name: str) -> None:
    server = await asyncio.start_server(Server(name).handle, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default="fake")
    args, _ = p.parse_known_args()  # every other vLLM argument is accepted and ignored
    print(f"fake vLLM on http://{args.host}:{args.port} (token interval {INTERVAL_S * 1000:.0f} ms)", flush=True)
    try:
        import uvloop

        uvloop.run(serve(args.host, args.port, args.served_model_name))
    except ImportError:
        asyncio.run(serve(args.host, args.port, args.served_model_name))


if __name__ == "__main__":
    main()
