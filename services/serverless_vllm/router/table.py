"""The router's local routing table: every registered alias, its ready replicas, and requests in flight.

Ready models are served from here alone; the manager is only asked when the table has no answer. Which of a
model's replicas serves a request is the RoutingPolicy's choice (policy.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from dataclasses import dataclass

from ..schemas import DemandReport, Endpoint, ModelLoad, ModelRoute, RoutingTable
from .policy import RoutingPolicy, default_policy


@dataclass
class ModelCounters:
    in_flight: int = 0
    queued: int = 0
    requests: int = 0  # since the last demand report


class RouteTable:
    def __init__(self, rng: random.Random | None = None, policy: RoutingPolicy | None = None) -> None:
        """`policy`: chooses among a model's ready replicas (default: policy.default_policy). `rng`: the default
        policy's random source (tests seed it); with a `policy` of one's own, give it its own."""
        if policy is not None and rng is not None:
            raise ValueError("rng is the default policy's: pass it to the policy given instead")
        self._table: RoutingTable | None = None
        # replica id -> requests in flight; a replica never counted reads 0 (what RoutingPolicy.pick is promised)
        self._in_flight: dict[str, int] = defaultdict(int)
        self._models: dict[str, ModelCounters] = defaultdict(ModelCounters)
        self._changed = asyncio.Event()
        self._policy = policy if policy is not None else default_policy(rng)

    # ------------------------------------------------------------------ table

    @property
    def loaded(self) -> bool:
        return self._table is not None

    @property
    def version(self) -> int:
        return self._table.version if self._table else -1

    @property
    def epoch(self) -> str:
        return self._table.epoch if self._table else ""

    def update(self, table: RoutingTable) -> None:
        self._table = table
        live = {e.replica_id for route in table.models.values() for e in route.endpoints}
        for rid in [r for r, n in self._in_flight.items() if n == 0 and r not in live]:
            del self._in_flight[rid]
        # Wake every waiter; they resume in the order they started waiting (arrival order).
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_change(self) -> None:
        await self._changed.wait()

    def route(self, alias: str) -> ModelRoute | None:
        return self._table.models.get(alias) if self._table else None

    def ready_in(self, alias: str) -> float | None:
        """Seconds until a loading model is expected ready (the manager's estimate from its past starts); None when
        it has none, or the start is taking longer than expected."""
        route = self.route(alias)
        if route is None or route.ready_at is None:
            return None
        left = route.ready_at - time.time()
        return left if left > 0 else None

    def aliases(self) -> dict[str, ModelRoute]:
        return dict(self._table.models) if self._table else {}

    # ------------------------------------------------------------------ choosing a replica

    def pick(self, alias: str, exclude: frozenset[str] = frozenset(), affinity: str | None = None) -> Endpoint | None:
        """A ready replica of `alias` not in `exclude` (replica ids), chosen by the policy; None when there is none.
        `affinity`: the request's session key (the default policy keeps a key on one replica while it exists)."""
        route = self._table.models.get(alias) if self._table is not None else None
        if route is None:
            return None
        candidates = route.endpoints
        if exclude:
            candidates = [e for e in candidates if e.replica_id not in exclude]
        if not candidates:
            return None
        return self._policy.pick(alias, candidates, self._in_flight, affinity)

    # ------------------------------------------------------------------ counters

    def started(self, alias: str, endpoint: Endpoint) -> None:
        self._in_flight[endpoint.replica_id] += 1
        counters = self._models[alias]
        counters.in_flight += 1
        counters.requests += 1

    def finished(self, alias: str, endpoint: Endpoint) -> None:
        self._in_flight[endpoint.replica_id] -= 1
        self._models[alias].in_flight -= 1

    def queue_depth(self, alias: str) -> int:
        return self._models[alias].queued

    def enqueue(self, alias: str) -> None:
        self._models[alias].queued += 1

    def dequeue(self, alias: str) -> None:
        self._models[alias].queued -= 1

    def in_flight(self, alias: str) -> int:
        return self._models[alias].in_flight

    def demand(self, router_id: str) -> DemandReport:
        """Load per model since the last call; aliases with waiting requests are asked to wake."""
        models, wake = {}, []
        for alias, c in self._models.items():
            if c.in_flight or c.queued or c.requests:
                models[alias] = ModelLoad(in_flight=c.in_flight, queued=c.queued, requests=c.requests)
            if c.queued:
                wake.append(alias)
            c.requests = 0
        return DemandReport(router_id=router_id, models=models, wake=wake)
