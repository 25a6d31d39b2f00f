"""Waiting for capacity, in order of priority and fairly between tenants (`FAIR_QUEUE=fair`).

Without it, a request that finds every ready replica of its model at its in-flight cap is answered 503 at once,
and requests held through a cold start all go together once a replica is ready. With it, requests of keys made at
run time wait here for a slot instead (up to MAX_QUEUE_PER_MODEL per model): the highest priority class first,
and within a class the tenants take turns (deficit round robin with one request as the unit, so a tenant sending
16 requests at once and one sending 1 at a time alternate instead of the one waiting behind the sixteen). When a
model's queue is full, a newcomer of a higher class takes the place of the newest waiter of the lowest class
(answered 503 queue_full); otherwise the newcomer is answered so. A model without a ready replica lets one
replica's worth of requests through to the cold-start hold (they make the manager start it) and keeps the rest
here. `FAIR_QUEUE=fifo` is the same queue in arrival order (the baseline tests compare with); requests of the
environment's keys never wait here.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from ..aio import stop_tasks
from ..errors import APIError
from ..schemas import Priority
from .table import RouteTable

RANK = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}


@dataclass(eq=False, slots=True)
class Waiter:
    tenant: str
    rank: int
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    seq: int = 0  # arrival order in its model's queue


class ModelQueue:
    """One model's waiters: per class, tenant -> its waiters; a dict's order is the tenants' turn order."""

    def __init__(self) -> None:
        self.classes: list[dict[str, deque[Waiter]]] = [{} for _ in RANK]
        self.size = 0
        self.reserved = 0  # slots handed to woken waiters that have not started their request yet
        self._arrivals = 0

    def push(self, waiter: Waiter) -> None:
        self._arrivals += 1
        waiter.seq = self._arrivals
        self.classes[waiter.rank].setdefault(waiter.tenant, deque()).append(waiter)
        self.size += 1

    def pop(self) -> Waiter | None:
        """The next waiter: the highest class; in it, the first tenant in turn, which then goes last."""
        for tenants in self.classes:
            if tenants:
                tenant = next(iter(tenants))
                waiters = tenants.pop(tenant)
                waiter = waiters.popleft()
                if waiters:
                    tenants[tenant] = waiters  # back in, at the end of the turn order
                self.size -= 1
                return waiter
        return None

    def remove(self, waiter: Waiter) -> None:
        tenants = self.classes[waiter.rank]
        waiters = tenants.get(waiter.tenant)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            self.size -= 1
            if not waiters:
                del tenants[waiter.tenant]

    def lowest(self) -> Waiter | None:
        """The newest waiter of the lowest class (the first shed)."""
        for tenants in reversed(self.classes):
            if tenants:
                return max((w[-1] for w in tenants.values()), key=lambda w: w.seq)
        return None


def _queue_full(alias: str) -> APIError:
    return APIError(503, f"too many requests are waiting for '{alias}'", "queue_full", {"Retry-After": "2"})


class FairQueue:
    def __init__(self, table: RouteTable, cap: int, max_waiting: int, fair: bool = True) -> None:
        self._table = table
        self._cap = cap  # requests in flight per ready replica (MAX_INFLIGHT_PER_REPLICA)
        self._max = max_waiting
        self._fair = fair  # False: arrival order (one class, one tenant)
        self._queues: dict[str, ModelQueue] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="fair-queue")

    async def stop(self) -> None:
        await stop_tasks(self._task)

    def waiting(self, alias: str) -> int:
        queue = self._queues.get(alias)
        return queue.size if queue is not None else 0

    def by_class(self) -> dict[tuple[str, str], int]:
        """(model, priority class) -> requests waiting (the metrics)."""
        names = {rank: p.value for p, rank in RANK.items()}
        return {
            (alias, names[rank]): sum(len(w) for w in tenants.values())
            for alias, queue in self._queues.items()
            for rank, tenants in enumerate(queue.classes)
        }

    def _free(self, alias: str, queue: ModelQueue | None) -> bool:
        route = self._table.route(alias)
        if route is None:
            return True  # not registered here (yet): the forwarder asks the manager
        slots = self._cap * max(1, len(route.endpoints))
        busy = self._table.in_flight(alias) + self._table.queue_depth(alias)
        return busy + (queue.reserved if queue is not None else 0) < slots

    async def turn(self, alias: str, tenant: str, priority: Priority) -> None:
        """Return when the request may go on (at once when the model has a free slot and nobody waits)."""
        queue = self._queues.get(alias)
        if (queue is None or not queue.size) and self._free(alias, queue):
            return
        if queue is None:
            queue = self._queues[alias] = ModelQueue()
        # In arrival order: one class (shown as normal) and one tenant.
        waiter = Waiter(tenant, RANK[priority]) if self._fair else Waiter("", RANK[Priority.NORMAL])
        if queue.size >= self._max:
            shed = queue.lowest()
            if shed is None or shed.rank <= waiter.rank:
                raise _queue_full(alias)
            queue.remove(shed)
            shed.future.set_exception(_queue_full(alias))
        queue.push(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():  # woken, then cancelled: pass the slot on
                queue.reserved -= 1
                self.fill(alias)
            else:
                queue.remove(waiter)
            raise
        queue.reserved -= 1  # the caller starts its request before its next await: the slot is counted in flight

    def fill(self, alias: str) -> None:
        """Hand free slots of `alias` to its next waiters (a request ended, or the table changed)."""
        queue = self._queues.get(alias)
        while queue is not None and queue.size and self._free(alias, queue):
            waiter = queue.pop()
            if waiter is None:
                break
            queue.reserved += 1
            waiter.future.set_result(None)
        if queue is not None and not queue.size and not queue.reserved:
            del self._queues[alias]

    async def _watch(self) -> None:
        # New ready replicas (a cold start done, a scale-up) are new slots; a model gone answers its waiters 404
        # through the forwarder (they are let go and find no route).
        while True:
            await self._table.wait_change()
            for alias in list(self._queues):
                if self._table.route(alias) is None:
                    self._release_all(alias)
                else:
                    self.fill(alias)

    def _release_all(self, alias: str) -> None:
        queue = self._queues.get(alias)
        while queue is not None and (waiter := queue.pop()) is not None:
            queue.reserved += 1
            waiter.future.set_result(None)
