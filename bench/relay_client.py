"""The relay's HTTP client alone: CPU per request of serverless_vllm.dataplane.http1 against aiohttp (what the relay used
before) and httpx (before that), each sending the relay's request to the same upstream.

The upstream is the stand-in engine (bench/fake_vllm, a separate process on loopback), which answers at once, so
what is left is the client's own cost. Each client runs in a fresh process of its own, on uvloop, with
`--concurrency` requests in flight; CPU time is the process's own (getrusage), over `--requests` requests after
a warm-up. Clients are measured in alternating rounds, so a noisy moment hits all of them alike.

    .venv/bin/python bench/relay_client.py --quick
    .venv/bin/python bench/relay_client.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ROOT,
    free_port,
    http_ok,
    loadavg,
    log,
    machine_info,
    median,
    wait_for_quiet,
    wait_until,
    write_result,
)

FAKE_VLLM = Path(__file__).resolve().parent / "fake_vllm"
CLIENTS = ("http1", "aiohttp", "httpx")
BODY = json.dumps({"model": "fake", "prompt": "Hello, my name is", "max_tokens": 8}).encode()
HEADERS = {"content-type": "application/json", "authorization": "Bearer bench-token", "x-svllm-replica": "r-bench"}


async def _measure(client: str, base_url: str, requests: int, concurrency: int) -> dict[str, float]:
    """Runs in the child process: one client, `requests` POSTs after a warm-up."""
    path = "/v1/completions"
    if client == "http1":
        from serverless_vllm.dataplane.http1 import Client

        h1 = Client()

        async def one() -> None:
            resp = await h1.post(base_url, path, BODY, HEADERS)
            await resp.read()
            resp.close()
    elif client == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=2000, limit_per_host=0, keepalive_timeout=60.0),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
        )  # as the relay had it configured

        async def one() -> None:
            async with session.post(base_url + path, data=BODY, headers=HEADERS) as resp:
                await resp.read()
    else:
        import httpx

        hx = httpx.AsyncClient(limits=httpx.Limits(max_connections=2000, max_keepalive_connections=200))

        async def one() -> None:
            resp = await hx.post(base_url + path, content=BODY, headers=HEADERS)
            await resp.aread()

    async def loop(n: int) -> None:
        for _ in range(n):
            await one()

    await asyncio.gather(*(loop(max(1, requests // 20 // concurrency)) for _ in range(concurrency)))  # warm-up
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.gather(*(loop(requests // concurrency) for _ in range(concurrency)))
    after, elapsed = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    done = requests // concurrency * concurrency
    user = after.ru_utime - before.ru_utime
    system = after.ru_stime - before.ru_stime
    return {
        "requests": done,
        "rps": round(done / elapsed, 1),
        "cpu_ms_per_request": round((user + system) * 1e3 / done, 4),
        "user_ms_per_request": round(user * 1e3 / done, 4),
        "system_ms_per_request": round(system * 1e3 / done, 4),
    }


def child_main(client: str, base_url: str, requests: int, concurrency: int) -> None:
    import uvloop

    print(json.dumps(uvloop.run(_measure(client, base_url, requests, concurrency))))


def run_client(client: str, base_url: str, requests: int, concurrency: int) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            client,
            "--url",
            base_url,
            "--requests",
            str(requests),
            "--concurrency",
            str(concurrency),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT / "services")},
    )
    if out.returncode != 0:
        raise RuntimeError(f"{client} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: one round, fewer requests")
    p.add_argument("--rounds", type=int)
    p.add_argument("--requests", type=int)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--wait-quiet", type=float)
    p.add_argument("--child", choices=CLIENTS, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child_main(a.child, a.url, a.requests, a.concurrency[0])
        return
    rounds = a.rounds or (1 if a.quick else 3)
    requests = a.requests or (2000 if a.quick else 10000)
    quiet = wait_for_quiet(a.wait_quiet if a.wait_quiet is not None else (0 if a.quick else 600))
    result: dict[str, Any] = {
        "benchmark": "relay_client",
        "command": " ".join(["python", "bench/relay_client.py", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(),
        "quiet": quiet,
        "settings": {"rounds": rounds, "requests": requests, "concurrency": a.concurrency},
        "runs": [],
    }
    port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", str(port)],
        env={**os.environ, "PYTHONPATH": str(FAKE_VLLM)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{base_url}/health"), 30, what="the stand-in engine")
        for r in range(rounds):
            for c in a.concurrency:
                for client in CLIENTS:
                    run = {"round": r, "client": client, "concurrency": c, **run_client(client, base_url, requests, c)}
                    log(f"{run}")
                    result["runs"].append(run)
    finally:
        upstream.terminate()
        upstream.wait(10)
    result["summary"] = {
        str(c): {
            client: {
                key: median(run[key] for run in result["runs"] if run["client"] == client and run["concurrency"] == c)
                for key in ("cpu_ms_per_request", "user_ms_per_request", "system_ms_per_request", "rps")
            }
            for client in CLIENTS
        }
        for c in a.concurrency
    }
    result["loadavg_end"] = loadavg()
    write_result("relay_client_quick" if a.quick else "relay_client", result)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
