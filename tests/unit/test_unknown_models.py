"""A wrong model name asked again and again costs one manager call per UNKNOWN_MODEL_TTL, not one per request
(router/negative_cache.py, Forwarder.hold); a model registered since is served at once.

The Forwarder is the real one over a real RouteTable and ManagerSync; the manager and the upstream client are
stand-ins (below), and the cache's clock is a hand-moved one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from serverless_vllm.config import RouterSettings
from serverless_vllm.dataplane.body import InferenceRequest
from serverless_vllm.dataplane.endpoints import BY_PATH
from serverless_vllm.errors import APIError
from serverless_vllm.router.negative_cache import NegativeCache
from serverless_vllm.router.proxy import Forwarder
from serverless_vllm.router.sync import ManagerSync
from serverless_vllm.router.table import RouteTable
from serverless_vllm.schemas import Endpoint, ModelRoute, ModelState, RoutingTable
from starlette.responses import Response


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingManager:
    """Stands for the manager's API (ManagerAPI): only get_model is reached on this path, and it knows no model
    (the registry's own 404), or fails as an unreachable manager does (503) when `error` says so."""

    def __init__(self, error: APIError | None = None) -> None:
        self.get_model_calls = 0
        self.error = error

    async def get_model(self, alias: str) -> Any:
        self.get_model_calls += 1
        raise self.error or APIError(404, f"The model '{alias}' does not exist", "model_not_found")


class AnsweringClient:
    """Stands for the pooled upstream client (dataplane/relay.UpstreamClient): every replica answers 200."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def open(self, base_url: str, path: str, body: bytes, headers: dict[str, str], method: str = "POST") -> Any:
        self.sent.append(base_url)
        return SimpleNamespace(status=200, headers={})

    async def respond(self, upstream: Any, on_done: Callable[[], None] | None = None) -> Response:
        if on_done is not None:
            on_done()
        return Response(b"{}", media_type="application/json")


def request(alias: str) -> InferenceRequest:
    endpoint = BY_PATH["/v1/chat/completions"]
    return InferenceRequest(endpoint, b"{}", {"model": alias}, alias, "application/json")


def forwarder(
    manager: CountingManager, ttl_s: float = 2.0
) -> tuple[Forwarder, RouteTable, Clock, AnsweringClient, NegativeCache]:
    table = RouteTable()
    table.update(RoutingTable(version=1, epoch="e", models={}))
    clock, client = Clock(), AnsweringClient()
    unknown = NegativeCache(ttl_s, clock=clock)
    sync = ManagerSync(manager, table, "router-1", 1.0)  # type: ignore[arg-type]  # never started: no task runs
    fwd = Forwarder(RouterSettings(), table, sync, manager, client, unknown_models=unknown)  # type: ignore[arg-type]
    return fwd, table, clock, client, unknown


async def not_found(fwd: Forwarder, alias: str) -> APIError:
    with pytest.raises(APIError) as caught:
        await fwd.forward(request(alias))
    return caught.value


async def test_an_unknown_alias_asks_the_manager_once_per_ttl() -> None:
    manager = CountingManager()
    fwd, _, clock, _, _ = forwarder(manager)
    for _ in range(50):
        error = await not_found(fwd, "nope")
        assert (error.status, error.code, error.message) == (404, "model_not_found", "The model 'nope' does not exist")
    assert manager.get_model_calls == 1
    clock.now += 1.9
    await not_found(fwd, "nope")
    assert manager.get_model_calls == 1
    clock.now += 0.2  # 2.1 s after the manager's 404: asked again, and remembered again
    for _ in range(50):
        await not_found(fwd, "nope")
    assert manager.get_model_calls == 2
    await not_found(fwd, "other")  # each alias is its own entry
    assert manager.get_model_calls == 3


async def test_an_alias_registered_since_is_served_at_once() -> None:
    manager = CountingManager()
    fwd, table, _, client, unknown = forwarder(manager)
    await not_found(fwd, "late")
    assert unknown.get("late") is not None  # still within its TTL
    # The registration reaches the table (the manager's long-poll): the table's answer wins over the cache.
    replica = Endpoint(replica_id="r1", worker_id="w1", url="http://w1")
    table.update(
        RoutingTable(version=2, epoch="e", models={"late": ModelRoute(state=ModelState.READY, endpoints=[replica])})
    )
    response = await fwd.forward(request("late"))
    assert response.status_code == 200 and client.sent == ["http://w1"]
    assert manager.get_model_calls == 1


async def test_an_alias_registered_since_and_cold_is_held_not_refused() -> None:
    """Registered at zero replicas: the request waits for the engine, the cached 404 is not its answer."""
    manager = CountingManager()
    fwd, table, _, client, _ = forwarder(manager)
    await not_found(fwd, "cold")
    table.update(RoutingTable(version=2, epoch="e", models={"cold": ModelRoute(state=ModelState.COLD)}))
    held = asyncio.create_task(fwd.forward(request("cold")))
    await asyncio.sleep(0.01)
    assert not held.done() and table.queue_depth("cold") == 1  # waiting for a replica
    replica = Endpoint(replica_id="r1", worker_id="w1", url="http://w1")
    table.update(
        RoutingTable(version=3, epoch="e", models={"cold": ModelRoute(state=ModelState.READY, endpoints=[replica])})
    )
    response = await asyncio.wait_for(held, 5)
    assert response.status_code == 200 and client.sent == ["http://w1"]
    assert manager.get_model_calls == 1


async def test_other_manager_errors_are_not_remembered() -> None:
    manager = CountingManager(APIError(503, "manager unavailable: down", "manager_unavailable"))
    fwd, _, _, _, _ = forwarder(manager)
    for _ in range(3):
        assert (await not_found(fwd, "nope")).status == 503
    assert manager.get_model_calls == 3


async def test_zero_ttl_always_asks() -> None:
    manager = CountingManager()
    fwd, _, _, _, _ = forwarder(manager, ttl_s=0)
    for _ in range(3):
        await not_found(fwd, "nope")
    assert manager.get_model_calls == 3


def test_the_cache_is_bounded_oldest_out_and_expires() -> None:
    clock = Clock()
    cache = NegativeCache(2.0, max_entries=3, clock=clock)
    for i in range(5):
        clock.now += 0.1
        cache.add(f"a{i}", f"no a{i}")
    assert len(cache) == 3
    assert cache.get("a0") is None and cache.get("a1") is None and cache.get("a4") == "no a4"
    cache.add("a2", "no a2")  # again: now the newest, a3 is the oldest
    clock.now += 0.1
    cache.add("a5", "no a5")
    assert cache.get("a3") is None and cache.get("a2") == "no a2"
    clock.now += 1.95
    assert cache.get("a2") is None and cache.get("a5") == "no a5"  # 2.05 s old: gone; 1.95 s: still there
    clock.now += 0.1
    cache.add("b", "no b")  # the expired ones (a4, a5) leave on the way in
    assert len(cache) == 1
    cache.discard("b")
    assert cache.get("b") is None
