"""The reconcile pass: from worker liveness, router demand and replica failures to the desired replicas.

Owns replica targets (the autoscaler applied), placement and eviction, the capacity snapshot a pass places on
(kept in step with every replica added or removed), failure collection and what a dead worker's replicas
become. Every replica enters the desired state through `add_replica` and leaves through `remove_replica`: at once
when it failed or its worker died, else once it has drained (scale-down, eviction: `draining.retire` first).
Transport-free: the core pushes the outcome to workers (worker_link.py) and publishes routes after a pass.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from ..config import ManagerSettings
from ..metrics.manager import ManagerMetrics
from ..schemas import ReplicaState, WorkerState
from . import gpu_memory
from .autoscale import Demand, next_target
from .draining import freeing, removal_order, retire, serving
from .placement import EvictionCandidate, PlacementError, WorkerCapacity, place, plan_eviction
from .registry import ModelRecord, ModelRegistry
from .replicas import Replica, ReplicaIndex
from .routing_publisher import RoutingPublisher
from .sleep_level import choose_sleep_level
from .worker_link import WorkerLink
from .workers import WorkerRecord, WorkerRegistry

log = logging.getLogger(__name__)


@dataclass
class ManagerStats:
    """Counters for metrics; the gauges are derived from live state at scrape time."""

    cold_starts: int = 0
    placements_failed: int = 0
    evictions: int = 0
    failovers: int = 0
    engine_failures: int = 0


class Reconciler:
    def __init__(
        self,
        settings: ManagerSettings,
        clock: Callable[[], float],
        registry: ModelRegistry,
        replicas: ReplicaIndex,
        workers: WorkerRegistry,
        demand: Demand,
        routing: RoutingPublisher,
        link: WorkerLink,
        stats: ManagerStats,
        metrics: ManagerMetrics,
    ) -> None:
        self._settings = settings
        self._overhead_mb = settings.gpu_engine_overhead_mb
        self._clock = clock
        self._models = registry.models  # the live dict: a pass goes over 10,000 models
        self._failed_recently = registry.failed_recently
        self._replicas = replicas
        self._workers = workers
        self._demand = demand
        self._routing = routing
        self._link = link
        self._stats = stats
        self._metrics = metrics
        self.started_at: float | None = None  # clock time of the core's start(): workers re-register within a heartbeat
        # The capacity snapshot of the reconcile pass under way, built at its first placement and kept in step
        # with every replica added or removed during the pass (instead of rebuilt for each placement).
        self._caps: dict[str, WorkerCapacity] | None = None
        self._pass_open = False
        self._last_sweep: float | None = None
        # Set by the core: folds LoRA adapters' loads and wakes into their bases' (manager/adapters.py).
        self.fold_demand: Callable[[dict[str, float], set[str]], None] | None = None

    # ------------------------------------------------------------------ the pass

    def run_pass(self, now: float) -> None:
        """Worker liveness, failures, autoscaling and placement. The caller publishes routes and pushes."""
        self._sweep_workers(now)
        loads = self._demand.loads(now)
        wakes = self._demand.take_wakes()
        if self.fold_demand is not None:
            self.fold_demand(loads, wakes)  # LoRA adapters' demand counts toward their bases
        self._collect_failures(now)
        with self.pass_snapshot():
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
                if model.spec.base is not None:
                    continue  # a LoRA adapter: served by its base's replicas (manager/adapters.py)
                self._scale_model(alias, model, load, wake, now)

    @contextlib.contextmanager
    def pass_snapshot(self) -> Iterator[None]:
        """Within: `capacities()` is built once, at its first call, then kept in step (see `snapshot`)."""
        self._pass_open, self._caps = True, None
        try:
            yield
        finally:
            self._pass_open, self._caps = False, None

    def _sweep_workers(self, now: float) -> None:
        stalled = now - self._last_sweep if self._last_sweep is not None else 0.0
        self._last_sweep = now
        if stalled > self._settings.heartbeat_timeout_s / 2:
            # This process did not run for a while (CPU starvation, a pause): every heartbeat looks late
            # because we were not there to receive it. Judge workers again on the next pass.
            log.warning("manager loop stalled for %.1f s: that silence is not held against workers", stalled)
            self._workers.excuse(stalled, now)
        for record, state in self._workers.sweep(now):
            log.warning(
                "worker %s is %s (no heartbeat for %.0f s)", record.worker_id, state.value, now - record.last_heartbeat
            )
            if state is WorkerState.DEAD:
                self.on_worker_dead(record)
        # A dead worker stays listed (GET /workers, its metrics series) for a while, then goes: a worker scaled
        # away or recreated under another id would otherwise stay dead forever. One that comes back registers.
        for record in self._workers.expire_dead(now, self._settings.dead_worker_retention_s):
            self._link.forget(record.worker_id)
            log.info("dead worker %s forgotten", record.worker_id)

    def on_worker_dead(self, record: WorkerRecord) -> None:
        self._workers.mark_dead(record.worker_id, self._clock())
        lost = self._replicas.of_worker(record.worker_id)
        for replica in lost:
            self.remove_replica(replica.replica_id)
        if lost:
            self._stats.failovers += len(lost)
            log.warning("worker %s dead: %d replica(s) will be placed elsewhere", record.worker_id, len(lost))
        self._link.forget(record.worker_id)
        # Its endpoints were all replicas of these models; other routes are untouched.
        self._routing.rebuild({r.alias for r in lost})

    def _collect_failures(self, now: float) -> None:
        for replica in [r for r in self._replicas.values() if r.state is ReplicaState.FAILED]:
            model = self._models.get(replica.alias)
            self.remove_replica(replica.replica_id)
            self._stats.engine_failures += 1
            if model is not None:
                model.last_error = replica.error or "engine failed"
                log.error("replica %s of %s failed: %s", replica.replica_id, replica.alias, model.last_error)
                if not serving(self._replicas.of_alias(replica.alias)):
                    # Nothing serves it: FAILED for a while, then the next request tries again (no restart loop).
                    # A model that still has replicas keeps its target; the autoscaler places another.
                    model.failed_at = now
                    model.scale.target = 0

    def _scale_model(self, alias: str, model: ModelRecord, load: float, wake: bool, now: float) -> None:
        spec = model.spec
        if self._failed_recently(model, now):
            return
        model.scale.target = next_target(
            model.policy(), model.scale, load, wake, now, self._settings.scale_down_delay_s
        )
        mine = serving(self._replicas.of_alias(alias))  # draining ones are on their way out: not counted
        awake = [r for r in mine if not r.asleep]
        asleep = sorted((r for r in mine if r.asleep), key=lambda r: -r.asleep_since)
        missing = model.scale.target - len(awake)
        while missing > 0 and asleep:  # the warm tier first: waking takes seconds, a cold start much longer
            replica = asleep.pop(0)
            replica.asleep = False
            replica.state = ReplicaState.WAKING
            replica.start_at = now
            replica.ready_at = _ready_at(model.start_times.wake_s)
            log.info("%s: waking", replica.label)
            missing -= 1
        for _ in range(missing):
            if not self._place_replica(alias, model, now):
                break
        if missing < 0:
            # Keep ready replicas, drop the ones still starting first, then the least busy: a replica removed drains
            # (out of routing, its requests in flight finish), and the fewer it has, the sooner its memory is free.
            extras = removal_order(awake, self._demand.replica_loads(now))[:-missing]
            for replica in extras:
                worker = self._workers.get(replica.worker_id)
                if replica.state is ReplicaState.READY and worker and worker.registration.sleep_supported:
                    on_worker = self._replicas.of_worker(worker.worker_id)
                    fraction = self._settings.sleep_host_memory_fraction
                    replica.sleep_level = choose_sleep_level(replica, worker, on_worker, fraction)
                    replica.asleep, replica.asleep_since = True, now
                    log.info("putting %s of %s to sleep (level %d)", replica.replica_id, alias, replica.sleep_level)
                else:
                    retire(replica, now, "scale-down")
        for replica in asleep:
            if now - replica.asleep_since >= spec.idle_timeout_s:
                retire(replica, now, "asleep longer than its idle timeout: unloading")

    # ------------------------------------------------------------------ replicas and capacity

    def add_replica(self, replica: Replica) -> None:
        """Every replica enters through here (and leaves through remove_replica): the indexes and the pass's
        capacity snapshot stay in step with the replicas."""
        self._replicas.add(replica)
        if self._caps is not None and (cap := self._caps.get(replica.worker_id)) is not None:
            _count(cap, replica)  # appended last, as a fresh snapshot would sum it: the same floats

    def remove_replica(self, replica_id: str) -> Replica:
        replica = self._replicas.remove(replica_id)
        if self._caps is not None and replica.worker_id in self._caps:
            record = self._workers.get(replica.worker_id)
            if record is not None:
                # Recounted rather than subtracted, so that claims are summed exactly as a fresh snapshot would
                # (placement breaks ties on them) and `aliases` drops a model with no replica left there.
                self._caps[replica.worker_id] = self._capacity(record)
        return replica

    @property
    def snapshot(self) -> Mapping[str, WorkerCapacity] | None:
        """The pass's capacity snapshot by worker id; None outside a pass or before its first placement."""
        return self._caps

    def _capacity(self, record: WorkerRecord) -> WorkerCapacity:
        cap = WorkerCapacity(
            worker_id=record.worker_id,
            healthy=record.state is WorkerState.HEALTHY,
            gpu_indices=[g.index for g in record.gpus],
            engine_overhead_mb=self._overhead_mb,
            gpu_total_mb=record.gpu_total_mb,
            gpu_foreign_mb=gpu_memory.current_of(record, self._replicas, self._overhead_mb),
            cpu_slots=record.registration.cpu_slots,
        )
        for r in self._replicas.of_worker(record.worker_id):
            _count(cap, r)
        return cap

    def _capacity_map(self) -> dict[str, WorkerCapacity]:
        """A snapshot of the fleet for placement: O(workers + replicas)."""
        return {w.worker_id: self._capacity(w) for w in self._workers.all() if w.state is not WorkerState.DEAD}

    def capacities(self) -> list[WorkerCapacity]:
        if self._pass_open:
            # Within a reconcile pass: built once at its first placement, then kept in step (see _caps).
            if self._caps is None:
                self._caps = self._capacity_map()
            return list(self._caps.values())
        return list(self._capacity_map().values())

    def _place_replica(self, alias: str, model: ModelRecord, now: float) -> bool:
        engine = model.engine()
        capacities = self.capacities()
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
                self._stats.placements_failed += 1
                model.last_error = str(err)
                model.failed_at = now
                model.scale.target = 0
                log.warning("%s", err)
                return False
            placement, evict = plan
        for rid in evict:
            victim = self._replicas.get(rid)
            if victim is not None and retire(victim, now, f"evicted to make room for {alias!r}"):
                self._stats.evictions += 1
                # An evicted model is idle (no load): it gets the replica back on demand, not at the next pass,
                # where it would evict the model that just took its room, and so on every pass.
                if (owner := self._models.get(victim.alias)) is not None:
                    owner.scale.target = max(owner.spec.min_replicas, owner.scale.target - 1)
        replica = Replica(
            replica_id=f"{alias}-{uuid.uuid4().hex[:8]}",
            alias=alias,
            worker_id=placement.worker_id,
            gpus=placement.gpus,
            fraction=placement.fraction,
            start_at=now,
            ready_at=_ready_at(model.start_times.start_s),
        )
        self.add_replica(replica)  # also claims its share in the pass's capacity snapshot
        if len(self._replicas.of_alias(alias)) == 1:  # the model's only replica: a cold start
            self._stats.cold_starts += 1
            replica.cold_start_at = now
            self._metrics.cold_start(alias)
        where = f"gpus {','.join(map(str, replica.gpus))}" if replica.gpus else "cpu"
        log.info("%s: placed (%s)", replica.label, where)
        return True

    def _awaiting_workers(self, now: float) -> bool:
        # Every live worker re-registers within a heartbeat interval of a restart; until then a model that finds
        # no room may only be missing the workers that have not come back yet.
        return self.started_at is not None and now - self.started_at < self._settings.heartbeat_timeout_s

    def _eviction_candidates(self, alias: str) -> list[EvictionCandidate]:
        loads = self._demand.loads(self._clock())
        out = freeing(self._replicas.values())  # draining: their room is coming free anyway
        for other, model in self._models.items():
            # Most models have no replica: the index answers that before anything else is looked at.
            if not self._replicas.has_alias(other) or other == alias or loads.get(other, 0.0) > 0:
                continue
            mine = serving(self._replicas.of_alias(other))
            # Sleeping replicas go first, then awake ones, never below min_replicas.
            mine.sort(key=lambda r: not r.asleep)
            for r in mine[: max(0, len(mine) - model.spec.min_replicas)]:
                out.append(EvictionCandidate(r.replica_id, r.worker_id, r.gpus, r.fraction, model.scale.last_active))
        return out


def _ready_at(typical_s: float | None) -> float | None:
    """When a start (or wake) beginning now is expected to end, in unix seconds (routers compare it with their own
    clocks): now plus what the model's past ones took; None when it has none yet."""
    return None if typical_s is None else round(time.time() + typical_s, 1)


def _count(cap: WorkerCapacity, replica: Replica) -> None:
    """Add one replica's claim to a worker's capacity."""
    if replica.gpus:
        for g in replica.gpus:
            cap.gpu_claims[g] = cap.gpu_claims.get(g, 0.0) + replica.fraction
            cap.gpu_engines[g] = cap.gpu_engines.get(g, 0) + 1
    else:
        cap.cpu_used += 1
    cap.aliases.add(replica.alias)
