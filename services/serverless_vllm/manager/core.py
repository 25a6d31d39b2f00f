"""The manager's logic, independent of transport: the HTTP service and the Ray actor are thin adapters over it.

Desired vs actual: the manager owns which replicas should exist (`_replicas`) and where; workers report
what actually runs in heartbeats. Each worker receives its complete assignment list both when it changes
(a push) and in every heartbeat reply, so a lost command or a restarted worker heals by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..aio import wait_event
from ..config import AuthSettings, ManagerSettings
from ..errors import APIError
from ..metrics import sd
from ..metrics.manager import ManagerMetrics
from ..schemas import (
    Assignment,
    DemandReport,
    Endpoint,
    Heartbeat,
    HeartbeatReply,
    ModelInfo,
    ModelPatch,
    ModelRoute,
    ModelSpec,
    ModelState,
    ReplicaInfo,
    ReplicaState,
    RoutingTable,
    WorkerInfo,
    WorkerRegistration,
    WorkerState,
)
from ..security.models import check_registration
from .autoscale import ScaleState, next_target
from .placement import EvictionCandidate, PlacementError, WorkerCapacity, claim, place, plan_eviction
from .store import ModelStore
from .workers import WorkerRecord, WorkerRegistry

log = logging.getLogger(__name__)

# A router's load report counts for this long; after that the router is presumed gone.
DEMAND_TTL_S = 5.0
_ACTIVE = (ReplicaState.PENDING, ReplicaState.STARTING, ReplicaState.READY, ReplicaState.WAKING)


@dataclass
class ModelRecord:
    spec: ModelSpec
    created_at: float
    scale: ScaleState = field(default_factory=ScaleState)
    last_error: str | None = None
    failed_at: float | None = None  # monotonic; the model is FAILED for failed_retry_after_s after this


@dataclass
class Replica:
    replica_id: str
    alias: str
    worker_id: str
    gpus: list[int]
    fraction: float
    state: ReplicaState = ReplicaState.PENDING
    asleep: bool = False  # desired: put to vLLM sleep (warm tier) rather than stopped
    asleep_since: float = 0.0
    error: str | None = None
    cold_start_at: float | None = None  # placed as a cold start: its duration is observed at the first READY


@dataclass
class ManagerStats:
    """Counters for metrics; the gauges are derived from live state at scrape time."""

    cold_starts: int = 0
    placements_failed: int = 0
    evictions: int = 0
    failovers: int = 0
    engine_failures: int = 0


class ManagerCore:
    def __init__(self, settings: ManagerSettings, *, clock: Callable[[], float] = time.monotonic,
                 client: httpx.AsyncClient | None = None, worker_headers: dict[str, str] | None = None) -> None:
        self.settings = settings
        self._clock = clock
        self._store = ModelStore(settings.db_path)
        self._workers = WorkerRegistry(settings.heartbeat_timeout)
        self._models: dict[str, ModelRecord] = {}
        self._replicas: dict[str, Replica] = {}
        self._demand: dict[str, tuple[float, DemandReport]] = {}
        self._wake: set[str] = set()
        self._pushed: dict[str, str] = {}  # worker id -> digest of the assignments it last accepted
        self._client = client
        # Calls to workers carry the worker token; adapters that pass none (the Ray actor) take it from the env.
        self._worker_headers = AuthSettings.from_env().worker_headers() if worker_headers is None else worker_headers
        self.stats = ManagerStats()
        self.metrics = ManagerMetrics(self)
        self.epoch = uuid.uuid4().hex[:12]
        self._version = 0
        self._table = RoutingTable(version=0, epoch=self.epoch, models={})
        self._changed: asyncio.Condition | None = None
        self._kick: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._started_at: float | None = None  # clock time of start(): workers re-register within a heartbeat
        self._reconcile_lock: asyncio.Lock | None = None
        self._probes: set[asyncio.Task[None]] = set()
        self._last_sweep: float | None = None
        now = clock()
        for spec, created_at in self._store.load():
            # After a restart every model counts as just used, so adopted engines are not dropped at once.
            self._models[spec.alias] = ModelRecord(spec=spec, created_at=created_at,
                                                   scale=ScaleState(target=spec.min_replicas, last_active=now))
        self._rebuild_table()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the reconcile loop (idempotent: the Ray adapter calls it lazily after each restart)."""
        if self._loop_task is None or self._loop_task.done():
            self._changed = asyncio.Condition()
            self._kick = asyncio.Event()
            self._reconcile_lock = asyncio.Lock()
            if self._client is None:
                self._client = httpx.AsyncClient(timeout=self.settings.worker_timeout_s,
                                                 limits=httpx.Limits(max_connections=200))
            if self._started_at is None:
                self._started_at = self._clock()
            self._loop_task = asyncio.create_task(self._run(), name="manager-reconcile")

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._client is not None:
            await self._client.aclose()
        self._store.close()

    async def _run(self) -> None:
        assert self._kick is not None
        while True:
            await wait_event(self._kick, self.settings.reconcile_interval)
            self._kick.clear()
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconcile pass failed")

    def _poke(self) -> None:
        if self._kick is not None:
            self._kick.set()

    # ------------------------------------------------------------------ models

    def _model(self, alias: str) -> ModelRecord:
        record = self._models.get(alias)
        if record is None:
            raise APIError(404, f"The model '{alias}' does not exist", "model_not_found")
        return record

    async def register_model(self, spec: ModelSpec) -> ModelInfo:
        check_registration(spec, self.settings.model_dirs)  # hub ids or allowed dirs only; no unsafe engine flags
        existing = self._models.get(spec.alias)
        if existing is not None:
            if existing.spec == spec:
                return self.model_info(spec.alias)  # idempotent re-registration
            raise APIError(400, f"alias '{spec.alias}' is already registered with different settings "
                                "(delete it first, or PATCH its policy)", "alias_exists")
        now = self._clock()
        created = self._store.save(spec)
        target = max(spec.min_replicas, 1 if spec.preload else 0)
        self._models[spec.alias] = ModelRecord(spec=spec, created_at=created,
                                               scale=ScaleState(target=target, last_active=now))
        log.info("registered model %s -> %s (preload=%s)", spec.alias, spec.model_name, spec.preload)
        self._rebuild_table()
        self._poke()
        return self.model_info(spec.alias)

    async def patch_model(self, alias: str, patch: ModelPatch) -> ModelInfo:
        record = self._model(alias)
        changes = patch.model_dump(exclude_none=True)
        try:
            spec = ModelSpec.model_validate({**record.spec.model_dump(), **changes})
        except ValueError as exc:
            raise APIError(400, str(exc), "invalid_policy") from exc
        self._store.save(spec, record.created_at)
        record.spec = spec
        record.scale.target = min(max(record.scale.target, spec.min_replicas), spec.max_replicas)
        self._poke()
        return self.model_info(alias)

    async def delete_model(self, alias: str) -> None:
        self._model(alias)
        self._store.delete(alias)
        del self._models[alias]
        for rid in [r.replica_id for r in self._replicas.values() if r.alias == alias]:
            del self._replicas[rid]
        log.info("deleted model %s", alias)
        self._rebuild_table()
        self._poke()

    def model_info(self, alias: str) -> ModelInfo:
        record = self._model(alias)
        spec = record.spec
        replicas = [ReplicaInfo(replica_id=r.replica_id, worker_id=r.worker_id, gpus=r.gpus, state=r.state,
                                asleep=r.asleep, error=r.error)
                    for r in self._replicas.values() if r.alias == alias]
        route = self._table.models.get(alias)
        return ModelInfo(alias=alias, model_name=spec.model_name,
                         state=route.state if route else ModelState.COLD, engine=spec.engine_args(),
                         policy=spec.policy(), desired_replicas=record.scale.target, replicas=replicas,
                         last_error=record.last_error, created_at=record.created_at)

    def list_models(self) -> list[ModelInfo]:
        return [self.model_info(alias) for alias in self._models]

    # ------------------------------------------------------------------ workers

    async def register_worker(self, reg: WorkerRegistration) -> HeartbeatReply:
        record = self._workers.register(reg, self._clock())
        self._adopt_engines(record)
        log.info("worker %s registered at %s (%d GPU(s), %d CPU slot(s), %d engine(s))",
                 reg.worker_id, reg.url, len(reg.gpus), reg.cpu_slots, len(reg.engines))
        self._apply_reports(record)
        self._poke()
        return self._reply(record)

    async def heartbeat(self, hb: Heartbeat) -> HeartbeatReply:
        record = self._workers.heartbeat(hb, self._clock())
        if record is None:
            return HeartbeatReply(reregister=True)
        self._apply_reports(record)
        return self._reply(record)

    def list_workers(self) -> list[WorkerInfo]:
        now = self._clock()
        return [w.info(now) for w in self._workers.all()]

    def _reply(self, record: WorkerRecord) -> HeartbeatReply:
        assignments = self._assignments(record.worker_id)
        self._pushed[record.worker_id] = _digest(assignments)
        return HeartbeatReply(assignments=assignments)

    def _adopt_engines(self, record: WorkerRecord) -> None:
        """Take over engines a worker already runs (after a manager restart) when they still fit the registry."""
        for status in record.engines.values():
            if status.replica_id in self._replicas or status.state is ReplicaState.FAILED:
                continue
            model = self._models.get(status.alias)
            if model is None or (status.model_name and status.model_name != model.spec.model_name):
                continue
            mine = [r for r in self._replicas.values() if r.alias == status.alias]
            if len(mine) >= model.spec.max_replicas:
                continue
            self._replicas[status.replica_id] = Replica(
                replica_id=status.replica_id, alias=status.alias, worker_id=record.worker_id, gpus=status.gpus,
                fraction=model.spec.gpu_memory_utilization if status.gpus else 0.0, state=status.state,
                asleep=status.state is ReplicaState.SLEEPING, asleep_since=self._clock())
            model.scale.target = max(model.scale.target, sum(1 for r in mine if not r.asleep) +
                                     (status.state is not ReplicaState.SLEEPING))
            log.info("adopted running engine %s of %s on %s", status.replica_id, status.alias, record.worker_id)

    def _apply_reports(self, record: WorkerRecord) -> None:
        """Fold a worker's engine reports into the replicas' actual state."""
        for replica in self._replicas.values():
            if replica.worker_id != record.worker_id:
                continue
            report = record.engines.get(replica.replica_id)
            if report is None:
                # Not (or no longer) running there: the assignments make the worker start it.
                if replica.state is not ReplicaState.FAILED:
                    replica.state = ReplicaState.PENDING
                continue
            if report.state is ReplicaState.READY and replica.cold_start_at is not None:
                self.metrics.cold_start_done(replica.alias, self._clock() - replica.cold_start_at)
                replica.cold_start_at = None
            replica.state = report.state
            if report.state is ReplicaState.FAILED:
                tail = "\n".join(report.log_tail[-20:])
                replica.error = f"{report.error or 'engine failed'}\n{tail}".strip()
        self._rebuild_table()

    # ------------------------------------------------------------------ routers

    async def report_demand(self, report: DemandReport) -> None:
        now = self._clock()
        self._demand[report.router_id] = (now, report)
        for alias, load in report.models.items():
            model = self._models.get(alias)
            if model is not None and (load.requests or load.in_flight or load.queued):
                model.scale.last_active = now
        new_wakes = {a for a in report.wake if a in self._models} - self._wake
        if new_wakes:
            self._wake |= new_wakes
            self._poke()
        for endpoint in report.failed_endpoints:
            task = asyncio.create_task(self._probe_worker(endpoint.worker_id))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)

    async def _probe_worker(self, worker_id: str) -> None:
        """A router could not connect: check at once instead of waiting for heartbeats to time out."""
        record = self._workers.get(worker_id)
        if record is None or record.state is WorkerState.DEAD or self._client is None:
            return
        try:
            await self._client.get(f"{record.url}/health", timeout=2.0, headers=self._worker_headers)
        except httpx.ConnectError:
            log.warning("worker %s refuses connections: declared dead", worker_id)
            self._on_worker_dead(record)
            self._poke()
        except httpx.HTTPError:
            pass  # slow, not gone: heartbeats decide

    def routing_table(self) -> RoutingTable:
        return self._table

    async def wait_routing(self, after_version: int, epoch: str, timeout: float) -> RoutingTable:
        """Long-poll: return as soon as the table is newer than `after_version` (or from another epoch)."""
        if epoch != self.epoch or after_version < self._version or self._changed is None:
            return self._table
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self._version > after_version)
        return self._table

    def metrics_text(self) -> bytes:
        """The manager's metrics in Prometheus text format (the HTTP service serves it at /metrics; in Ray mode
        the router relays it at /manager/metrics, the manager actor having no HTTP port)."""
        return self.metrics.render()

    def sd_targets(self, kind: sd.SDKind = "engines") -> list[dict[str, Any]]:
        """Prometheus HTTP service discovery: the running engines (or the workers) as scrape targets."""
        return sd.targets(self.list_workers(), kind)

    def health(self) -> dict[str, object]:
        states = [w.state for w in self._workers.all()]
        return {"status": "ok", "epoch": self.epoch, "routing_version": self._version,
                "models": len(self._models), "replicas": len(self._replicas),
                "workers": {s.value: states.count(s) for s in WorkerState}}

    # ------------------------------------------------------------------ reconcile

    async def reconcile(self) -> None:
        """One pass: worker liveness, autoscaling, placement, assignments pushed, routing table rebuilt."""
        assert self._reconcile_lock is not None
        async with self._reconcile_lock:
            now = self._clock()
            self._sweep_workers(now)
            loads = self._loads(now)
            wakes, self._wake = self._wake, set()
            self._collect_failures(now)
            for alias, model in self._models.items():
                self._scale_model(alias, model, loads.get(alias, 0.0), alias in wakes, now)
            self._rebuild_table()
            await self._push_assignments()

    def _sweep_workers(self, now: float) -> None:
        stalled = now - self._last_sweep if self._last_sweep is not None else 0.0
        self._last_sweep = now
        if stalled > self.settings.heartbeat_timeout / 2:
            # This process did not run for a while (CPU starvation, a pause): every heartbeat looks late
            # because we were not there to receive it. Judge workers again on the next pass.
            log.warning("manager loop stalled for %.1f s: that silence is not held against workers", stalled)
            self._workers.excuse(stalled, now)
        for record, state in self._workers.sweep(now):
            log.warning("worker %s is %s (no heartbeat for %.0f s)", record.worker_id, state.value,
                        now - record.last_heartbeat)
            if state is WorkerState.DEAD:
                self._on_worker_dead(record)

    def _loads(self, now: float) -> dict[str, float]:
        loads: dict[str, float] = {}
        for router_id, (at, report) in list(self._demand.items()):
            if now - at > DEMAND_TTL_S:
                del self._demand[router_id]
                continue
            for alias, load in report.models.items():
                loads[alias] = loads.get(alias, 0.0) + load.in_flight + load.queued
        return loads

    def _on_worker_dead(self, record: WorkerRecord) -> None:
        self._workers.mark_dead(record.worker_id)
        lost = [r for r in self._replicas.values() if r.worker_id == record.worker_id]
        for replica in lost:
            del self._replicas[replica.replica_id]
        if lost:
            self.stats.failovers += len(lost)
            log.warning("worker %s dead: %d replica(s) will be placed elsewhere", record.worker_id, len(lost))
        self._pushed.pop(record.worker_id, None)
        self._rebuild_table()

    def _collect_failures(self, now: float) -> None:
        for replica in [r for r in self._replicas.values() if r.state is ReplicaState.FAILED]:
            model = self._models.get(replica.alias)
            del self._replicas[replica.replica_id]
            self.stats.engine_failures += 1
            if model is not None:
                model.last_error = replica.error or "engine failed"
                log.error("replica %s of %s failed: %s", replica.replica_id, replica.alias, model.last_error)
                if not any(r.alias == replica.alias for r in self._replicas.values()):
                    # Nothing serves it: FAILED for a while, then the next request tries again (no restart loop).
                    # A model that still has replicas keeps its target; the autoscaler places another.
                    model.failed_at = now
                    model.scale.target = 0

    def _failed_recently(self, model: ModelRecord, now: float) -> bool:
        return model.failed_at is not None and now - model.failed_at < self.settings.failed_retry_after_s

    def _scale_model(self, alias: str, model: ModelRecord, load: float, wake: bool, now: float) -> None:
        spec = model.spec
        if self._failed_recently(model, now):
            return
        model.scale.target = next_target(spec.policy(), model.scale, load, wake, now, self.settings.scale_down_delay_s)
        mine = [r for r in self._replicas.values() if r.alias == alias]
        awake = [r for r in mine if not r.asleep]
        asleep = sorted((r for r in mine if r.asleep), key=lambda r: -r.asleep_since)
        missing = model.scale.target - len(awake)
        while missing > 0 and asleep:  # the warm tier first: waking takes seconds, a cold start much longer
            replica = asleep.pop(0)
            replica.asleep = False
            replica.state = ReplicaState.WAKING
            missing -= 1
        for _ in range(missing):
            if not self._add_replica(alias, model, now):
                break
        if missing < 0:
            # Keep ready replicas, drop the ones still starting first.
            extras = sorted(awake, key=lambda r: (r.state is ReplicaState.READY, r.replica_id))[:-missing]
            for replica in extras:
                worker = self._workers.get(replica.worker_id)
                if replica.state is ReplicaState.READY and worker and worker.registration.sleep_supported:
                    replica.asleep, replica.asleep_since = True, now
                    log.info("putting %s of %s to sleep", replica.replica_id, alias)
                else:
                    del self._replicas[replica.replica_id]
                    log.info("stopping %s of %s", replica.replica_id, alias)
        for replica in asleep:
            if now - replica.asleep_since >= spec.idle_timeout_s:
                del self._replicas[replica.replica_id]
                log.info("unloading sleeping %s of %s", replica.replica_id, alias)

    def _capacities(self) -> list[WorkerCapacity]:
        capacities = {w.worker_id: WorkerCapacity(
            worker_id=w.worker_id, healthy=w.state is WorkerState.HEALTHY, gpu_indices=[g.index for g in w.gpus],
            cpu_slots=w.registration.cpu_slots) for w in self._workers.all() if w.state is not WorkerState.DEAD}
        for r in self._replicas.values():
            cap = capacities.get(r.worker_id)
            if cap is None:
                continue
            if r.gpus:
                for g in r.gpus:
                    cap.gpu_claims[g] = cap.gpu_claims.get(g, 0.0) + r.fraction
            else:
                cap.cpu_used += 1
            cap.aliases.add(r.alias)
        return list(capacities.values())

    def _add_replica(self, alias: str, model: ModelRecord, now: float) -> bool:
        engine = model.spec.engine_args()
        capacities = self._capacities()
        try:
            placement = place(alias, engine, capacities)
            evict: list[str] = []
        except PlacementError as err:
            plan = plan_eviction(alias, engine, capacities, self._eviction_candidates(alias))
            if plan is None:
                if self._awaiting_workers(now):
                    # Just (re)started and no worker is back yet: wait for their re-registration (they bring
                    # their running engines) instead of failing the model for failed_retry_after_s.
                    return False
                self.stats.placements_failed += 1
                model.last_error = str(err)
                model.failed_at = now
                model.scale.target = 0
                log.warning("%s", err)
                return False
            placement, evict = plan
        for rid in evict:
            victim = self._replicas.pop(rid)
            self.stats.evictions += 1
            log.info("evicting idle %s of %s to make room for %s", rid, victim.alias, alias)
        replica = Replica(replica_id=f"{alias}-{uuid.uuid4().hex[:8]}", alias=alias, worker_id=placement.worker_id,
                          gpus=placement.gpus, fraction=placement.fraction)
        self._replicas[replica.replica_id] = replica
        claim(capacities, placement, alias)
        if not any(r.alias == alias and r.replica_id != replica.replica_id for r in self._replicas.values()):
            self.stats.cold_starts += 1
            replica.cold_start_at = now
            self.metrics.cold_start(alias)
        log.info("placing %s of %s on %s (gpus %s)", replica.replica_id, alias, placement.worker_id,
                 placement.gpus or "cpu")
        return True

    def _awaiting_workers(self, now: float) -> bool:
        return (not self._workers.all() and self._started_at is not None
                and now - self._started_at < self.settings.heartbeat_timeout)

    def _eviction_candidates(self, alias: str) -> list[EvictionCandidate]:
        loads = self._loads(self._clock())
        out = []
        for other, model in self._models.items():
            if other == alias or loads.get(other, 0.0) > 0:
                continue
            mine = [r for r in self._replicas.values() if r.alias == other]
            # Sleeping replicas go first, then awake ones, never below min_replicas.
            mine.sort(key=lambda r: not r.asleep)
            for r in mine[: max(0, len(mine) - model.spec.min_replicas)]:
                out.append(EvictionCandidate(r.replica_id, r.worker_id, r.gpus, r.fraction, model.scale.last_active))
        return out

    def _assignments(self, worker_id: str) -> list[Assignment]:
        out = []
        for r in self._replicas.values():
            model = self._models.get(r.alias)
            if r.worker_id == worker_id and model is not None:
                out.append(Assignment(replica_id=r.replica_id, alias=r.alias, model_name=model.spec.model_name,
                                      engine=model.spec.engine_args(), gpus=r.gpus, asleep=r.asleep))
        return out

    async def _push_assignments(self) -> None:
        pushes = []
        for record in self._workers.all():
            if record.state is WorkerState.DEAD:
                continue
            assignments = self._assignments(record.worker_id)
            digest = _digest(assignments)
            if self._pushed.get(record.worker_id) != digest:
                pushes.append(self._push(record, assignments, digest))
        if pushes:
            await asyncio.gather(*pushes)

    async def _push(self, record: WorkerRecord, assignments: list[Assignment], digest: str) -> None:
        assert self._client is not None
        try:
            resp = await self._client.put(f"{record.url}/engines", headers=self._worker_headers,
                                          json=[a.model_dump(mode="json") for a in assignments])
            resp.raise_for_status()
            self._pushed[record.worker_id] = digest
        except httpx.HTTPError as exc:
            # The next heartbeat reply carries the same assignments, so nothing is lost.
            log.warning("push to worker %s failed (%s); its next heartbeat will carry it", record.worker_id, exc)

    # ------------------------------------------------------------------ routing table

    def _rebuild_table(self) -> None:
        now = self._clock()
        healthy = {w.worker_id: w for w in self._workers.healthy()}
        models: dict[str, ModelRoute] = {}
        for alias, model in self._models.items():
            mine = [r for r in self._replicas.values() if r.alias == alias]
            endpoints = [Endpoint(replica_id=r.replica_id, worker_id=r.worker_id, url=healthy[r.worker_id].url)
                         for r in mine if r.state is ReplicaState.READY and not r.asleep and r.worker_id in healthy]
            error = None
            if endpoints:
                state = ModelState.READY
            elif any(r.state in _ACTIVE and not r.asleep for r in mine):
                state = ModelState.LOADING
            elif any(r.asleep for r in mine):
                state = ModelState.SLEEPING
            elif self._failed_recently(model, now):
                state, error = ModelState.FAILED, model.last_error
            else:
                state = ModelState.COLD
            models[alias] = ModelRoute(state=state, endpoints=endpoints, error=error, created=int(model.created_at))
        if models != self._table.models:
            self._version += 1
            self._table = RoutingTable(version=self._version, epoch=self.epoch, models=models)
            self._notify()

    def _notify(self) -> None:
        if self._changed is None:
            return

        async def notify(cond: asyncio.Condition) -> None:
            async with cond:
                cond.notify_all()

        with contextlib.suppress(RuntimeError):  # no running loop (construction time)
            asyncio.get_running_loop().create_task(notify(self._changed))


def _digest(assignments: list[Assignment]) -> str:
    blob = "|".join(a.model_dump_json() for a in sorted(assignments, key=lambda a: a.replica_id))
    return hashlib.sha256(blob.encode()).hexdigest()
