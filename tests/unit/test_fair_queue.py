"""The fair queue (FAIR_QUEUE) on a real routing table: who gets a freed slot of a model at its in-flight cap
(priority class first, tenants in turn, against arrival order), shedding the lowest class when full, and waiters
that leave."""

from __future__ import annotations

import asyncio

import pytest
from serverless_vllm.errors import APIError
from serverless_vllm.router.fair_queue import FairQueue
from serverless_vllm.router.table import RouteTable
from serverless_vllm.schemas import Endpoint, ModelRoute, ModelState, Priority, RoutingTable

ALIAS = "m"
REPLICA = Endpoint(replica_id="r1", worker_id="w1", url="http://127.0.0.1:1")


def table(endpoints: list[Endpoint]) -> RouteTable:
    t = RouteTable()
    state = ModelState.READY if endpoints else ModelState.COLD
    t.update(RoutingTable(version=1, epoch="e", models={ALIAS: ModelRoute(state=state, endpoints=endpoints)}))
    return t


async def served_order(
    fair: bool, arrivals: list[tuple[str, Priority]], max_waiting: int = 64
) -> tuple[list[str], list[str]]:
    """One slot (cap 1, one replica) held by a first request; the arrivals queue; each slot freed goes to one.
    Returns the tenants in the order they were served, and those refused."""
    t = table([REPLICA])
    queue = FairQueue(t, cap=1, max_waiting=max_waiting, fair=fair)
    t.on_finished = queue.fill
    t.started(ALIAS, REPLICA)  # the slot is taken
    served: list[str] = []
    refused: list[str] = []

    async def request(name: str, priority: Priority) -> None:
        try:
            await queue.turn(ALIAS, name.split("-")[0], priority)
        except APIError as exc:
            assert (exc.status, exc.code) == (503, "queue_full")
            refused.append(name)
            return
        served.append(name)
        t.started(ALIAS, REPLICA)

    tasks = []
    for name, priority in arrivals:
        tasks.append(asyncio.create_task(request(name, priority)))
        await asyncio.sleep(0)  # each queues in arrival order
    await asyncio.sleep(0)
    while len(served) + len(refused) < len(arrivals):
        t.finished(ALIAS, REPLICA)  # the request in flight ends: one slot
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return served, refused


FLOOD = [(f"heavy-{i}", Priority.NORMAL) for i in range(6)] + [("light-1", Priority.NORMAL)]


def test_tenants_take_turns_where_arrival_order_makes_the_light_one_wait() -> None:
    fair, _ = asyncio.run(served_order(True, [*FLOOD, ("light-2", Priority.NORMAL)]))
    fifo, _ = asyncio.run(served_order(False, [*FLOOD, ("light-2", Priority.NORMAL)]))
    assert fair[:4] == ["heavy-0", "light-1", "heavy-1", "light-2"]
    assert fifo == [*(f"heavy-{i}" for i in range(6)), "light-1", "light-2"]


def test_a_higher_class_goes_first() -> None:
    arrivals = [("a-1", Priority.LOW), ("b-1", Priority.NORMAL), ("c-1", Priority.HIGH), ("a-2", Priority.HIGH)]
    served, _ = asyncio.run(served_order(True, arrivals))
    assert served == ["c-1", "a-2", "b-1", "a-1"]


def test_a_full_queue_sheds_the_newest_of_the_lowest_class_first() -> None:
    arrivals = [
        ("a-1", Priority.LOW),
        ("a-2", Priority.LOW),
        ("b-1", Priority.NORMAL),  # takes a-2's place
        ("c-1", Priority.LOW),  # no lower class to shed: refused
        ("d-1", Priority.HIGH),  # takes a-1's place
    ]
    served, refused = asyncio.run(served_order(True, arrivals, max_waiting=2))
    assert served == ["d-1", "b-1"] and refused == ["a-2", "c-1", "a-1"]


def test_waiters_that_leave_give_their_place_and_their_slot() -> None:
    async def scenario() -> list[str]:
        t = table([REPLICA])
        queue = FairQueue(t, cap=1, max_waiting=8)
        t.on_finished = queue.fill
        t.started(ALIAS, REPLICA)
        served: list[str] = []

        async def request(name: str) -> None:
            await queue.turn(ALIAS, name, Priority.NORMAL)
            served.append(name)
            t.started(ALIAS, REPLICA)

        leaving = asyncio.create_task(request("leaves"))
        woken = asyncio.create_task(request("woken-then-leaves"))
        stays = asyncio.create_task(request("stays"))
        await asyncio.sleep(0)
        leaving.cancel()  # leaves while waiting
        await asyncio.sleep(0)
        assert queue.waiting(ALIAS) == 2
        t.finished(ALIAS, REPLICA)  # the slot goes to the next waiter...
        woken.cancel()  # ...which leaves before it ran: the slot goes on to the one after
        await asyncio.wait_for(asyncio.gather(leaving, woken, stays, return_exceptions=True), 5)  # not a hang
        return served

    assert asyncio.run(scenario()) == ["stays"]


def test_no_wait_with_a_free_slot_and_one_replicas_worth_goes_to_a_cold_start() -> None:
    async def scenario() -> tuple[int, int]:
        cold = table([])
        queue = FairQueue(cold, cap=2, max_waiting=8)
        cold.enqueue(ALIAS)  # one request held for the cold start already
        await asyncio.wait_for(queue.turn(ALIAS, "t", Priority.NORMAL), 1)  # the second of cap 2: goes on
        cold.enqueue(ALIAS)
        third = asyncio.create_task(queue.turn(ALIAS, "t", Priority.NORMAL))
        await asyncio.sleep(0)
        waiting = queue.waiting(ALIAS)
        queue.start()
        await asyncio.sleep(0)  # the watcher waits for the table's next change
        cold.dequeue(ALIAS)
        cold.dequeue(ALIAS)
        ready = RoutingTable(version=2, epoch="e", models={ALIAS: ModelRoute(state="ready", endpoints=[REPLICA])})
        cold.update(ready)  # the replica is ready: the watcher hands out its free slots
        await asyncio.wait_for(third, 1)
        await queue.stop()
        return waiting, queue.waiting(ALIAS)

    assert asyncio.run(scenario()) == (1, 0)


def test_a_model_without_route_is_not_held_here() -> None:
    async def scenario() -> None:
        queue = FairQueue(RouteTable(), cap=1, max_waiting=1)
        await asyncio.wait_for(queue.turn("unknown", "t", Priority.LOW), 1)

    asyncio.run(scenario())


@pytest.mark.parametrize("fair", [True, False])
def test_every_waiter_is_served_once(fair: bool) -> None:
    arrivals = [(f"{t}-{i}", p) for i in range(5) for t, p in (("x", Priority.LOW), ("y", Priority.HIGH))]
    served, refused = asyncio.run(served_order(fair, arrivals))
    assert sorted(served) == sorted(n for n, _ in arrivals) and not refused
