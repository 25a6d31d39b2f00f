"""The manager's metrics: the fleet as the manager sees it (workers, models, replicas) and cold starts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.responses import Response

from ..schemas import ModelInfo, ReplicaState, WorkerInfo, WorkerState
from .common import STARTUP_BUCKETS, metrics_response, one_hot, render

if TYPE_CHECKING:
    from ..manager.core import ManagerCore, ManagerStats


class FleetView(Protocol):
    """What the collector reads from ManagerCore (a protocol: core imports this module, not the reverse)."""

    stats: ManagerStats

    def list_workers(self) -> list[WorkerInfo]: ...
    def list_models(self) -> list[ModelInfo]: ...


class _FleetCollector(Collector):
    def __init__(self, core: FleetView) -> None:
        self._core = core

    def collect(self) -> Iterator[Metric]:
        workers = self._core.list_workers()
        models = self._core.list_models()
        yield one_hot("svllm_worker_state", "Workers by state (1 for the current state).", ["worker"],
                      (([w.worker_id], w.state.value) for w in workers), [s.value for s in WorkerState])
        age = GaugeMetricFamily("svllm_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat.",
                                labels=["worker"])
        for w in workers:
            age.add_metric([w.worker_id], w.heartbeat_age_s)
        yield age

        # Only the current state (not one-hot with zeros as for workers): a registry may hold 10,000 models.
        state = GaugeMetricFamily("svllm_model_state", "Models by state: cold, loading, ready, sleeping, failed "
                                  "(1 = current).", labels=["model", "state"])
        for m in models:
            state.add_metric([m.alias, m.state.value], 1.0)
        yield state
        desired = GaugeMetricFamily("svllm_model_desired_replicas", "Replicas the autoscaler wants awake.",
                                    labels=["model"])
        replicas = GaugeMetricFamily("svllm_model_replicas", "Replicas by state (ready = serving).",
                                     labels=["model", "state"])
        info = GaugeMetricFamily("svllm_replica_info", "One series per replica: where it runs and its state.",
                                 labels=["model", "replica", "worker", "gpus", "state"])
        for m in models:
            desired.add_metric([m.alias], m.desired_replicas)
            if not m.replicas:
                # Most models of a large registry: one series (ready = 0) instead of one per state.
                replicas.add_metric([m.alias, ReplicaState.READY.value], 0)
                continue
            counts = {s.value: 0 for s in ReplicaState}
            for r in m.replicas:
                counts[r.state.value] += 1
                gpus = ",".join(str(g) for g in r.gpus) or "cpu"
                info.add_metric([m.alias, r.replica_id, r.worker_id, gpus, r.state.value], 1.0)
            for state, n in counts.items():
                replicas.add_metric([m.alias, state], n)
        yield from (desired, replicas, info)

        stats = self._core.stats
        for name, doc, value in (
            ("svllm_manager_placement_failures", "Replicas that could not be placed (no capacity).",
             stats.placements_failed),
            ("svllm_manager_evictions", "Idle replicas evicted to make room for another model.", stats.evictions),
            ("svllm_manager_failovers", "Replicas lost with a dead worker and placed again.", stats.failovers),
            ("svllm_manager_engine_failures", "Replicas whose engine failed (start failure or crash loop).",
             stats.engine_failures),
        ):
            yield CounterMetricFamily(name, doc, value=value)


class ManagerMetrics:
    """Owned by ManagerCore; `render()` is the exposition served at GET /metrics (or relayed, in Ray mode)."""

    def __init__(self, core: FleetView) -> None:
        self._core = core
        self.registry = CollectorRegistry()
        self.registry.register(_FleetCollector(core))
        self._cold_starts = Counter("svllm_cold_starts", "Replicas placed for a model that had none.", ["model"],
                                    registry=self.registry)
        self._cold_start_seconds = Histogram(
            "svllm_cold_start_duration_seconds", "From placing a cold model's replica to its first ready report.",
            ["model"], buckets=STARTUP_BUCKETS, registry=self.registry)
        self._aliases: set[str] = set()

    def cold_start(self, alias: str) -> None:
        self._cold_starts.labels(alias).inc()
        # The duration series appear with a model's first cold start (at 0, before its first observation, so
        # increase() counts that one): a histogram per registered model would be ~20 series each.
        self._cold_start_seconds.labels(alias)

    def cold_start_done(self, alias: str, seconds: float) -> None:
        self._cold_start_seconds.labels(alias).observe(seconds)

    def _sync_models(self) -> None:
        # The cold-start counter of every registered model exists from its registration at 0, so rate() and
        # increase() see the first cold start; the series of deleted models go, so labels stay bounded.
        aliases = {m.alias for m in self._core.list_models()}
        for alias in aliases - self._aliases:
            self._cold_starts.labels(alias)
        for alias in self._aliases - aliases:
            for metric in (self._cold_starts, self._cold_start_seconds):
                try:
                    metric.remove(alias)
                except KeyError:
                    pass
        self._aliases = aliases

    def render(self) -> bytes:
        self._sync_models()
        return render(self.registry)


def install_manager_metrics(app: FastAPI, core: ManagerCore) -> None:
    """GET /metrics and the service discovery endpoints of the manager's HTTP service."""

    # Async handlers on purpose: they run on the event loop that owns the core's state, never in a thread.
    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return metrics_response(core.metrics_text())

    @app.get("/sd/targets")
    async def sd_engines() -> list[dict[str, Any]]:
        return core.sd_targets("engines")

    @app.get("/sd/workers")
    async def sd_workers() -> list[dict[str, Any]]:
        return core.sd_targets("workers")
