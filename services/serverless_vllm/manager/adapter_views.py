"""What the routers and `GET /v1/models/{alias}` are told of LoRA adapters: an adapter's route (its base's ready
replicas whose engines report it loaded) and its model info, read from the adapter manager's decisions
(manager/adapters.py)."""

from __future__ import annotations

from collections.abc import Iterable

from ..schemas import ModelInfo, ModelState, ModelTask, ReplicaState
from .adapters import AdapterManager
from .draining import serving
from .registry import ModelRecord, ModelRegistry, replica_infos
from .replicas import ACTIVE, ReplicaIndex
from .routing_publisher import RouteKey, by_priority
from .workers import WorkerRegistry


class AdapterViews:
    """The adapters' routes (the routing publisher's AdapterRoutes) and model infos."""

    def __init__(
        self, adapters: AdapterManager, registry: ModelRegistry, replicas: ReplicaIndex, workers: WorkerRegistry
    ) -> None:
        self._adapters = adapters
        self._models = registry.models
        self._failed_recently = registry.failed_recently
        self._replicas = replicas
        self._workers = workers

    def dependents(self, aliases: Iterable[str]) -> set[str]:
        return self._adapters.dependents(aliases)

    def route_key(self, alias: str, model: ModelRecord, now: float) -> RouteKey:
        """An adapter's route: its base's ready replicas that hold it; loading while one is asked to or the base
        starts; failed with the engine's reason (or the base's)."""
        base = model.spec.base
        assert base is not None
        created, routing = int(model.created_at), model.policy().routing
        error: str | None = None
        endpoints: list[tuple[str, str, str]] = []
        base_model = self._models.get(base)
        if self._failed_recently(model, now):
            state, error = ModelState.FAILED, model.last_error
        elif base_model is None:
            state, error = ModelState.FAILED, f"its base '{base}' is not registered"
        else:
            mine = serving(self._replicas.of_alias(base))
            for r in self._adapters.ready(base):
                if alias in self._adapters.loaded(r.replica_id):
                    worker = self._workers.get(r.worker_id)
                    assert worker is not None  # ready(): a healthy worker
                    endpoints.append((r.replica_id, r.worker_id, worker.url))
            if endpoints:
                state = ModelState.READY
            elif any(self._adapters.wants(r.replica_id, alias) for r in mine) or any(
                r.state in ACTIVE and r.state is not ReplicaState.READY and not r.asleep for r in mine
            ):  # asked to load it, or the base is starting (a ready base not asked: cold, a request asks)
                state = ModelState.LOADING
            elif self._failed_recently(base_model, now):
                state, error = ModelState.FAILED, f"its base '{base}' failed: {base_model.last_error}"
            else:
                state = ModelState.COLD
        priority = base_model is not None and by_priority(base_model)
        return state, tuple(endpoints), error, created, ModelTask.GENERATE, None, routing, base, priority

    def annotate(self, info: ModelInfo, record: ModelRecord) -> None:
        """GET /v1/models/{alias}: a base's replicas list their adapters; an adapter's replicas are the base's
        replicas that hold it or are asked to load it. `engine`: the arguments its engines are started with (a
        base's with LoRA on once adapters are registered for it; an adapter's are its base's: it sets none)."""
        adapters = self._adapters
        for r in info.replicas:
            r.adapters = sorted(adapters.loaded(r.replica_id))
        base = record.spec.base
        if base is None:
            info.engine = adapters.engine(info.alias, record)
            return
        info.base = base
        base_record = self._models.get(base)
        if base_record is not None:
            info.engine = adapters.engine(base, base_record)
        holders = [
            r
            for r in self._replicas.of_alias(base)
            if info.alias in adapters.loaded(r.replica_id) or adapters.wants(r.replica_id, info.alias)
        ]
        info.replicas = replica_infos(holders)
        for r in info.replicas:
            r.adapters = sorted(adapters.loaded(r.replica_id))
