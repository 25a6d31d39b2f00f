"""The worker's metrics: its engines by state, engine starts, crashes and restarts, GPUs; and the relay of each
engine's own /metrics (engines listen on the worker's loopback only, so Prometheus scrapes them through it)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.responses import Response

from ..errors import APIError
from ..schemas import ReplicaState
from .common import CONTENT_TYPE, STARTUP_BUCKETS, metrics_response, render
from .gpu import GPUCollector

if TYPE_CHECKING:
    from ..worker.agent import WorkerAgent
    from ..worker.gpus import GPUProbe

ENGINE_METRICS_TIMEOUT_S = 5.0
# States in which an engine is serving (or could at once): leaving them for STARTING or FAILED is a crash.
_SERVING = frozenset({ReplicaState.READY, ReplicaState.SLEEPING, ReplicaState.WAKING})


class EngineView(Protocol):
    """The parts of EngineProcess the metrics read."""

    @property
    def replica_id(self) -> str: ...
    @property
    def alias(self) -> str: ...
    @property
    def state(self) -> ReplicaState: ...
    @property
    def restarts(self) -> int: ...


@dataclass
class _Seen:
    alias: str
    state: ReplicaState
    restarts: int
    starting_since: float  # monotonic; when the engine last entered STARTING


class _EngineCollector(Collector):
    def __init__(self, engines: Callable[[], Iterable[EngineView]]) -> None:
        self._engines = engines

    def collect(self) -> Iterator[Metric]:
        counts: dict[str, dict[str, int]] = {}
        for e in self._engines():
            counts.setdefault(e.alias, {s.value: 0 for s in ReplicaState})[e.state.value] += 1
        family = GaugeMetricFamily(
            "svllm_worker_engines", "Engines on this worker by model and state.", labels=["model", "state"]
        )
        for alias, by_state in sorted(counts.items()):
            for state, n in by_state.items():
                family.add_metric([alias, state], n)
        yield family


class WorkerMetrics:
    """Owned by the WorkerAgent, which calls `engine_started` for each engine it launches and `engines_changed`
    whenever an engine reports a state change; transitions are turned into counters here."""

    def __init__(self, probe: GPUProbe, engines: Callable[[], Iterable[EngineView]]) -> None:
        self._engines = engines
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engines))
        self.registry.register(GPUCollector(probe))
        r = self.registry
        self._starts = Counter("svllm_engine_starts", "Engines launched for an assignment.", ["model"], registry=r)
        self._restarts = Counter(
            "svllm_engine_restarts", "Automatic engine restarts after a crash.", ["model"], registry=r
        )
        self._crashes = Counter("svllm_engine_crashes", "Engines that exited while serving.", ["model"], registry=r)
        self._start_failures = Counter(
            "svllm_engine_start_failures",
            "Engines that failed before becoming ready (or gave up restarting).",
            ["model"],
            registry=r,
        )
        self._start_seconds = Histogram(
            "svllm_engine_start_duration_seconds",
            "From launch (or crash) to the engine answering /health.",
            ["model"],
            buckets=STARTUP_BUCKETS,
            registry=r,
        )
        self._prefetches = Counter(
            "svllm_worker_prefetches",
            "Hub models downloaded into this worker's cache before an engine needed them, by result (cached, failed).",
            ["model", "result"],
            registry=r,
        )
        self._prefetch_seconds = Histogram(
            "svllm_worker_prefetch_duration_seconds",
            "How long a model's prefetch took (listing, download), whatever its result.",
            ["model"],
            buckets=STARTUP_BUCKETS,
            registry=r,
        )
        self._hub_up = Gauge(
            "svllm_worker_hub_up",
            "1 if the Hugging Face hub answered the worker's last probe, 0 if not (models whole in the cache then "
            "start offline); absent until probed.",
            ["endpoint"],
            registry=r,
        )
        self._seen: dict[str, _Seen] = {}

    def engine_started(self, engine: EngineView) -> None:
        alias = engine.alias
        # Every series of the model exists from here at 0, so rate() sees the first crash or restart.
        for metric in (self._restarts, self._crashes, self._start_failures, self._start_seconds):
            metric.labels(alias)
        self._starts.labels(alias).inc()
        self._seen[engine.replica_id] = _Seen(alias, engine.state, engine.restarts, time.monotonic())

    def prefetch_done(self, model: str, result: str, seconds: float) -> None:
        """A prefetch (worker/prefetch.py) ended: `result` is cached or failed."""
        self._prefetches.labels(model, result).inc()
        self._prefetch_seconds.labels(model).observe(seconds)

    def hub_changed(self, endpoint: str, up: bool) -> None:
        self._hub_up.labels(endpoint).set(1 if up else 0)

    def engines_changed(self, engines: Iterable[EngineView]) -> None:
        now = time.monotonic()
        live: dict[str, _Seen] = {}
        for engine in engines:
            seen = self._seen.get(engine.replica_id)
            if seen is not None:
                self._update(seen, engine, now)
                live[engine.replica_id] = seen
        self._seen = live  # engines the worker dropped are forgotten

    def _update(self, seen: _Seen, engine: EngineView, now: float) -> None:
        if engine.restarts > seen.restarts:
            self._restarts.labels(seen.alias).inc(engine.restarts - seen.restarts)
            seen.restarts = engine.restarts
        state = engine.state
        if state is seen.state:
            return
        if seen.state in _SERVING and state in (ReplicaState.STARTING, ReplicaState.FAILED):
            self._crashes.labels(seen.alias).inc()
        elif seen.state is ReplicaState.STARTING and state is ReplicaState.FAILED:
            self._start_failures.labels(seen.alias).inc()
        elif seen.state is ReplicaState.STARTING and state is ReplicaState.READY:
            self._start_seconds.labels(seen.alias).observe(now - seen.starting_since)
        if state is ReplicaState.STARTING:
            seen.starting_since = now
        seen.state = state

    def render(self) -> bytes:
        self.engines_changed(self._engines())  # restarts counted even if no state change reported them yet
        return render(self.registry)


def install_worker_metrics(
    app: FastAPI, agent: Callable[[], WorkerAgent], client: Callable[[], httpx.AsyncClient]
) -> None:
    """GET /metrics (the worker's own) and GET /engines/{replica_id}/metrics (an engine's vLLM metrics)."""

    @app.get("/metrics", include_in_schema=False)
    async def worker_metrics() -> Response:
        return metrics_response(agent().metrics.render())

    @app.get("/engines/{replica_id}/metrics", include_in_schema=False)
    async def engine_metrics(replica_id: str) -> Response:
        engine = agent().engines.get(replica_id)
        if engine is None:
            raise APIError(404, f"no engine {replica_id!r} on this worker", "replica_not_found")
        if engine.port is None:
            raise APIError(503, f"engine {replica_id!r} has no server yet", "replica_unavailable")
        try:
            resp = await client().get(f"{engine.base_url}/metrics", timeout=ENGINE_METRICS_TIMEOUT_S)
        except httpx.HTTPError as exc:
            raise APIError(
                503, f"engine {replica_id!r} unreachable ({type(exc).__name__})", "replica_unavailable"
            ) from None
        # Relayed as is: vLLM's exposition, its content type included.
        return Response(
            content=resp.content,
            status_code=resp.status_code,
            media_type=resp.headers.get("content-type", CONTENT_TYPE),
        )
