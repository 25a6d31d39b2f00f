"""A Prometheus scrape of the router at 10,000 models, and what the event loop that relays inference sees meanwhile.

The router renders ~10 series per routed model before any request (in flight, queued, the queue-wait histogram and
the chat/completions latency and TTFT histograms at 0), more once requests came. The table and the metrics are the
real ones (RouteTable, RouterMetrics), in process; requests are recorded as the middleware records them. Two ways,
in one run, alternating: `on_loop` (the text written on the event loop, as before issue 19) and `off_loop` (what
GET /metrics does now: counters copied on the loop, the text written in a thread). For each: the scrape's time and
the gaps a 1 ms ticker on the loop sees during back-to-back scrapes (how long a relayed chunk would wait).

    .venv/bin/python bench/router_scrape.py [--models 10000] [--scrapes 10]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from common import LoopGaps, log, summary, write_result
from serverless_vllm.metrics.router import RouterMetrics
from serverless_vllm.router.table import RouteTable
from serverless_vllm.schemas import Endpoint, ModelState
from serverless_vllm.schemas.routing import ModelRoute, RoutingTable


def make(models: int, active: int) -> RouterMetrics:
    routes = {
        f"m{i:05d}": ModelRoute(
            state=ModelState.READY,
            endpoints=[Endpoint(replica_id=f"r{i}", worker_id=f"w{i % 100}", url=f"http://w{i % 100}:7000")],
        )
        for i in range(models)
    }
    table = RouteTable()
    table.update(RoutingTable(version=1, epoch="bench", models=routes))
    metrics = RouterMetrics(lambda: table)
    for i in range(active):  # models that served requests: a status series each, latencies observed
        metrics.observe_request(f"m{i:05d}", "chat_completions", 200, 0.05, 0.01)
    metrics.render()  # the first scrape creates the series at 0 (both ways pay it once, before measuring)
    return metrics


async def measure(scrape: Callable[[], Awaitable[bytes]], scrapes: int) -> dict[str, Any]:
    times, size = [], 0
    async with LoopGaps() as loop:
        for _ in range(scrapes):
            t = time.perf_counter()
            size = len(await scrape())
            times.append(time.perf_counter() - t)
            await asyncio.sleep(0.01)  # between two scrapes the loop serves (Prometheus scrapes every 15 s)
    return {"scrape_ms": summary(times, 1000.0, 1), "loop_gap_ms": summary(loop.gaps, 1000.0, 2), "bytes": size}


async def run(models: int, active: int, scrapes: int, rounds: int) -> dict[str, Any]:
    metrics = make(models, active)

    async def on_loop() -> bytes:
        return metrics.render()

    results: dict[str, list[dict[str, Any]]] = {"on_loop": [], "off_loop": []}
    for r in range(rounds):
        order = [("on_loop", on_loop), ("off_loop", metrics.render_off_loop)]
        for name, scrape in order if r % 2 == 0 else reversed(order):
            res = await measure(scrape, scrapes)
            results[name].append(res)
            log(
                f"round {r} {name}: scrape p50 {res['scrape_ms']['p50']} ms, loop gap p99 {res['loop_gap_ms']['p99']} ms"
            )
    series = sum(1 for line in metrics.render().decode().splitlines() if line and not line.startswith("#"))
    return {"models": models, "active_models": active, "series": series, "rounds": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=10_000)
    p.add_argument("--active", type=int, default=1_000, help="models that served requests")
    p.add_argument("--scrapes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one round of 3 scrapes")
    a = p.parse_args()
    if a.quick:
        a.rounds, a.scrapes = 1, 3
    write_result("router_scrape", asyncio.run(run(a.models, a.active, a.scrapes, a.rounds)))


if __name__ == "__main__":
    main()
