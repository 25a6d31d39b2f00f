"""The manager's metrics: the fleet as the manager sees it (workers, models, replicas) and cold starts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Histogram
from starlette.responses import Response

from ..schemas import USAGE_COUNTS, ReplicaState, WorkerState
from .common import STARTUP_BUCKETS, TextFamily, metrics_response, one_hot, render

if TYPE_CHECKING:
    from ..manager.core import ManagerCore
    from ..manager.reconciler import ManagerStats


class ReplicaRow(NamedTuple):  # tuples: 10,000 of them are built on the event loop per scrape
    replica_id: str
    worker_id: str
    gpus: str  # "0,1", or "cpu"
    state: str


class ModelRow(NamedTuple):
    alias: str
    state: str
    desired: int
    replicas: tuple[ReplicaRow, ...]


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """What a scrape shows, copied out of the manager's live state as plain values: it is taken on the event loop
    that owns that state and formatted in a thread (see ManagerMetrics.render)."""

    workers: list[tuple[str, str, float]]  # worker id, state, seconds since its last heartbeat
    models: list[ModelRow]
    stats: ManagerStats
    # A hub model's files on a worker asked to prefetch them (manager/model_cache.py): alias, worker id, state,
    # bytes, total.
    cache: list[tuple[str, str, str, int, int | None]] = field(default_factory=list)


class FleetView(Protocol):
    """What the metrics read from ManagerCore (a protocol: core imports this module, not the reverse)."""

    def fleet_snapshot(self) -> FleetSnapshot: ...

    def usage_totals(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(tenant, model, counts in USAGE_COUNTS' order): the keys' usage every router reported. Called from the
        formatting thread (the ledger has its own lock and connection)."""
        ...


def _usage_text(totals: list[tuple[str, str, tuple[int, ...]]]) -> str:
    families = [
        TextFamily(
            f"svllm_usage_{name}_total",
            "counter",
            f"{doc}, per tenant and model, summed over every router process (their usage reports).",
            ["tenant", "model"],
        )
        for name, doc in USAGE_COUNTS.items()
    ]
    for tenant, model, counts in totals:
        for family, value in zip(families, counts, strict=True):
            family.add((tenant, model), value)
    return "".join(f.text() for f in families)


def _fleet_text(fleet: FleetSnapshot) -> str:
    worker_state = one_hot(
        TextFamily("svllm_worker_state", "gauge", "Workers by state (1 for the current state).", ["worker", "state"]),
        (((worker,), state) for worker, state, _ in fleet.workers),
        _WORKER_STATES,
    )
    age = TextFamily(
        "svllm_worker_heartbeat_age_seconds", "gauge", "Seconds since the worker's last heartbeat.", ["worker"]
    )
    for worker, _, seconds in fleet.workers:
        age.add((worker,), seconds)

    # Only the current state (not one-hot with zeros as for workers): a registry may hold 10,000 models.
    state = TextFamily(
        "svllm_model_state",
        "gauge",
        "Models by state: cold, loading, ready, sleeping, failed (1 = current).",
        ["model", "state"],
    )
    desired = TextFamily("svllm_model_desired_replicas", "gauge", "Replicas the autoscaler wants awake.", ["model"])
    replicas = TextFamily("svllm_model_replicas", "gauge", "Replicas by state (ready = serving).", ["model", "state"])
    info = TextFamily(
        "svllm_replica_info",
        "gauge",
        "One series per replica: where it runs and its state.",
        ["model", "replica", "worker", "gpus", "state"],
    )
    for m in fleet.models:
        state.add((m.alias, m.state), 1.0)
        desired.add((m.alias,), m.desired)
        if not m.replicas:
            # Most models of a large registry: one series (ready = 0) instead of one per state.
            replicas.add((m.alias, _READY), 0)
            continue
        counts = dict.fromkeys(_REPLICA_STATES, 0)
        for r in m.replicas:
            counts[r.state] += 1
            info.add((m.alias, r.replica_id, r.worker_id, r.gpus, r.state), 1.0)
        for replica_state, n in counts.items():
            replicas.add((m.alias, replica_state), n)

    cache_state = TextFamily(
        "svllm_model_cache_state",
        "gauge",
        "A hub model's files on a worker asked to prefetch them: queued, fetching, cached, failed (1 = current).",
        ["model", "worker", "state"],
    )
    cache_bytes = TextFamily(
        "svllm_model_cache_bytes", "gauge", "Bytes of a model's files in a worker's cache so far.", ["model", "worker"]
    )
    cache_total = TextFamily(
        "svllm_model_cache_total_bytes", "gauge", "Bytes of a model's files a worker prefetches.", ["model", "worker"]
    )
    for alias, worker, cached, done, total in fleet.cache:
        cache_state.add((alias, worker, cached), 1.0)
        cache_bytes.add((alias, worker), done)
        if total is not None:
            cache_total.add((alias, worker), total)

    stats = fleet.stats
    counters = [TextFamily(f"{name}_total", "counter", doc) for name, doc in _STATS]
    for family, value in zip(
        counters, (stats.placements_failed, stats.evictions, stats.failovers, stats.engine_failures), strict=True
    ):
        family.add((), value)
    families = (worker_state, age, state, desired, replicas, info, cache_state, cache_bytes, cache_total, *counters)
    return "".join(f.text() for f in families)


_WORKER_STATES = [s.value for s in WorkerState]
_REPLICA_STATES = [s.value for s in ReplicaState]
_READY = ReplicaState.READY.value
_STATS = (  # ManagerStats' counters, in the order _fleet_text reads them
    ("svllm_manager_placement_failures", "Replicas that could not be placed (no capacity)."),
    ("svllm_manager_evictions", "Idle replicas evicted to make room for another model."),
    ("svllm_manager_failovers", "Replicas lost with a dead worker and placed again."),
    ("svllm_manager_engine_failures", "Replicas whose engine failed (start failure or crash loop)."),
)


class ManagerMetrics:
    """Owned by ManagerCore; `render()` is the exposition served at GET /metrics (or relayed, in Ray mode)."""

    def __init__(self, core: FleetView) -> None:
        self._core = core
        # The duration histogram, through prometheus_client; the fleet's series and the cold-start counts are
        # written per scrape by _format (a count for every registered model: 10,000 of them).
        self.registry = CollectorRegistry()
        self._cold_start_seconds = Histogram(
            "svllm_cold_start_duration_seconds",
            "From placing a cold model's replica to its first ready report.",
            ["model"],
            buckets=STARTUP_BUCKETS,
            registry=self.registry,
        )
        self._cold_starts: dict[str, int] = {}  # alias -> replicas placed for it while it had none

    def cold_start(self, alias: str) -> None:
        self._cold_starts[alias] = self._cold_starts.get(alias, 0) + 1
        # The duration series appear with a model's first cold start (at 0, before its first observation, so
        # increase() counts that one): a histogram per registered model would be ~20 series each.
        self._cold_start_seconds.labels(alias)

    def cold_start_done(self, alias: str, seconds: float) -> None:
        self._cold_start_seconds.labels(alias).observe(seconds)

    def forget(self, alias: str) -> None:
        """The model was deleted: its series go (labels stay bounded), and an alias registered again counts
        from 0."""
        self._cold_starts.pop(alias, None)
        try:
            self._cold_start_seconds.remove(alias)
        except KeyError:
            pass

    async def render(self) -> bytes:
        """Called on the event loop that owns the manager's state. With 10,000 models a scrape is ~70,000
        series, and formatting them takes a few hundred milliseconds of CPU that on the loop would hold up
        every heartbeat and routing call. The loop only copies the plain values out; a thread formats them,
        and the loop keeps answering between the interpreter's thread switches."""
        fleet = self._core.fleet_snapshot()
        counts = dict(self._cold_starts)  # the loop goes on counting while the thread writes
        return await asyncio.to_thread(self._format, fleet, counts)

    def _format(self, fleet: FleetSnapshot, cold_starts: dict[str, int]) -> bytes:
        # Every registered model's counter, from its registration at 0, so that rate() and increase() see the
        # first cold start.
        counter = TextFamily(
            "svllm_cold_starts_total", "counter", "Replicas placed for a model that had none.", ["model"]
        )
        for m in fleet.models:
            counter.add((m.alias,), cold_starts.get(m.alias, 0))
        # prometheus_client's metrics lock their own state, so the histogram may be read from this thread.
        usage = _usage_text(self._core.usage_totals())
        return (_fleet_text(fleet) + counter.text() + usage).encode() + render(self.registry)


def install_manager_metrics(app: FastAPI, core: ManagerCore) -> None:
    """GET /metrics and the service discovery endpoints of the manager's HTTP service."""

    # Async handlers on purpose: they run on the event loop that owns the core's state, never in a thread.
    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return metrics_response(await core.metrics_text())

    @app.get("/sd/targets")
    async def sd_engines() -> list[dict[str, Any]]:
        return core.sd_targets("engines")

    @app.get("/sd/workers")
    async def sd_workers() -> list[dict[str, Any]]:
        return core.sd_targets("workers")
