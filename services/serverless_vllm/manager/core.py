"""The manager's logic, independent of transport: the HTTP service and the Ray actor are thin adapters over it.

Desired vs actual: the manager owns which replicas should exist (`_replicas`) and where; workers report
what actually runs in heartbeats. Each worker receives its complete assignment list both when it changes
(a push) and in every heartbeat reply, so a lost command or a restarted worker heals by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..aio import wait_event
from ..config import AuthSettings, ManagerSettings
from ..errors import APIError
from ..metrics import sd
from ..metrics.manager import FleetSnapshot, ManagerMetrics, ModelRow, ReplicaRow
from ..schemas import (
    Assignment,
    DemandReport,
    Endpoint,
    EngineArgs,
    Heartbeat,
    HeartbeatReply,
    ModelInfo,
    ModelPatch,
    ModelPolicy,
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
from .placement import EvictionCandidate, PlacementError, WorkerCapacity, place, plan_eviction
from .store import ModelStore
from .workers import WorkerRecord, WorkerRegistry

log = logging.getLogger(__name__)

# A router's load report counts for this long; after that the router is presumed gone.
DEMAND_TTL_S = 5.0
# Least time between two passes: events that come in a storm (1,000 workers registering after a restart) are
# handled in one pass instead of a pass each, and the requests themselves get the CPU in between.
MIN_PASS_GAP_S = 0.05
_ACTIVE = (ReplicaState.PENDING, ReplicaState.STARTING, ReplicaState.READY, ReplicaState.WAKING)

# What can differ between two versions of a worker's assignments: (replica id, asleep) of each replica, in
# list order. A replica's alias, GPUs, model and engine are fixed for its id (PATCH changes policy only), so
# equal keys mean equal assignment lists; comparing keys replaces building and hashing every worker's
# serialized assignments on each pass. What a worker accepted is remembered as the set (PushedKey): the
# order of a list does not matter to the worker, so a reordering alone is not pushed again.
AssignmentKey = tuple[tuple[str, bool], ...]
PushedKey = frozenset[tuple[str, bool]]
# The inputs of one model's route: state, endpoints as (replica id, worker id, url), error, created.
RouteKey = tuple[ModelState, tuple[tuple[str, str, str], ...], str | None, int]


@dataclass
class ModelRecord:
    spec: ModelSpec
    created_at: float
    scale: ScaleState = field(default_factory=ScaleState)
    last_error: str | None = None
    failed_at: float | None = None  # monotonic; the model is FAILED for failed_retry_after_s after this
    # (spec, its policy, its engine args): derived once per spec, not per reconcile pass or heartbeat reply
    # (each derivation is a pydantic dump and validation, and a pass asks for 10,000 models' policies).
    _derived: tuple[ModelSpec, ModelPolicy, EngineArgs] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def _derive(self) -> tuple[ModelSpec, ModelPolicy, EngineArgs]:
        if self._derived is None or self._derived[0] is not self.spec:  # `spec` is replaced by PATCH
            self._derived = (self.spec, self.spec.policy(), self.spec.engine_args())
        return self._derived

    def policy(self) -> ModelPolicy:
        """spec.policy(), cached: callers must not mutate it."""
        return self._derive()[1]

    def engine(self) -> EngineArgs:
        """spec.engine_args(), cached: callers must not mutate it."""
        return self._derive()[2]


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


class ReplicaIndex:
    """The desired replicas by id, also indexed by model alias and by worker.

    A replica's alias and worker never change, so the indexes only move on add and remove. They turn the
    per-model and per-worker questions (routing table, heartbeat replies, scaling, placement) from scans of
    every replica (O(models x replicas) for a table rebuild) into lookups. Iteration order is insertion order,
    in the whole and in each group, as with the plain dict this replaces.
    """

    def __init__(self) -> None:
        self._all: dict[str, Replica] = {}
        self._by_alias: dict[str, dict[str, Replica]] = {}
        self._by_worker: dict[str, dict[str, Replica]] = {}

    def add(self, replica: Replica) -> None:
        if replica.replica_id in self._all:
            self.remove(replica.replica_id)  # replaced: keep the groups consistent
        self._all[replica.replica_id] = replica
        self._by_alias.setdefault(replica.alias, {})[replica.replica_id] = replica
        self._by_worker.setdefault(replica.worker_id, {})[replica.replica_id] = replica

    def remove(self, replica_id: str) -> Replica:
        replica = self._all.pop(replica_id)
        for index, key in ((self._by_alias, replica.alias), (self._by_worker, replica.worker_id)):
            group = index[key]
            del group[replica_id]
            if not group:
                del index[key]
        return replica

    def get(self, replica_id: str) -> Replica | None:
        return self._all.get(replica_id)

    def __contains__(self, replica_id: object) -> bool:
        return replica_id in self._all

    def __len__(self) -> int:
        return len(self._all)

    def values(self) -> Iterable[Replica]:
        return self._all.values()

    def of_alias(self, alias: str) -> list[Replica]:
        group = self._by_alias.get(alias)
        return list(group.values()) if group else []

    def of_worker(self, worker_id: str) -> list[Replica]:
        group = self._by_worker.get(worker_id)
        return list(group.values()) if group else []

    def has_alias(self, alias: str) -> bool:
        return alias in self._by_alias


@dataclass
class ManagerStats:
    """Counters for metrics; the gauges are derived from live state at scrape time."""

    cold_starts: int = 0
    placements_failed: int = 0
    evictions: int = 0
    failovers: int = 0
    engine_failures: int = 0


class ManagerCore:
    def __init__(
        self,
        settings: ManagerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        client: httpx.AsyncClient | None = None,
        worker_headers: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._store = ModelStore(settings.db_path)
        self._workers = WorkerRegistry(settings.heartbeat_timeout_s)
        self._models: dict[str, ModelRecord] = {}
        self._replicas = ReplicaIndex()
        self._demand: dict[str, tuple[float, DemandReport]] = {}
        self._wake: set[str] = set()
        self._pushed: dict[str, PushedKey] = {}  # worker id -> the assignments it last accepted
        # worker id -> (key, reply): a heartbeat reply is rebuilt only when that worker's assignments change.
        self._replies: dict[str, tuple[AssignmentKey, HeartbeatReply]] = {}
        # alias -> the inputs of its current route: a rebuild compares these and creates only changed routes.
        self._route_keys: dict[str, RouteKey] = {}
        # The capacity snapshot of the reconcile pass under way, built at its first placement and kept in step
        # with every replica added or removed during the pass (instead of rebuilt for each placement).
        self._caps: dict[str, WorkerCapacity] | None = None
        self._pass_open = False
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
            self._models[spec.alias] = ModelRecord(
                spec=spec, created_at=created_at, scale=ScaleState(target=spec.min_replicas, last_active=now)
            )
        self._rebuild_table()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the reconcile loop (idempotent: the Ray adapter calls it lazily after each restart)."""
        if self._loop_task is None or self._loop_task.done():
            self._changed = asyncio.Condition()
            self._kick = asyncio.Event()
            self._reconcile_lock = asyncio.Lock()
            if self._client is None:
                self._client = httpx.AsyncClient(
                    timeout=self.settings.worker_timeout_s, limits=httpx.Limits(max_connections=200)
                )
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
            raise APIError(
                400,
                f"alias '{spec.alias}' is already registered with different settings "
                "(delete it first, or PATCH its policy)",
                "alias_exists",
            )
        now = self._clock()
        created = self._store.save(spec)
        target = max(spec.min_replicas, 1 if spec.preload else 0)
        self._models[spec.alias] = ModelRecord(
            spec=spec, created_at=created, scale=ScaleState(target=target, last_active=now)
        )
        log.info("registered model %s -> %s (preload=%s)", spec.alias, spec.model_name, spec.preload)
        self._rebuild_table([spec.alias])
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
        for replica in self._replicas.of_alias(alias):
            self._remove_replica(replica.replica_id)
        self.metrics.forget(alias)
        log.info("deleted model %s", alias)
        self._rebuild_table([alias])
        self._poke()

    def model_info(self, alias: str) -> ModelInfo:
        record = self._model(alias)
        spec = record.spec
        replicas = [
            ReplicaInfo(
                replica_id=r.replica_id,
                worker_id=r.worker_id,
                gpus=r.gpus,
                state=r.state,
                asleep=r.asleep,
                error=r.error,
            )
            for r in self._replicas.of_alias(alias)
        ]
        return ModelInfo(
            alias=alias,
            model_name=spec.model_name,
            state=self._model_state(alias),
            engine=record.engine(),
            policy=record.policy(),
            desired_replicas=record.scale.target,
            replicas=replicas,
            last_error=record.last_error,
            created_at=record.created_at,
        )

    def _model_state(self, alias: str) -> ModelState:
        """A model's state is its route's: the table is rebuilt whenever a replica changes state."""
        route = self._table.models.get(alias)
        return route.state if route else ModelState.COLD

    def list_models(self) -> list[ModelInfo]:
        return [self.model_info(alias) for alias in self._models]

    # ------------------------------------------------------------------ workers

    async def register_worker(self, reg: WorkerRegistration) -> HeartbeatReply:
        record = self._workers.register(reg, self._clock())
        self._adopt_engines(record)
        log.info(
            "worker %s registered at %s (%d GPU(s), %d CPU slot(s), %d engine(s))",
            reg.worker_id,
            reg.url,
            len(reg.gpus),
            reg.cpu_slots,
            len(reg.engines),
        )
        self._apply_reports(record)
        self._poke()
        return self._reply(record)

    async def heartbeat(self, hb: Heartbeat) -> HeartbeatReply:
        known = self._workers.get(hb.worker_id)
        was_healthy = known is not None and known.state is WorkerState.HEALTHY
        record = self._workers.heartbeat(hb, self._clock())
        if record is None:
            return HeartbeatReply(reregister=True)
        # A worker back to healthy re-enters routing: rebuild the table even if no replica changed.
        self._apply_reports(record, rebuild=not was_healthy)
        return self._reply(record)

    def list_workers(self) -> list[WorkerInfo]:
        now = self._clock()
        return [w.info(now) for w in self._workers.all()]

    def _reply(self, record: WorkerRecord) -> HeartbeatReply:
        """The worker's assignments; the reply object is reused until they change (callers must not mutate it)."""
        key = self._assignment_key(record.worker_id)
        cached = self._replies.get(record.worker_id)
        if cached is None or cached[0] != key:
            cached = (key, HeartbeatReply(assignments=self._assignments(record.worker_id)))
            self._replies[record.worker_id] = cached
        self._pushed[record.worker_id] = frozenset(key)
        return cached[1]

    def _adopt_engines(self, record: WorkerRecord) -> None:
        """Take over engines a worker already runs (after a manager restart) when they still fit the registry."""
        for status in record.engines.values():
            if status.replica_id in self._replicas or status.state is ReplicaState.FAILED:
                continue
            model = self._models.get(status.alias)
            if model is None or (status.model_name and status.model_name != model.spec.model_name):
                continue
            mine = self._replicas.of_alias(status.alias)
            if len(mine) >= model.spec.max_replicas:
                continue
            self._add_replica_record(
                Replica(
                    replica_id=status.replica_id,
                    alias=status.alias,
                    worker_id=record.worker_id,
                    gpus=status.gpus,
                    fraction=model.spec.gpu_memory_utilization if status.gpus else 0.0,
                    state=status.state,
                    asleep=status.state is ReplicaState.SLEEPING,
                    asleep_since=self._clock(),
                )
            )
            model.scale.target = max(
                model.scale.target, sum(1 for r in mine if not r.asleep) + (status.state is not ReplicaState.SLEEPING)
            )
            log.info("adopted running engine %s of %s on %s", status.replica_id, status.alias, record.worker_id)

    def _apply_reports(self, record: WorkerRecord, rebuild: bool = True) -> None:
        """Fold a worker's engine reports into the replicas' actual state.

        Costs O(this worker's replicas): only the routes of models whose replica changed state are rebuilt, or,
        with `rebuild` (the worker registered or came back to healthy, so its endpoints enter routing), the
        routes of every model it runs. A heartbeat that changes nothing leaves the table alone."""
        mine = self._replicas.of_worker(record.worker_id)
        changed: set[str] = {r.alias for r in mine} if rebuild else set()
        for replica in mine:
            report = record.engines.get(replica.replica_id)
            if report is None:
                # Not (or no longer) running there: the assignments make the worker start it.
                if replica.state not in (ReplicaState.FAILED, ReplicaState.PENDING):
                    replica.state = ReplicaState.PENDING
                    changed.add(replica.alias)
                continue
            if report.state is ReplicaState.READY and replica.cold_start_at is not None:
                self.metrics.cold_start_done(replica.alias, self._clock() - replica.cold_start_at)
                replica.cold_start_at = None
            if replica.state is not report.state:
                changed.add(replica.alias)
            replica.state = report.state
            if report.state is ReplicaState.FAILED:
                tail = "\n".join(report.log_tail[-20:])
                replica.error = f"{report.error or 'engine failed'}\n{tail}".strip()
        if changed:
            self._rebuild_table(changed)

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

    async def metrics_text(self) -> bytes:
        """The manager's metrics in Prometheus text format (the HTTP service serves it at /metrics; in Ray mode
        the router relays it at /manager/metrics, the manager actor having no HTTP port)."""
        return await self.metrics.render()

    def fleet_snapshot(self) -> FleetSnapshot:
        """Workers, models and replicas as plain values, for a scrape (cheaper than list_models' full infos)."""
        now = self._clock()
        workers = [
            (w.worker_id, w.state.value, round(max(0.0, now - w.last_heartbeat), 3)) for w in self._workers.all()
        ]
        models = []
        for alias, record in self._models.items():
            replicas = tuple(
                ReplicaRow(r.replica_id, r.worker_id, ",".join(map(str, r.gpus)) or "cpu", r.state.value)
                for r in self._replicas.of_alias(alias)
            )
            models.append(ModelRow(alias, self._model_state(alias).value, record.scale.target, replicas))
        return FleetSnapshot(workers, models, dataclasses.replace(self.stats))

    def sd_targets(self, kind: sd.SDKind = "engines") -> list[dict[str, Any]]:
        """Prometheus HTTP service discovery: the running engines (or the workers) as scrape targets."""
        return sd.targets(self.list_workers(), kind)

    def health(self) -> dict[str, object]:
        states = [w.state for w in self._workers.all()]
        return {
            "status": "ok",
            "epoch": self.epoch,
            "routing_version": self._version,
            "models": len(self._models),
            "replicas": len(self._replicas),
            "workers": {s.value: states.count(s) for s in WorkerState},
        }

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
            self._pass_open, self._caps = True, None
            try:
                for alias, model in self._models.items():
                    load, wake = loads.get(alias, 0.0), alias in wakes
                    if (
                        not load
                        and not wake
                        and model.scale.target == 0
                        and model.spec.min_replicas == 0
                        and not self._replicas.has_alias(alias)
                    ):
                        # Cold, unasked-for and not to be kept warm: the autoscaler keeps it at 0 and there is
                        # nothing to place or stop (most of 10,000 registered models, every pass).
                        continue
                    self._scale_model(alias, model, load, wake, now)
            finally:
                self._pass_open, self._caps = False, None
            self._rebuild_table()
            await self._push_assignments()

    def _sweep_workers(self, now: float) -> None:
        stalled = now - self._last_sweep if self._last_sweep is not None else 0.0
        self._last_sweep = now
        if stalled > self.settings.heartbeat_timeout_s / 2:
            # This process did not run for a while (CPU starvation, a pause): every heartbeat looks late
            # because we were not there to receive it. Judge workers again on the next pass.
            log.warning("manager loop stalled for %.1f s: that silence is not held against workers", stalled)
            self._workers.excuse(stalled, now)
        for record, state in self._workers.sweep(now):
            log.warning(
                "worker %s is %s (no heartbeat for %.0f s)", record.worker_id, state.value, now - record.last_heartbeat
            )
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
        lost = self._replicas.of_worker(record.worker_id)
        for replica in lost:
            self._remove_replica(replica.replica_id)
        if lost:
            self.stats.failovers += len(lost)
            log.warning("worker %s dead: %d replica(s) will be placed elsewhere", record.worker_id, len(lost))
        self._pushed.pop(record.worker_id, None)
        self._replies.pop(record.worker_id, None)
        # Its endpoints were all replicas of these models; other routes are untouched.
        self._rebuild_table({r.alias for r in lost})

    def _collect_failures(self, now: float) -> None:
        for replica in [r for r in self._replicas.values() if r.state is ReplicaState.FAILED]:
            model = self._models.get(replica.alias)
            self._remove_replica(replica.replica_id)
            self.stats.engine_failures += 1
            if model is not None:
                model.last_error = replica.error or "engine failed"
                log.error("replica %s of %s failed: %s", replica.replica_id, replica.alias, model.last_error)
                if not self._replicas.has_alias(replica.alias):
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
        model.scale.target = next_target(model.policy(), model.scale, load, wake, now, self.settings.scale_down_delay_s)
        mine = self._replicas.of_alias(alias)
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
                    self._remove_replica(replica.replica_id)
                    log.info("stopping %s of %s", replica.replica_id, alias)
        for replica in asleep:
            if now - replica.asleep_since >= spec.idle_timeout_s:
                self._remove_replica(replica.replica_id)
                log.info("unloading sleeping %s of %s", replica.replica_id, alias)

    # ------------------------------------------------------------------ replicas and capacity

    def _add_replica_record(self, replica: Replica) -> None:
        """Every replica enters through here (and leaves through _remove_replica): the indexes and the pass's
        capacity snapshot stay in step with the replicas."""
        self._replicas.add(replica)
        if self._caps is not None and (cap := self._caps.get(replica.worker_id)) is not None:
            _count(cap, replica)  # appended last, as a fresh snapshot would sum it: the same floats

    def _remove_replica(self, replica_id: str) -> Replica:
        replica = self._replicas.remove(replica_id)
        if self._caps is not None and replica.worker_id in self._caps:
            record = self._workers.get(replica.worker_id)
            if record is not None:
                # Recounted rather than subtracted, so that claims are summed exactly as a fresh snapshot would
                # (placement breaks ties on them) and `aliases` drops a model with no replica left there.
                self._caps[replica.worker_id] = self._capacity(record)
        return replica

    def _capacity(self, record: WorkerRecord) -> WorkerCapacity:
        cap = WorkerCapacity(
            worker_id=record.worker_id,
            healthy=record.state is WorkerState.HEALTHY,
            gpu_indices=[g.index for g in record.gpus],
            cpu_slots=record.registration.cpu_slots,
        )
        for r in self._replicas.of_worker(record.worker_id):
            _count(cap, r)
        return cap

    def _capacity_map(self) -> dict[str, WorkerCapacity]:
        """A snapshot of the fleet for placement: O(workers + replicas)."""
        return {w.worker_id: self._capacity(w) for w in self._workers.all() if w.state is not WorkerState.DEAD}

    def _capacities(self) -> list[WorkerCapacity]:
        if self._pass_open:
            # Within a reconcile pass: built once at its first placement, then kept in step (see _caps).
            if self._caps is None:
                self._caps = self._capacity_map()
            return list(self._caps.values())
        return list(self._capacity_map().values())

    def _add_replica(self, alias: str, model: ModelRecord, now: float) -> bool:
        engine = model.engine()
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
            victim = self._remove_replica(rid)
            self.stats.evictions += 1
            log.info("evicting idle %s of %s to make room for %s", rid, victim.alias, alias)
        replica = Replica(
            replica_id=f"{alias}-{uuid.uuid4().hex[:8]}",
            alias=alias,
            worker_id=placement.worker_id,
            gpus=placement.gpus,
            fraction=placement.fraction,
        )
        self._add_replica_record(replica)  # also claims its share in the pass's capacity snapshot
        if len(self._replicas.of_alias(alias)) == 1:  # the model's only replica: a cold start
            self.stats.cold_starts += 1
            replica.cold_start_at = now
            self.metrics.cold_start(alias)
        log.info(
            "placing %s of %s on %s (gpus %s)", replica.replica_id, alias, placement.worker_id, placement.gpus or "cpu"
        )
        return True

    def _awaiting_workers(self, now: float) -> bool:
        # Every live worker re-registers within a heartbeat interval of a restart; until then a model that finds
        # no room may only be missing the workers that have not come back yet.
        return self._started_at is not None and now - self._started_at < self.settings.heartbeat_timeout_s

    def _eviction_candidates(self, alias: str) -> list[EvictionCandidate]:
        loads = self._loads(self._clock())
        out = []
        for other, model in self._models.items():
            # Most models have no replica: the index answers that before anything else is looked at.
            if not self._replicas.has_alias(other) or other == alias or loads.get(other, 0.0) > 0:
                continue
            mine = self._replicas.of_alias(other)
            # Sleeping replicas go first, then awake ones, never below min_replicas.
            mine.sort(key=lambda r: not r.asleep)
            for r in mine[: max(0, len(mine) - model.spec.min_replicas)]:
                out.append(EvictionCandidate(r.replica_id, r.worker_id, r.gpus, r.fraction, model.scale.last_active))
        return out

    def _assignments(self, worker_id: str) -> list[Assignment]:
        out = []
        for r in self._replicas.of_worker(worker_id):
            model = self._models.get(r.alias)
            if model is not None:
                out.append(
                    Assignment(
                        replica_id=r.replica_id,
                        alias=r.alias,
                        model_name=model.spec.model_name,
                        engine=model.engine(),
                        gpus=r.gpus,
                        asleep=r.asleep,
                    )
                )
        return out

    def _assignment_key(self, worker_id: str) -> AssignmentKey:
        """What identifies the worker's assignments (see AssignmentKey), in O(its replicas)."""
        return tuple((r.replica_id, r.asleep) for r in self._replicas.of_worker(worker_id) if r.alias in self._models)

    async def _push_assignments(self) -> None:
        pushes = []
        for record in self._workers.all():
            if record.state is WorkerState.DEAD:
                continue
            key = frozenset(self._assignment_key(record.worker_id))
            if self._pushed.get(record.worker_id) != key:
                pushes.append(self._push(record, self._assignments(record.worker_id), key))
        if pushes:
            await asyncio.gather(*pushes)

    async def _push(self, record: WorkerRecord, assignments: list[Assignment], key: PushedKey) -> None:
        assert self._client is not None
        try:
            resp = await self._client.put(
                f"{record.url}/engines",
                headers=self._worker_headers,
                json=[a.model_dump(mode="json") for a in assignments],
            )
            resp.raise_for_status()
            self._pushed[record.worker_id] = key
        except httpx.HTTPError as exc:
            # The next heartbeat reply carries the same assignments, so nothing is lost.
            log.warning("push to worker %s failed (%s); its next heartbeat will carry it", record.worker_id, exc)

    # ------------------------------------------------------------------ routing table

    def _rebuild_table(self, aliases: Iterable[str] | None = None) -> None:
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
            targets = [a for a in wanted if a in self._models]
            gone = [a for a in wanted if a not in self._models and a in self._route_keys]
        changed: dict[str, RouteKey] = {}
        for alias in targets:
            key = self._route_key(self._models[alias], self._replicas.of_alias(alias), now)
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
            # A copy (C speed) keeps every alias in place; a new one goes last, as it did in self._models.
            models = dict(self._table.models)
            for alias in gone:
                del models[alias]
            models.update(fresh)
        self._version += 1
        # Every route was validated when created: the container need not validate 10,000 of them again.
        self._table = RoutingTable.model_construct(version=self._version, epoch=self.epoch, models=models)
        self._notify()

    def _route_key(self, model: ModelRecord, mine: list[Replica], now: float) -> RouteKey:
        if not mine:  # most models, on every full rebuild: the same answer as below, sooner
            if self._failed_recently(model, now):
                return ModelState.FAILED, (), model.last_error, int(model.created_at)
            return ModelState.COLD, (), None, int(model.created_at)
        endpoints = []
        for r in mine:
            if r.state is ReplicaState.READY and not r.asleep:
                worker = self._workers.get(r.worker_id)
                if worker is not None and worker.state is WorkerState.HEALTHY:
                    endpoints.append((r.replica_id, r.worker_id, worker.url))
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
        return state, tuple(endpoints), error, int(model.created_at)

    def _notify(self) -> None:
        if self._changed is None:
            return

        async def notify(cond: asyncio.Condition) -> None:
            async with cond:
                cond.notify_all()

        with contextlib.suppress(RuntimeError):  # no running loop (construction time)
            asyncio.get_running_loop().create_task(notify(self._changed))


def _count(cap: WorkerCapacity, replica: Replica) -> None:
    """Add one replica's claim to a worker's capacity."""
    if replica.gpus:
        for g in replica.gpus:
            cap.gpu_claims[g] = cap.gpu_claims.get(g, 0.0) + replica.fraction
    else:
        cap.cpu_used += 1
    cap.aliases.add(replica.alias)


def _route(key: RouteKey) -> ModelRoute:
    state, endpoints, error, created = key
    return ModelRoute(
        state=state,
        endpoints=[Endpoint(replica_id=rid, worker_id=wid, url=url) for rid, wid, url in endpoints],
        error=error,
        created=created,
    )
