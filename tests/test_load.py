"""A bounded load test on loopback: closed-loop clients against the router, one real CPU vLLM engine behind it.

Two steps of fixed duration, then it stops by itself: CONCURRENCY_OK clients (within the router's in-flight cap
per replica) for STEP_S seconds, then CONCURRENCY_OVER clients (three times the cap) for STEP_S seconds.
Expected: no error at all within capacity; under overload only the documented 503 "overloaded" (with
Retry-After) for the excess, while the admitted requests keep the engine at its cap and never beyond it
(backpressure, not collapse); the router's memory flat; the engine idle afterwards. Figures go to
build/reliability/load.json (docs/reliability.md quotes them).

"Never beyond it" is read from the engine itself (its requests running plus waiting, sampled every 0.1 s through
the worker), not from the clients' latency: a p95 measured by 24 clients in one pytest process on a shared 2-core
machine moves with whatever else runs (a CI run failed a bound on it: 2.1 s under overload beside 0.34 s within
capacity), while a router that let the excess through shows it in the engine's queue at once.

"Keeps the engine at its cap" is checked by Little's law (mean requests in flight = answered/s x mean latency),
not by comparing answers per second between the two steps: the CPU engine's own speed swings by +-40% from
one 20 s step to the next on a shared 2-core machine, which a throughput ratio cannot tell from a collapse.
A router that starved the engine (leaked slots, shed with free capacity) would show fewer in flight.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .harness import engine_metric, metric_sum
from .secure_harness import (
    API_KEY,
    SHARED_ALIAS,
    SHARED_CAP,
    SHARED_MAX_MODEL_LEN,
    Observations,
    SecureStack,
    bearer,
    rss_kib,
)

ALIAS = SHARED_ALIAS
CAP = SHARED_CAP  # MAX_INFLIGHT_PER_REPLICA of the shared stack
CONCURRENCY_OK = 8
CONCURRENCY_OVER = 24
STEP_S = 12.0
MAX_TOKENS = 16
CLIENT_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def obs() -> Iterator[Observations]:
    o = Observations("load")
    yield o
    o.write()


@pytest.fixture(scope="module")
def stack(secure_stack: SecureStack) -> SecureStack:
    return secure_stack


async def engine_peak(metrics_url: str, until: float) -> int:
    """The most requests the engine held at once (running + waiting), sampled every 0.1 s until `until`."""
    peak = 0.0
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        while time.monotonic() < until:
            text = (await client.get(metrics_url)).text
            held = metric_sum(text, "vllm:num_requests_running") + metric_sum(text, "vllm:num_requests_waiting")
            peak = max(peak, held)
            await asyncio.sleep(0.1)
    return int(peak)


async def closed_loop(url: str, clients: int, seconds: float, metrics_url: str) -> dict[str, Any]:
    """`clients` loops, each sending its next request when the previous one is answered, for `seconds`, while the
    engine's queue is sampled from `metrics_url`."""
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=limits, headers=bearer(API_KEY)) as client:

        async def loop(i: int) -> None:
            body = {"model": ALIAS, "prompt": f"Request {i} says", "max_tokens": MAX_TOKENS, "ignore_eos": True}
            while time.monotonic() < deadline:
                start = time.monotonic()
                try:
                    resp = await client.post(f"{url}/v1/completions", json=body)
                except httpx.TimeoutException:
                    outcomes["timeout"] += 1
                    continue
                except httpx.HTTPError as exc:
                    outcomes[f"transport:{type(exc).__name__}"] += 1
                    continue
                if resp.status_code == 200:
                    latencies.append(time.monotonic() - start)
                    outcomes["200"] += 1
                    continue
                code = resp.json().get("error", {}).get("code")
                outcomes[f"{resp.status_code}:{code}"] += 1
                if resp.status_code == 503:
                    assert int(resp.headers["retry-after"]) >= 1
                    await asyncio.sleep(0.25)  # a client backs off (less than Retry-After, to keep the pressure)

        started = time.monotonic()
        peak, *_ = await asyncio.gather(engine_peak(metrics_url, deadline), *(loop(i) for i in range(clients)))
        elapsed = time.monotonic() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [0.0] * 99
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "outcomes": dict(outcomes),
        "answered_per_s": round(outcomes["200"] / elapsed, 2),
        # Little's law over the answered requests: how many of them were in flight on average.
        "mean_in_flight": round(sum(latencies) / elapsed, 2),
        "tokens_per_s": round(outcomes["200"] * MAX_TOKENS / elapsed, 1),
        "engine_peak_requests": peak,
        "latency_s": {
            "p50": round(q[49], 3),
            "p95": round(q[94], 3),
            "p99": round(q[98], 3),
            "max": round(max(latencies, default=0.0), 3),
        },
    }


def test_load_within_capacity_then_overload(stack: SecureStack, obs: Observations) -> None:
    router_pid = stack.router.proc.pid
    replica = stack.model(ALIAS)["replicas"][0]["replica_id"]
    metrics = f"{stack.workers['w1'].url}/engines/{replica}/metrics"
    asyncio.run(closed_loop(stack.router.url, 2, 3.0, metrics))  # warm-up (pools, first compiled paths)
    rss_before = rss_kib(router_pid)
    within = asyncio.run(closed_loop(stack.router.url, CONCURRENCY_OK, STEP_S, metrics))
    over = asyncio.run(closed_loop(stack.router.url, CONCURRENCY_OVER, STEP_S, metrics))
    rss_after = rss_kib(router_pid)
    obs.record(
        "setup",
        {
            "engines": 1,
            "max_model_len": SHARED_MAX_MODEL_LEN,
            "max_tokens": MAX_TOKENS,
            "max_in_flight_per_replica": CAP,
            "step_seconds": STEP_S,
            "client_timeout_s": CLIENT_TIMEOUT_S,
        },
    )
    obs.record("within_capacity", within)
    obs.record("overload", over)
    obs.record("router_rss_kib", {"before": rss_before, "after": rss_after, "growth": rss_after - rss_before})

    # Within capacity: every request answered.
    assert set(within["outcomes"]) == {"200"}, within
    # Overload: answers, or the documented 503 at once; nothing else (no timeouts, no 5xx, no resets).
    assert set(over["outcomes"]) <= {"200", "503:overloaded"}, over
    assert over["outcomes"].get("503:overloaded", 0) > 0, over  # the excess was shed, not queued without bound
    # Backpressure, not collapse: the admitted requests keep the engine at its cap, and never beyond it (the
    # engine's own queue; each request's latency is then bounded by the cap's, whatever the machine's speed).
    assert within["mean_in_flight"] >= 0.75 * CONCURRENCY_OK, within
    assert over["mean_in_flight"] >= 0.75 * CAP, over
    assert over["engine_peak_requests"] == CAP, over
    # The router's memory is flat and the engine is idle when the load stops.
    assert rss_after - rss_before < 16 * 1024, (rss_before, rss_after)
    assert engine_metric(stack.workers["w1"].url, replica, "vllm:num_requests_running") == 0
