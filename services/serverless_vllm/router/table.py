"""The router's local routing table: every registered alias, its ready replicas, and requests in flight.

Ready models are served from here alone; the manager is only asked when the table has no answer. Which of a
model's replicas serves a request is the choice of the RoutingPolicy its route names (`routing`: policy.py,
prefix.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from ..schemas import DemandReport, Endpoint, ModelLoad, ModelRoute, Routing, RoutingTable
from .policy import NO_KEY, LeastLoaded, RequestKey, RoutingPolicy, SessionAffinity
from .prefix import PrefixAffinity, PrefixStats


@dataclass
class ModelCounters:
    in_flight: int = 0
    queued: int = 0
    requests: int = 0  # since the last demand report


class RouteTable:
    def __init__(
        self,
        rng: random.Random | None = None,
        policy: RoutingPolicy | None = None,
        prefix: PrefixAffinity | None = None,
    ) -> None:
        """Each model's route names its policy (`routing`); `policy`: one policy for every model instead (tests,
        experiments). `rng`: the policies' random source (tests seed it); with a `policy` of one's own, give it its
        own. `prefix`: the `prefix` policy (RouterSettings' bounds; default: PrefixAffinity's)."""
        if policy is not None and rng is not None:
            raise ValueError("rng is the default policies': pass it to the policy given instead")
        self._table: RoutingTable | None = None
        # replica id -> requests in flight; a replica never counted reads 0 (what RoutingPolicy.pick is promised)
        self._in_flight: dict[str, int] = defaultdict(int)
        self._models: dict[str, ModelCounters] = defaultdict(ModelCounters)
        self._changed = asyncio.Event()
        # (alias, replica id) -> the table version at which that replica said the adapter is not loaded in it
        self._moved: dict[tuple[str, str], int] = {}
        self.on_finished: Callable[[str], None] | None = None
        least = LeastLoaded(rng)
        self.prefix = prefix if prefix is not None else PrefixAffinity(rng=rng)
        self._policies: dict[Routing, RoutingPolicy] = {
            Routing.SESSION: SessionAffinity(least),
            Routing.LEAST_LOADED: least,
            Routing.PREFIX: self.prefix,
        }
        if policy is not None:
            self._policies = dict.fromkeys(Routing, policy)

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
        self._moved.clear()  # the manager's newer view of where adapters are supersedes what workers said
        live = {e.replica_id for route in table.models.values() for e in route.endpoints}
        for rid in [r for r, n in self._in_flight.items() if n == 0 and r not in live]:
            del self._in_flight[rid]
        if self.prefix.stats:  # models no longer routed by prefix (or gone) leave the metrics
            models = table.models
            self.prefix.retain(lambda a: (route := models.get(a)) is not None and route.routing is Routing.PREFIX)
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

    def pick(self, alias: str, exclude: frozenset[str] = frozenset(), key: RequestKey | None = None) -> Endpoint | None:
        """A ready replica of `alias` not in `exclude` (replica ids), chosen by the policy its route names; None
        when there is none. `key`: what the request says about itself (session key, body), for the policy."""
        route = self._table.models.get(alias) if self._table is not None else None
        if route is None:
            return None
        candidates = route.endpoints
        if self._moved:
            exclude = exclude | {rid for (a, rid), v in self._moved.items() if a == alias and v == self.version}
        if exclude:
            candidates = [e for e in candidates if e.replica_id not in exclude]
        if not candidates:
            return None
        return self._policies[route.routing].pick(alias, candidates, self._in_flight, key or NO_KEY)

    def adapter_moved(self, alias: str, replica_id: str, version: int) -> None:
        """The worker of `replica_id` said adapter `alias` is not loaded in it (any more), on a pick made at table
        `version`: it is not picked for `alias` until the table changes (the manager's next view says where the
        adapter is, possibly back there)."""
        if version == self.version:
            self._moved[(alias, replica_id)] = version

    def prefix_stats(self) -> dict[str, PrefixStats]:
        """Models routed by prefix, with what their routing saw (zeros before a first request): for the metrics."""
        if self._table is None:
            return {}
        seen = self.prefix.stats
        return {
            alias: seen.get(alias) or PrefixStats()
            for alias, route in self._table.models.items()
            if route.routing is Routing.PREFIX
        }

    # ------------------------------------------------------------------ counters

    def started(self, alias: str, endpoint: Endpoint) -> None:
        self._in_flight[endpoint.replica_id] += 1
        counters = self._models[alias]
        counters.in_flight += 1
        counters.requests += 1

    def finished(self, alias: str, endpoint: Endpoint) -> None:
        self._in_flight[endpoint.replica_id] -= 1
        self._models[alias].in_flight -= 1
        if self.on_finished is not None:  # the fair queue (FAIR_QUEUE): a slot is free
            self.on_finished(alias)

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
                busy = self._busy_replicas(alias) if c.in_flight else {}
                models[alias] = ModelLoad(in_flight=c.in_flight, queued=c.queued, requests=c.requests, replicas=busy)
            if c.queued:
                wake.append(alias)
            c.requests = 0
        return DemandReport(router_id=router_id, models=models, wake=wake)

    def _busy_replicas(self, alias: str) -> dict[str, int]:
        """The model's routed replicas with requests in flight here, and how many: the manager removes the least busy
        first (manager/draining.py)."""
        route = self.route(alias)
        if route is None:
            return {}
        return {e.replica_id: n for e in route.endpoints if (n := self._in_flight.get(e.replica_id, 0))}
