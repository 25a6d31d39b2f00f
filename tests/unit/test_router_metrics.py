"""The router's /metrics: written off the event loop from a copy of the table's counters, and bounded at many models
(metrics/router.py; bench/router_scrape.py measures it at 10,000)."""

from __future__ import annotations

import threading

import pytest
from serverless_vllm.metrics import router as router_metrics
from serverless_vllm.metrics.router import RouterMetrics
from serverless_vllm.router.table import RouteTable
from serverless_vllm.schemas import Endpoint, ModelState
from serverless_vllm.schemas.routing import ModelRoute, RoutingTable


def table_of(models: int) -> RouteTable:
    routes = {
        f"m{i}": ModelRoute(
            state=ModelState.READY, endpoints=[Endpoint(replica_id=f"r{i}", worker_id="w", url="http://w:7000")]
        )
        for i in range(models)
    }
    table = RouteTable()
    table.update(RoutingTable(version=1, epoch="e", models=routes))
    return table


def series(text: bytes, name: str) -> list[str]:
    return [line for line in text.decode().splitlines() if line.startswith(name + "{")]


async def test_the_text_is_written_in_a_thread_from_counters_copied_on_the_loop() -> None:
    table = table_of(3)
    metrics = RouterMetrics(lambda: table)
    table.enqueue("m1")
    threads: list[str] = []
    real = router_metrics.render

    def spy(registry: object) -> bytes:
        threads.append(threading.current_thread().name)
        table.enqueue("m2")  # the loop goes on meanwhile: the scrape shows the copy taken before
        return real(registry)  # type: ignore[arg-type]

    router_metrics.render = spy  # type: ignore[assignment]
    try:
        text = await metrics.render_off_loop()
    finally:
        router_metrics.render = real
    assert threads and threads[0] != "MainThread"
    assert series(text, "svllm_router_queued_requests") == [
        'svllm_router_queued_requests{model="m0"} 0.0',
        'svllm_router_queued_requests{model="m1"} 1.0',
        'svllm_router_queued_requests{model="m2"} 0.0',
    ]


@pytest.mark.parametrize(("models", "precreated"), [(3, True), (router_metrics.PRECREATE_MAX_MODELS + 1, False)])
def test_series_at_zero_exist_before_a_first_request_only_up_to_the_bound(models: int, precreated: bool) -> None:
    table = table_of(models)
    metrics = RouterMetrics(lambda: table)
    text = metrics.render()
    latency = series(text, "svllm_request_duration_seconds_count")
    assert bool(latency) is precreated
    assert len(series(text, "svllm_router_in_flight_requests")) == models  # the load gauges of every model
    metrics.observe_request("m0", "chat_completions", 200, 0.1, None)
    assert series(metrics.render(), "svllm_request_duration_seconds_count")[0].startswith(
        'svllm_request_duration_seconds_count{endpoint="chat_completions",model="m0"}'
    )
