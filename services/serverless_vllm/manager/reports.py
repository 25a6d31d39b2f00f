"""What workers report about their engines, folded into the desired replicas: the engines a registering worker
already runs are adopted (after a manager restart), and every heartbeat's engine states become the replicas'
actual state, with the routes of the models whose state changed rebuilt."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..metrics.manager import ManagerMetrics
from ..schemas import ReplicaState
from .draining import retire
from .reconciler import Reconciler
from .registry import ModelRegistry
from .replicas import Replica, ReplicaIndex
from .routing_publisher import RoutingPublisher
from .workers import WorkerRecord

log = logging.getLogger(__name__)


class EngineReports:
    def __init__(
        self,
        clock: Callable[[], float],
        registry: ModelRegistry,
        replicas: ReplicaIndex,
        reconciler: Reconciler,
        routing: RoutingPublisher,
        metrics: ManagerMetrics,
    ) -> None:
        self._clock = clock
        self._models = registry.models
        self._learn_start = registry.learn_start
        self._replicas = replicas
        self._reconciler = reconciler
        self._routing = routing
        self._metrics = metrics

    def adopt(self, record: WorkerRecord) -> None:
        """Take over engines a worker already runs (after a manager restart) when they still fit the registry."""
        for status in record.engines.values():
            if status.replica_id in self._replicas or status.state in (ReplicaState.FAILED, ReplicaState.STOPPING):
                continue  # a stopping engine is being drained: its worker stops it once its requests are done
            model = self._models.get(status.alias)
            if model is None or (status.model_name and status.model_name != model.spec.model_name):
                continue
            mine = self._replicas.of_alias(status.alias)
            if len(mine) >= model.spec.max_replicas:
                continue
            self._reconciler.add_replica(
                Replica(
                    replica_id=status.replica_id,
                    alias=status.alias,
                    worker_id=record.worker_id,
                    gpus=status.gpus,
                    fraction=model.spec.gpu_memory_utilization if status.gpus else 0.0,
                    state=status.state,
                    asleep=status.state is ReplicaState.SLEEPING,
                    asleep_since=self._clock(),
                    sleep_level=status.sleep_level or 1,
                )
            )
            model.scale.target = max(
                model.scale.target, sum(1 for r in mine if not r.asleep) + (status.state is not ReplicaState.SLEEPING)
            )
            log.info("adopted running engine %s of %s on %s", status.replica_id, status.alias, record.worker_id)

    def apply(self, record: WorkerRecord, rebuild: bool = True) -> None:
        """Fold a worker's engine reports into the replicas' actual state.

        Costs O(this worker's replicas): only the routes of models whose replica changed state are rebuilt, or,
        with `rebuild` (the worker registered or came back to healthy, so its endpoints enter routing), the
        routes of every model it runs. A heartbeat that changes nothing leaves the table alone."""
        mine = self._replicas.of_worker(record.worker_id)
        changed: set[str] = {r.alias for r in mine} if rebuild else set()
        now = self._clock()
        for replica in mine:
            report = record.engines.get(replica.replica_id)
            if replica.draining_since is not None:
                if report is None:  # drained and stopped: its memory is free
                    self._reconciler.remove_replica(replica.replica_id)
                    changed.add(replica.alias)
                    log.info("%s: stopped, %.1f s after it began to drain", replica.label, now - replica.draining_since)
                continue
            if report is not None and report.state is ReplicaState.STOPPING:
                # Its worker stops it on its own (the worker is shutting down): out of routing, placed elsewhere.
                retire(replica, now, "its worker is stopping it")
                changed.add(replica.alias)
                continue
            if report is None:
                # Not (or no longer) running there: the assignments make the worker start it.
                if replica.state not in (ReplicaState.FAILED, ReplicaState.PENDING):
                    replica.state = ReplicaState.PENDING
                    replica.start_at = now
                    changed.add(replica.alias)
                continue
            if report.state is ReplicaState.READY and replica.cold_start_at is not None:
                self._metrics.cold_start_done(replica.alias, now - replica.cold_start_at)
                replica.cold_start_at = None
            if replica.state is not report.state:
                if report.state is ReplicaState.READY:
                    self._ready(replica, now)
                changed.add(replica.alias)
                if report.state in _PHASES:
                    _log_phase(replica, report.state, now)
            replica.state = report.state
            if report.state is ReplicaState.FAILED:
                tail = "\n".join(report.log_tail[-20:])
                replica.error = f"{report.error or 'engine failed'}\n{tail}".strip()
        if changed:
            self._routing.rebuild(changed)

    def _ready(self, replica: Replica, now: float) -> None:
        """A replica became ready: what its start (or wake) took is learnt for the next ones' expected ready time."""
        replica.ready_at = None
        if replica.start_at is not None:
            wake = replica.state in (ReplicaState.WAKING, ReplicaState.SLEEPING)
            self._learn_start(replica.alias, now - replica.start_at, wake)


# The states a start goes through that the log tells, with the time since the start began (placement, a wake, an
# engine started again): one line each, never one per heartbeat.
_PHASES = (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.FAILED)


def _log_phase(replica: Replica, state: ReplicaState, now: float) -> None:
    began = replica.start_at
    if state is ReplicaState.STARTING:
        if began is not None and replica.state is ReplicaState.PENDING:
            log.info("%s: starting (placed %.1f s ago)", replica.label, now - began)
            return
        replica.start_at = now  # its worker starts it again (a crashed engine), or a woken one starts afresh
        log.info("%s: starting again (was %s)", replica.label, replica.state.value)
        return
    if began is None:
        log.info("%s: %s (was %s)", replica.label, state.value, replica.state.value)
    else:
        log.info("%s: %s after %.1f s", replica.label, state.value, now - began)
    replica.start_at = None  # that start is over
