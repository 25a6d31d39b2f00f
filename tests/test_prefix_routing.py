"""Prefix-aware routing on real CPU vLLM engines: a model registered with `routing: prefix` and two replicas sends
requests that share a long prefix to one replica, whose engine then serves that prefix from its cache; a second
prefix goes to the other replica; PATCHed to `least_loaded`, the same requests spread over both.

Which replica served a request is read from the engines themselves, through the worker
(`/engines/{replica}/metrics`: vLLM's finished-request and prefix-cache counters); the cache hits also from each
answer's `usage.prompt_tokens_details.cached_tokens` (the engines run with `--enable-prompt-tokens-details`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .harness import Stack, wait_until

ALIAS = "pfx"
# Words of the tiny model's tokenizer corpus, so that the prompt stays well inside max_model_len (2048 tokens)
# while spanning several of the CPU engine's 128-token cache blocks.
SYSTEM = "You are a router. The quick brown fox jumps over the lazy dog. " * 24
OTHER = "Serverless inference loads models on demand and puts them to sleep. " * 24


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    # One worker with two CPU slots: the model's two replicas run side by side on it.
    s = Stack(tmp_path_factory.mktemp("prefix"), env={"CPU_SLOTS": "2"}).start(workers=1)
    try:
        body = {
            "alias": ALIAS,
            "model_name": str(tiny_model),
            "max_model_len": 2048,
            "dtype": "float32",  # see ../shared/ENVIRONMENT.md: bf16 once crashed on CPU at a first short request
            "min_replicas": 2,
            "max_replicas": 2,
            "routing": "prefix",
            "extra_args": ["--enable-prompt-tokens-details"],
        }
        resp = s.post("/v1/models/register", json=body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["policy"]["routing"] == "prefix"
        wait_until(
            lambda: [r["state"] for r in s.model(ALIAS)["replicas"]] == ["ready", "ready"],
            600,
            interval=1,
            what="two ready replicas",
        )
        yield s
    finally:
        s.stop()


def replicas(stack: Stack) -> list[str]:
    return sorted(r["replica_id"] for r in stack.model(ALIAS)["replicas"])


def engine_counter(stack: Stack, replica: str, name: str) -> float:
    """The sum of one vLLM counter over its series, read from the engine through the worker."""
    text = httpx.get(f"{stack.workers['w1'].url}/engines/{replica}/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def served(stack: Stack) -> dict[str, float]:
    return {r: engine_counter(stack, r, "vllm:request_success_total") for r in replicas(stack)}


def ask(stack: Stack, system: str, question: str) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    body = {"model": ALIAS, "messages": messages, "max_tokens": 2, "temperature": 0}
    resp = stack.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    usage: dict[str, Any] = resp.json()["usage"]
    return usage


def cached(usage: dict[str, Any]) -> int:
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {r: after[r] - before[r] for r in after}


def test_a_shared_prefix_lands_on_one_replica_and_hits_its_cache(stack: Stack) -> None:
    ids = replicas(stack)
    before = served(stack)
    hits_before = {r: engine_counter(stack, r, "vllm:prefix_cache_hits_total") for r in ids}
    usages = [ask(stack, SYSTEM, f"Question number {i}: what is {i} + {i}?") for i in range(6)]
    counts = delta(served(stack), before)
    home = max(counts, key=lambda r: counts[r])
    assert counts[home] == 6 and sum(counts.values()) == 6, counts  # all six on one replica
    assert usages[0]["prompt_tokens"] > 256, usages[0]  # the prefix spans whole 128-token blocks
    # The engine served the shared prefix from its cache: in each answer after the first, and in its metrics.
    assert all(cached(u) >= 128 for u in usages[1:]), usages
    hits = engine_counter(stack, home, "vllm:prefix_cache_hits_total") - hits_before[home]
    assert hits >= sum(cached(u) for u in usages[1:]) > 0
    # A second prefix starts on the other replica (at equal load, the one holding fewer of the model's prompts)
    # and stays there.
    before = served(stack)
    others = [ask(stack, OTHER, f"Tell me about {topic}.") for topic in ("cats", "dogs", "owls", "foxes")]
    counts = delta(served(stack), before)
    (other,) = [r for r in ids if r != home]
    assert counts == {home: 0, other: 4}, counts
    assert all(cached(u) >= 128 for u in others[1:]), others
    # The first prefix still goes home.
    before = served(stack)
    assert cached(ask(stack, SYSTEM, "One more question?")) >= 128
    assert delta(served(stack), before) == {home: 1, other: 0}


def router_counter(stack: Stack, name: str) -> float:
    match = re.search(rf'^{name}{{model="{ALIAS}"}} (\S+)$', stack.get("/metrics").text, re.M)
    assert match, name
    return float(match[1])


def test_the_router_reports_its_prefix_hit_ratio(stack: Stack) -> None:
    blocks = router_counter(stack, "svllm_router_prefix_blocks_total")
    hit = router_counter(stack, "svllm_router_prefix_hit_blocks_total")
    assert blocks > 0 and 0.5 < hit / blocks < 1, (hit, blocks)  # 11 requests, 2 of them first of their prefix


def test_patched_to_least_loaded_the_same_requests_spread(stack: Stack) -> None:
    refused = httpx.patch(f"{stack.router.url}/v1/models/{ALIAS}", json={"routing": "nearest"}, timeout=30)
    assert refused.status_code == 400, refused.text
    resp = httpx.patch(f"{stack.router.url}/v1/models/{ALIAS}", json={"routing": "least_loaded"}, timeout=30)
    assert resp.status_code == 200 and resp.json()["policy"]["routing"] == "least_loaded", resp.text
    time.sleep(2)  # the router's long-poll brings the new route in milliseconds
    before = served(stack)
    for i in range(16):
        ask(stack, SYSTEM, f"Question number {i}?")
    counts = delta(served(stack), before)
    # One request at a time, so every pick is a tie broken at random: both replicas serve (all 16 on one: 2 in 65,536).
    assert sum(counts.values()) == 16 and min(counts.values()) > 0, counts
    # Back to prefix: the requests gather again (on whichever replica the first of them goes to).
    resp = httpx.patch(f"{stack.router.url}/v1/models/{ALIAS}", json={"routing": "prefix"}, timeout=30)
    assert resp.status_code == 200
    time.sleep(2)
    before = served(stack)
    for i in range(6):
        ask(stack, SYSTEM, f"Another question {i}?")
    counts = delta(served(stack), before)
    assert sorted(counts.values()) == [0, 6], counts
