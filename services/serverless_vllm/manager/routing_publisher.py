"""The routing table the manager publishes: every registered alias, its state and its ready endpoints.

Owns the current table, its version and epoch, the per-model route keys that make a rebuild incremental, and
the long-poll (`wait`) on which routers learn of each new version.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from typing import Protocol

from ..schemas import (
    Endpoint,
    ModelRoute,
    ModelState,
    ModelTask,
    ReplicaState,
    Routing,
    RoutingTable,
    SchedulingPolicy,
    WorkerState,
    failure_reason,
)
from .draining import serving
from .registry import ModelRecord, ModelRegistry, expected_ready_at
from .replicas import ACTIVE, Replica, ReplicaIndex
from .workers import WorkerRegistry

# The inputs of one model's route: state, endpoints as (replica id, worker id, url), error, created, task, when a
# loading model is expected ready, how the routers pick among its endpoints, a LoRA adapter's base, and whether its
# engines schedule by priority.
RouteKey = tuple[
    ModelState, tuple[tuple[str, str, str], ...], str | None, int, ModelTask, float | None, Routing, str | None, bool
]


class AdapterRoutes(Protocol):
    """The routes of LoRA adapters (manager/adapter_views.py): they follow their base's replicas."""

    def dependents(self, aliases: Iterable[str]) -> set[str]: ...

    def route_key(self, alias: str, model: ModelRecord, now: float) -> RouteKey: ...


class RoutingPublisher:
    def __init__(
        self,
        epoch: str,
        registry: ModelRegistry,
        replicas: ReplicaIndex,
        workers: WorkerRegistry,
        clock: Callable[[], float],
    ) -> None:
        self.epoch = epoch
        self._models = registry.models  # the live dict, asked at dict speed 10,000 times per full rebuild
        self._failed_recently = registry.failed_recently
        self._replicas = replicas
        self._workers = workers
        self._clock = clock
        self._version = 0
        self._table = RoutingTable(version=0, epoch=epoch, models={})
        # alias -> the inputs of its current route: a rebuild compares these and creates only changed routes.
        self._route_keys: dict[str, RouteKey] = {}
        self._changed: asyncio.Condition | None = None
        self._listeners: list[Callable[[RoutingTable], None]] = []
        self.adapters: AdapterRoutes | None = None  # set by the core

    def start(self) -> None:
        """A new condition for the long-polls, on the loop now running (the core calls this from start())."""
        self._changed = asyncio.Condition()

    @property
    def table(self) -> RoutingTable:
        return self._table

    @property
    def version(self) -> int:
        return self._version

    def model_state(self, alias: str) -> ModelState:
        """A model's state is its route's: the table is rebuilt whenever a replica changes state."""
        route = self._table.models.get(alias)
        return route.state if route else ModelState.COLD

    def listen(self, callback: Callable[[RoutingTable], None]) -> None:
        """Call `callback` with every new table version, as it is published (tests and tools)."""
        self._listeners.append(callback)

    def rebuild(self, aliases: Iterable[str] | None = None) -> None:
        """Bring the routes of `aliases` (default: every model) up to date; a new table version if any changed.

        O(models + replicas) for all, O(their replicas) for a few: a route is recomputed from its model's
        replicas only (the index), compared by its inputs, and created only when they changed; unchanged
        routes are shared with the previous table."""
        now = self._clock()
        if aliases is None:
            targets: Iterable[str] = self._models
            gone = [a for a in self._route_keys if a not in self._models]
        else:
            wanted = set(aliases)
            if self.adapters is not None:
                wanted |= self.adapters.dependents(wanted)
            targets = [a for a in wanted if a in self._models]
            gone = [a for a in wanted if a not in self._models and a in self._route_keys]
        changed: dict[str, RouteKey] = {}
        for alias in targets:
            model = self._models[alias]
            if model.spec.base is not None and self.adapters is not None:
                key = self.adapters.route_key(alias, model, now)
            else:
                key = self._route_key(model, self._replicas.of_alias(alias), now)
            if self._route_keys.get(alias) != key:
                changed[alias] = key
        if not changed and not gone:
            return
        for alias in gone:
            del self._route_keys[alias]
        self._route_keys.update(changed)
        fresh = {alias: _route(key) for alias, key in changed.items()}
        if aliases is None:
            # In registration order, as the routers list them; unchanged routes are the previous objects.
            previous = self._table.models
            models = {alias: fresh[alias] if alias in fresh else previous[alias] for alias in self._models}
        else:
            # A copy (C speed) keeps every alias in place; a new one goes last, as it did in the registry.
            models = dict(self._table.models)
            for alias in gone:
                del models[alias]
            models.update(fresh)
        self._version += 1
        # Every route was validated when created: the container need not validate 10,000 of them again.
        self._table = RoutingTable.model_construct(version=self._version, epoch=self.epoch, models=models)
        self._notify()

    def _route_key(self, model: ModelRecord, mine: list[Replica], now: float) -> RouteKey:
        mine = serving(mine)  # a draining replica is out of routing at once, and its model is as if it had none
        if not mine:  # most models, on every full rebuild: the same answer as below, sooner
            created, task, routing = int(model.created_at), model.engine().task, _routing(model)
            priority = by_priority(model)
            if self._failed_recently(model, now):
                return ModelState.FAILED, (), model.last_error, created, task, None, routing, None, priority
            return ModelState.COLD, (), None, created, task, None, routing, None, priority
        endpoints = []
        for r in mine:
            if r.state is ReplicaState.READY and not r.asleep:
                worker = self._workers.get(r.worker_id)
                if worker is not None and worker.state is WorkerState.HEALTHY:
                    endpoints.append((r.replica_id, r.worker_id, worker.url))
        error, ready_at = None, None
        if endpoints:
            state = ModelState.READY
        elif any(r.state in ACTIVE and not r.asleep for r in mine):
            state = ModelState.LOADING
            ready_at = expected_ready_at(mine)
        elif any(r.asleep for r in mine):
            state = ModelState.SLEEPING
        elif self._failed_recently(model, now):
            state, error = ModelState.FAILED, model.last_error
        else:
            state = ModelState.COLD
        task = model.engine().task
        created = int(model.created_at)
        return state, tuple(endpoints), error, created, task, ready_at, _routing(model), None, by_priority(model)

    async def wait(self, after_version: int, epoch: str, timeout: float) -> RoutingTable:
        """Long-poll: return as soon as the table is newer than `after_version` (or from another epoch)."""
        if epoch != self.epoch or after_version < self._version or self._changed is None:
            return self._table
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self._version > after_version)
        return self._table

    def _notify(self) -> None:
        for listener in self._listeners:
            listener(self._table)
        if self._changed is None:
            return

        async def notify(cond: asyncio.Condition) -> None:
            async with cond:
                cond.notify_all()

        with contextlib.suppress(RuntimeError):  # no running loop (construction time)
            asyncio.get_running_loop().create_task(notify(self._changed))


def _routing(model: ModelRecord) -> Routing:
    return model.policy().routing


def by_priority(model: ModelRecord) -> bool:
    """Whether the model's engines schedule by priority (an adapter: its base's engines)."""
    return model.spec.scheduling_policy is SchedulingPolicy.PRIORITY


def _route(key: RouteKey) -> ModelRoute:
    state, endpoints, error, created, task, ready_at, routing, parent, priority_scheduling = key
    return ModelRoute(
        state=state,
        task=task,
        routing=routing,
        endpoints=[Endpoint(replica_id=rid, worker_id=wid, url=url) for rid, wid, url in endpoints],
        error=failure_reason(error),  # what clients are told; the whole of it is the model's `last_error`
        created=created,
        ready_at=ready_at,
        parent=parent,
        priority_scheduling=priority_scheduling,
    )
