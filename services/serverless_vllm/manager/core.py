"""The manager: `ManagerCore`, the one object the HTTP service and the Ray actor are thin adapters over.

Desired vs actual: the manager owns which replicas should exist and where; workers report what actually runs
in heartbeats. Each worker receives its complete assignment list both when it changes (a push) and in every
heartbeat reply, so a lost command or a restarted worker heals by itself.

This module is the facade: lifecycle (start, close, the reconcile loop) and the public API. The work is done by
one component per concern, each a public attribute:

- `registry` (registry.py): the registered models and their SQLite copy;
- `replicas` (replicas.py): the desired replicas, indexed by id, model and worker;
- `workers` (workers.py): the worker registry and its heartbeat state machine;
- `demand` (autoscale.py): the routers' load reports;
- `reconciler` (reconciler.py): a pass: liveness, failures, replica targets, placement, eviction;
- `reports` (reports.py): workers' engine reports folded into the replicas, engines adopted;
- `routing` (routing_publisher.py): the routing table, its versions and the routers' long-poll;
- `worker_link` (worker_link.py): assignments pushed and replied to workers, probes; the only network I/O.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from ..aio import stop_tasks, wait_event
from ..config import ManagerSettings
from ..metrics import sd
from ..metrics.manager import FleetSnapshot, ManagerMetrics, ModelRow, ReplicaRow
from ..schemas import (
    DemandReport,
    Heartbeat,
    HeartbeatReply,
    ModelInfo,
    ModelPatch,
    ModelPhase,
    ModelSpec,
    ReplicaState,
    RoutingTable,
    WorkerInfo,
    WorkerRegistration,
    WorkerState,
)
from . import gpu_memory
from .adapter_views import AdapterViews
from .adapters import AdapterManager
from .autoscale import Demand
from .draining import retire
from .keys import KeyRegistry
from .model_cache import ModelCache
from .reconciler import ManagerStats, Reconciler
from .registry import ModelRegistry, model_info
from .replicas import ReplicaIndex
from .reports import EngineReports
from .routing_publisher import RoutingPublisher
from .usage_ledger import UsageLedger
from .worker_link import WorkerClient, WorkerLink
from .workers import WorkerRecord, WorkerRegistry

__all__ = ["ManagerCore", "ManagerStats"]

log = logging.getLogger(__name__)

# Least time between two passes: events that come in a storm (1,000 workers registering after a restart) are
# handled in one pass instead of a pass each, and the requests themselves get the CPU in between.
MIN_PASS_GAP_S = 0.05


class ManagerCore:
    def __init__(
        self,
        settings: ManagerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        client: WorkerClient | None = None,
        worker_headers: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock  # every component's time (monotonic): tests pass a settable one
        self.stats = ManagerStats()
        self.metrics = ManagerMetrics(self)
        self.epoch = uuid.uuid4().hex[:12]
        self.registry = ModelRegistry(settings, clock)
        self.workers = WorkerRegistry(settings.heartbeat_timeout_s)
        self.replicas = ReplicaIndex()
        self.demand = Demand()
        self.routing = RoutingPublisher(self.epoch, self.registry, self.replicas, self.workers, clock)
        self.adapters = AdapterManager(
            settings, clock, self.registry, self.replicas, self.workers, self.demand, self.routing
        )
        self.adapter_views = AdapterViews(self.adapters, self.registry, self.replicas, self.workers)
        self.routing.adapters = self.adapter_views  # adapters' routes follow their bases' replicas
        self.keys = KeyRegistry(settings.db_path, self.epoch, lambda: self.registry.models)  # API keys as data
        self.usage = UsageLedger(settings.db_path)  # the keys' usage, as the routers report it
        self.worker_link = WorkerLink(
            settings,
            self.registry,
            self.replicas,
            self.workers,
            on_refused=self._worker_refused,
            client=client,
            worker_headers=worker_headers,
            prefetch=lambda worker_id: self.model_cache.orders(worker_id),
            adapters=self.adapters,
        )
        self.reconciler = Reconciler(
            settings,
            clock,
            self.registry,
            self.replicas,
            self.workers,
            self.demand,
            self.routing,
            self.worker_link,
            self.stats,
            self.metrics,
        )
        self.reconciler.fold_demand = self.adapters.fold_demand
        self.reports = EngineReports(clock, self.registry, self.replicas, self.reconciler, self.routing, self.metrics)
        self.model_cache = ModelCache(
            settings,
            clock,
            self.registry,
            self.replicas,
            self.workers,
            capacities=self.reconciler.capacities,
            remove_replica=self.reconciler.remove_replica,
            rebuild=self.routing.rebuild,
            poke=self._poke,
        )
        self._kick: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._reconcile_lock: asyncio.Lock | None = None
        self.routing.rebuild()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the reconcile loop (idempotent: the Ray adapter calls it lazily after each restart)."""
        if self._loop_task is None or self._loop_task.done():
            self.routing.start()
            self._kick = asyncio.Event()
            self._reconcile_lock = asyncio.Lock()
            self.worker_link.start()
            if self.reconciler.started_at is None:
                self.reconciler.started_at = self.clock()
            self._loop_task = asyncio.create_task(self._run(), name="manager-reconcile")

    async def close(self) -> None:
        await stop_tasks(self._loop_task)
        await self.worker_link.close()
        self.registry.close()
        self.keys.close()
        self.usage.close()

    async def _run(self) -> None:
        assert self._kick is not None
        while True:
            await wait_event(self._kick, self.settings.reconcile_interval_s)
            self._kick.clear()
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconcile pass failed")
            await asyncio.sleep(MIN_PASS_GAP_S)

    def _poke(self) -> None:
        if self._kick is not None:
            self._kick.set()

    async def reconcile(self) -> None:
        """One pass: worker liveness, autoscaling, placement, routing table rebuilt, changed assignments pushed (in
        the background: worker_link.py)."""
        assert self._reconcile_lock is not None
        async with self._reconcile_lock:
            self.reconciler.run_pass(self.clock())
            self.adapters.place(self.clock())  # LoRA adapters onto their bases' ready replicas
            self.model_cache.prune()  # after the pass has declared the dead workers
            self.routing.rebuild()
            await self.worker_link.push_assignments()

    # ------------------------------------------------------------------ models

    async def register_model(self, spec: ModelSpec) -> ModelInfo:
        if self.registry.register(spec):
            self.adapters.registered(spec.alias, spec)
            self.adapters.preload(spec.alias)
            self.model_cache.model_registered(spec.alias)
            self.routing.rebuild([spec.alias])
            self._poke()
        elif self.registry.preload(spec.alias) or self.adapters.preload(spec.alias):
            self._poke()
        return self.model_info(spec.alias)

    async def patch_model(self, alias: str, patch: ModelPatch) -> ModelInfo:
        self.registry.patch(alias, patch)
        self.routing.rebuild([alias])  # a new `routing` reaches the routers now, not at the next pass
        self._poke()
        return self.model_info(alias)

    async def delete_model(self, alias: str) -> None:
        if self.registry.forget_refused(alias):
            log.info("deleted the refused registration of %s", alias)
            return
        spec = self.registry.require(alias).spec
        self.registry.delete(alias)
        self.adapters.deleted(alias, spec)  # an adapter leaves every assignment: its workers unload it
        now = self.clock()
        for replica in self.replicas.of_alias(alias):  # out of routing now, stopped once its requests are done
            retire(replica, now, "model deleted")
        self.metrics.forget(alias)
        self.model_cache.forget(alias)
        log.info("deleted model %s", alias)
        self.routing.rebuild([alias])
        self._poke()

    def model_info(self, alias: str) -> ModelInfo:
        record = self.registry.require(alias)
        mine = self.replicas.of_alias(alias)
        info = model_info(alias, record, mine, self.routing.model_state(alias))
        info.cache = self.model_cache.info(alias)
        self.adapter_views.annotate(info, record)
        starting = (ReplicaState.PENDING, ReplicaState.STARTING)
        if info.phase is ModelPhase.STARTING and any(
            r.state in starting and self.model_cache.fetching(alias, r.worker_id) for r in mine
        ):
            info.phase = ModelPhase.PREFETCHING  # its engine's files are still arriving in its worker's cache
        return info

    def list_models(self) -> list[ModelInfo]:
        return [self.model_info(alias) for alias in self.registry.models]

    # ------------------------------------------------------------------ workers

    async def register_worker(self, reg: WorkerRegistration) -> HeartbeatReply:
        record = self.workers.register(reg, self.clock())
        self.reports.adopt(record)
        log.info(
            "worker %s registered at %s (%d GPU(s), %d CPU slot(s), %d engine(s))",
            reg.worker_id,
            reg.url,
            len(reg.gpus),
            reg.cpu_slots,
            len(reg.engines),
        )
        self.reports.apply(record)
        gpu_memory.observe(record, self.replicas, self.settings.gpu_engine_overhead_mb)
        self.adapters.fold_reports(record)
        self.model_cache.fold(reg.worker_id, reg.cache)  # after its engines: a serving model is not failed
        self.model_cache.worker_joined(record)
        self._poke()
        return self.worker_link.reply(record)

    async def heartbeat(self, hb: Heartbeat) -> HeartbeatReply:
        known = self.workers.get(hb.worker_id)
        was_healthy = known is not None and known.state is WorkerState.HEALTHY
        now = self.clock()
        record = self.workers.heartbeat(hb, now)
        if record is None:
            return HeartbeatReply(reregister=True)
        if hb.leaving:  # shutting down (SIGTERM): its replicas drain there and are placed elsewhere
            for replica in self.replicas.of_worker(hb.worker_id):
                retire(replica, now, "its worker is shutting down")
            self._poke()
        # A worker back to healthy re-enters routing (one leaving leaves it): rebuild even if no replica changed.
        self.reports.apply(record, rebuild=not was_healthy or hb.leaving)
        gpu_memory.observe(record, self.replicas, self.settings.gpu_engine_overhead_mb)
        self.adapters.fold_reports(record)
        self.model_cache.fold(hb.worker_id, hb.cache)
        if hb.leaving and not self.replicas.of_worker(hb.worker_id):
            # Every engine drained and stopped: the worker is gone, not dead (no record left behind, no alert).
            self.workers.forget(hb.worker_id)
            self.worker_link.forget(hb.worker_id)
            log.info("worker %s left: its engines drained and stopped", hb.worker_id)
            return HeartbeatReply()
        return self.worker_link.reply(record)

    def list_workers(self) -> list[WorkerInfo]:
        now = self.clock()
        overhead = self.settings.gpu_engine_overhead_mb
        return [w.info(now, gpu_memory.current_of(w, self.replicas, overhead)) for w in self.workers.all()]

    def _worker_refused(self, record: WorkerRecord) -> None:
        """A probe found the worker refusing connections: dead now, not after the heartbeat timeout."""
        self.reconciler.on_worker_dead(record)
        self._poke()

    # ------------------------------------------------------------------ routers

    async def report_demand(self, report: DemandReport) -> None:
        now = self.clock()
        self.demand.record(report, now)
        models = self.registry.models
        for alias, load in report.models.items():
            model = models.get(alias)
            if model is not None and (load.requests or load.in_flight or load.queued):
                model.scale.last_active = now
        busy = (a for a, load in report.models.items() if load.requests or load.in_flight or load.queued)
        self.adapters.demand_reported(busy, now)  # an adapter's requests keep its base in use
        if self.demand.wake(a for a in report.wake if a in models):
            self._poke()
        for endpoint in report.failed_endpoints:
            self.worker_link.probe(endpoint.worker_id)

    def routing_table(self) -> RoutingTable:
        return self.routing.table

    async def wait_routing(self, after_version: int, epoch: str, timeout: float) -> RoutingTable:
        """Long-poll: return as soon as the table is newer than `after_version` (or from another epoch)."""
        return await self.routing.wait(after_version, epoch, timeout)

    # ------------------------------------------------------------------ observability

    async def metrics_text(self) -> bytes:
        """The manager's metrics in Prometheus text format (the HTTP service serves it at /metrics; in Ray mode
        the router relays it at /manager/metrics, the manager actor having no HTTP port)."""
        return await self.metrics.render() + self.adapters.metrics_text().encode()

    def fleet_snapshot(self) -> FleetSnapshot:
        """Workers, models and replicas as plain values, for a scrape (cheaper than list_models' full infos)."""
        now = self.clock()
        workers = [(w.worker_id, w.state.value, round(max(0.0, now - w.last_heartbeat), 3)) for w in self.workers.all()]
        models = []
        model_state = self.routing.model_state
        for alias, record in self.registry.models.items():
            replicas = tuple(
                ReplicaRow(r.replica_id, r.worker_id, ",".join(map(str, r.gpus)) or "cpu", r.state.value)
                for r in self.replicas.of_alias(alias)
            )
            models.append(ModelRow(alias, model_state(alias).value, record.scale.target, replicas))
        return FleetSnapshot(workers, models, dataclasses.replace(self.stats), list(self.model_cache.rows()))

    def usage_totals(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return self.usage.tenant_totals()

    def sd_targets(self, kind: sd.SDKind = "engines") -> list[dict[str, Any]]:
        """Prometheus HTTP service discovery: the running engines (or the workers) as scrape targets."""
        return sd.targets(self.list_workers(), kind)

    def health(self) -> dict[str, object]:
        states = [w.state for w in self.workers.all()]
        return {
            "status": "ok",
            "epoch": self.epoch,
            "routing_version": self.routing.version,
            "models": len(self.registry.models),
            "refused_registrations": sorted(self.registry.refused),  # stored, but not passing today's checks
            "replicas": len(self.replicas),
            "workers": {s.value: states.count(s) for s in WorkerState},
        }
