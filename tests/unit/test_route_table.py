"""The router's table: least in flight by two random choices, affinity, waiting for changes."""

import asyncio
import random

from serverless_vllm.router.policy import RequestKey
from serverless_vllm.router.table import RouteTable
from serverless_vllm.schemas import Endpoint, ModelRoute, ModelState, RoutingTable


def table_with(n: int) -> RouteTable:
    table = RouteTable(rng=random.Random(1))
    endpoints = [Endpoint(replica_id=f"r{i}", worker_id=f"w{i}", url=f"http://w{i}") for i in range(n)]
    table.update(
        RoutingTable(version=1, epoch="e", models={"m": ModelRoute(state=ModelState.READY, endpoints=endpoints)})
    )
    return table


def test_two_replicas_least_in_flight_wins() -> None:
    table = table_with(2)
    first = table.pick("m")
    table.started("m", first)
    second = table.pick("m")
    assert second.replica_id != first.replica_id
    table.started("m", second)
    table.finished("m", first)
    assert table.pick("m").replica_id == first.replica_id


def test_power_of_two_spreads_load() -> None:
    table = table_with(8)
    for _ in range(80):
        table.started("m", table.pick("m"))
    counts = [table._in_flight[f"r{i}"] for i in range(8)]
    assert max(counts) - min(counts) <= 3


def test_affinity_is_stable_and_excludes_work() -> None:
    table = table_with(4)
    chosen = {table.pick("m", key=RequestKey("alice")).replica_id for _ in range(10)}
    assert len(chosen) == 1
    other = table.pick("m", exclude=frozenset(chosen), key=RequestKey("alice"))
    assert other.replica_id not in chosen


def test_demand_report_counts_and_wakes() -> None:
    table = table_with(1)
    table.started("m", table.pick("m"))
    table.enqueue("cold")
    report = table.demand("router-1")
    assert report.models["m"].in_flight == 1 and report.models["m"].requests == 1
    assert report.wake == ["cold"]
    assert table.demand("router-1").models["m"].requests == 0


async def test_waiters_wake_on_update() -> None:
    table = table_with(0)
    waiter = asyncio.create_task(table.wait_change())
    await asyncio.sleep(0)
    assert not waiter.done()
    table.update(RoutingTable(version=2, epoch="e", models={}))
    await asyncio.wait_for(waiter, 1)


def test_a_replica_without_the_adapter_is_skipped_until_the_table_changes() -> None:
    table = table_with(1)
    route = table.route("m")
    assert route is not None and table.pick("m") is not None
    table.adapter_moved("m", "r0", version=0)  # said about a pick made at an older table: the table knows better
    assert table.pick("m") is not None
    table.adapter_moved("m", "r0", version=1)
    assert table.pick("m") is None and table.pick("other") is None
    table.update(RoutingTable(version=2, epoch="e", models={"m": route}))  # the manager's newer view
    picked = table.pick("m")
    assert picked is not None and picked.replica_id == "r0"
