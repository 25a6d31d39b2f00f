"""The keep-alive race: clients whose pools drop idle connections after 5 s against a server that closes them after
its keep-alive timeout, on a busy server (docs/reliability.md, "Idle connections").

The official openai and anthropic clients (httpx) reuse a pooled connection idle less than 5 s; uvicorn closes one
idle 5 s by default. A request sent on a connection the server is about to close is reset, not answered (httpx's
ReadError). The window is the server's delay in reading what arrived: under uvloop a due timer runs before the poll
that would have read the request, so on a busy loop (a starved process, here a loop blocked 80 ms of every 100) the
server closes connections its client already wrote to, and the kernel answers the request with a reset.

Each client sends one request, then three more, each after an idle spell of 4.9-5.1 s on the same pooled connection.
Run it with the services' setting and uvicorn's default:

    .venv/bin/python bench/keep_alive_race.py --keep-alive 75 --keep-alive 5

Writes bench/results/keep_alive_race.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from serverless_vllm.dataplane.server_protocol import CoalescingHttpToolsProtocol
from serverless_vllm.testing.ports import free_port

RESULTS = Path(__file__).parent / "results" / "keep_alive_race.json"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            asyncio.get_running_loop().create_task(busy())
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def busy() -> None:
    """The server's loop blocked 80 ms of every 100, as a process starved of CPU finds it."""
    while True:
        await asyncio.sleep(0.02)
        time.sleep(0.08)  # noqa: ASYNC251 (the point: the loop blocked)


def serve(port: int, keep_alive_s: int) -> None:
    config = uvicorn.Config(
        app,
        port=port,
        log_level="error",
        loop="uvloop",
        http=CoalescingHttpToolsProtocol,
        timeout_keep_alive=keep_alive_s,
    )
    uvicorn.Server(config).run()


async def clients(port: int, n: int) -> Counter[str]:
    outcomes: Counter[str] = Counter()

    async def one() -> None:
        async with httpx.AsyncClient() as client:  # httpx's pool: idle connections expire after 5 s
            await client.post(f"http://127.0.0.1:{port}/", content=b"x" * 100)
            for _ in range(3):
                await asyncio.sleep(4.9 + random.random() * 0.2)
                try:
                    await client.post(f"http://127.0.0.1:{port}/", content=b"x" * 100)
                    outcomes["answered"] += 1
                except httpx.HTTPError as exc:
                    outcomes[type(exc).__name__] += 1

    await asyncio.gather(*(one() for _ in range(n)))
    return outcomes


def run(keep_alive_s: int, n: int) -> dict[str, Any]:
    port = free_port()
    server = multiprocessing.Process(target=serve, args=(port, keep_alive_s), daemon=True)
    server.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        outcomes = asyncio.run(clients(port, n))
    finally:
        server.terminate()
        server.join(10)
    return {"keep_alive_s": keep_alive_s, "clients": n, "requests": 3 * n, "outcomes": dict(outcomes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-alive", type=int, action="append", help="the server's keep-alive (repeatable)")
    parser.add_argument("--clients", type=int, default=200)
    args = parser.parse_args()
    results = [run(k, args.clients) for k in args.keep_alive or [75, 5]]
    for r in results:
        print(json.dumps(r))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M"), "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
