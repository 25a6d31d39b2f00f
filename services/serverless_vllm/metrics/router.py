"""The router's metrics: requests by model and status, latency and time to first token, load per model.

The hot path pays one histogram and one counter update per request: label children are cached in plain
dicts (bounded: registered aliases x the endpoint labels of dataplane/endpoints.py x the status codes seen), so
no `labels()` lookup and no lock of ours per request. In flight and queued are read from the routing table at
scrape time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..dataplane.endpoints import LABELS, RESPONSES_PREFIX
from ..manager.protocol import ManagerAPI
from ..router.table import RouteTable
from . import sd
from .common import LATENCY_BUCKETS, STARTUP_BUCKETS, UNKNOWN_MODEL, metrics_response, render

# The inference handlers put the request's model here (in the ASGI scope) for the middleware to label it.
MODEL_SCOPE_KEY = "svllm.model"
# Inference paths and their `endpoint` label (dataplane/endpoints.py); nothing else is measured.
INFERENCE_ENDPOINTS = LABELS
# The labels whose series exist before the first request (the rest appear with their first request): every label
# for every model would be ~30 histograms per alias, too many at 10,000 models.
_PRECREATED = ("chat_completions", "completions")
# Above this many routed models, no series is created before a model's first request: at 10,000 models the series at
# 0 were ~85 per model (five histograms), 850,000 in all, and a scrape took 9 s of CPU (bench/router_scrape.py).
PRECREATE_MAX_MODELS = 1000

TableGetter = Callable[[], RouteTable | None]


class _LoadCollector(Collector):
    """In flight, queued and prefix hits per model, from a copy of the table's counters taken on the event loop
    (take()): the text is written in a thread, which must not iterate the loop's live dicts."""

    def __init__(self, table: TableGetter) -> None:
        self._table = table
        self._loads: list[tuple[str, int, int]] = []  # (alias, in flight, queued)
        self._prefix: list[tuple[str, int, int]] = []  # (alias, blocks, hit blocks)

    def take(self) -> None:
        table = self._table()
        if table is None:
            self._loads, self._prefix = [], []
            return
        self._loads = [(a, table.in_flight(a), table.queue_depth(a)) for a in sorted(table.aliases())]
        self._prefix = [(a, s.blocks, s.hit_blocks) for a, s in sorted(table.prefix_stats().items())]

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "svllm_router_in_flight_requests",
            "Requests being answered by a replica, per model (this router).",
            labels=["model"],
        )
        queued = GaugeMetricFamily(
            "svllm_router_queued_requests",
            "Requests waiting for a ready replica (cold start, wake), per model (this router).",
            labels=["model"],
        )
        # Prefix routing as this router sees it, for the models registered with `routing: prefix` (zeros from the
        # first scrape): hit_blocks / blocks is its hit ratio, beside the engines' own vllm:prefix_cache_hits.
        blocks = CounterMetricFamily(
            "svllm_router_prefix_blocks",
            "Prompt blocks (128 characters) of the requests routed by prefix, per model (this router).",
            labels=["model"],
        )
        hit_blocks = CounterMetricFamily(
            "svllm_router_prefix_hit_blocks",
            "Of those, the leading blocks the chosen replica had been sent before (within PREFIX_ROUTING_TTL).",
            labels=["model"],
        )
        for alias, n_in_flight, n_queued in self._loads:
            in_flight.add_metric([alias], n_in_flight)
            queued.add_metric([alias], n_queued)
        for alias, n_blocks, n_hits in self._prefix:
            blocks.add_metric([alias], n_blocks)
            hit_blocks.add_metric([alias], n_hits)
        yield in_flight
        yield queued
        yield blocks
        yield hit_blocks


class RouterMetrics:
    def __init__(self, table: TableGetter) -> None:
        self._table = table
        self.registry = CollectorRegistry()
        self._load = _LoadCollector(table)
        self.registry.register(self._load)
        self._precreated: set[str] = set()  # aliases whose series exist from 0 (see _prepare)
        self._requests = Counter(
            "svllm_requests",
            "Inference requests answered, by model, endpoint and status.",
            ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "svllm_request_duration_seconds",
            "End-to-end latency of inference requests, to the last byte (queueing included).",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._ttft = Histogram(
            "svllm_time_to_first_token_seconds",
            "Streaming requests: time from arrival to the first streamed event.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._queue_wait = Histogram(
            "svllm_router_queue_wait_seconds",
            "Time requests waited for a ready replica (cold start or wake seen by clients).",
            ["model"],
            buckets=STARTUP_BUCKETS,
            registry=self.registry,
        )
        self._request_children: dict[tuple[str, str, str], Any] = {}
        self._duration_children: dict[tuple[str, str], Any] = {}
        self._ttft_children: dict[tuple[str, str], Any] = {}

    def model_label(self, alias: object) -> str:
        # Only registered aliases become label values: a client cannot grow the series with random names.
        table = self._table()
        if isinstance(alias, str) and table is not None and table.route(alias) is not None:
            return alias
        return UNKNOWN_MODEL

    def observe_request(self, alias: object, endpoint: str, status: int, duration: float, ttft: float | None) -> None:
        model = self.model_label(alias)
        key = (model, endpoint, str(status))
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self._requests.labels(*key)
        counter.inc()
        self._child(self._duration_children, self._duration, model, endpoint).observe(duration)
        if ttft is not None:
            self._child(self._ttft_children, self._ttft, model, endpoint).observe(ttft)

    @staticmethod
    def _child(cache: dict[tuple[str, str], Any], metric: Histogram, model: str, endpoint: str) -> Any:
        child = cache.get((model, endpoint))
        if child is None:
            child = cache[(model, endpoint)] = metric.labels(model, endpoint)
        return child

    def observe_queue_wait(self, alias: str, seconds: float) -> None:
        self._queue_wait.labels(self.model_label(alias)).observe(seconds)

    def _prepare(self) -> None:
        """On the event loop: the series of models routed since the last scrape are created (at 0 before their
        first request, so that rate() and histogram_quantile() see the first observations: a series born at 1
        shows no increase; up to PRECREATE_MAX_MODELS models), and the table's counters copied."""
        table = self._table()
        aliases = table.aliases() if table is not None else {}
        for alias in aliases if len(aliases) <= PRECREATE_MAX_MODELS else ():
            if alias in self._precreated:
                continue
            self._precreated.add(alias)
            self._queue_wait.labels(alias)
            for endpoint in _PRECREATED:
                self._child(self._duration_children, self._duration, alias, endpoint)
                self._child(self._ttft_children, self._ttft, alias, endpoint)
        self._load.take()

    def render(self) -> bytes:
        self._prepare()
        return render(self.registry)

    async def render_off_loop(self) -> bytes:
        """What GET /metrics answers. With 10,000 models a scrape is ~100,000 series: written in a thread, so the
        loop that relays inference keeps going meanwhile (bench/router_scrape.py); the loop only copies counters."""
        self._prepare()
        return await asyncio.to_thread(render, self.registry)


class RequestMetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: streaming bodies pass untouched) timing inference requests.

    Status comes from the response start, the first token time from the first non-empty body chunk of an
    event stream, the latency from the end of the body. Errors answered by the app's handlers (400, 404, 503)
    are counted with their status; an exception that escapes counts as 500.
    """

    def __init__(self, app: ASGIApp, metrics: RouterMetrics) -> None:
        self.app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = INFERENCE_ENDPOINTS.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None and scope["type"] == "http" and scope["path"].startswith(RESPONSES_PREFIX):
            endpoint = "responses"  # a stored response's GET or cancel
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        streaming = False
        first: float | None = None

        async def timed_send(message: Message) -> None:
            nonlocal status, streaming, first
            if message["type"] == "http.response.start":
                status = message["status"]
                streaming = any(
                    k == b"content-type" and v.startswith(b"text/event-stream") for k, v in message.get("headers", ())
                )
            elif first is None and message["type"] == "http.response.body":
                body = message.get("body")
                if body and body[:1] != b":":  # the first event: a held stream's keep-alive comments are none
                    first = time.perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            ttft = first - start if streaming and first is not None else None
            self._metrics.observe_request(
                scope.get(MODEL_SCOPE_KEY), endpoint, status, time.perf_counter() - start, ttft
            )


def install_router_metrics(app: FastAPI, metrics: RouterMetrics, manager: Callable[[], ManagerAPI]) -> None:
    """GET /metrics, the manager's metrics and service discovery relayed (the manager may have no HTTP port of
    its own: a Ray actor in hybrid mode), and the request timing middleware."""
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    async def router_metrics() -> Response:
        return metrics_response(await metrics.render_off_loop())

    @app.get("/manager/metrics", include_in_schema=False)
    async def manager_metrics() -> Response:
        return metrics_response(await manager().metrics_text())

    # Service discovery from the manager's worker list (every ManagerAPI has it): the same answer as the
    # manager's own /sd endpoints, over HTTP or Ray alike.
    @app.get("/sd/targets")
    async def sd_engines() -> JSONResponse:
        return JSONResponse(sd.targets(await manager().list_workers(), "engines"))

    @app.get("/sd/workers")
    async def sd_workers() -> JSONResponse:
        return JSONResponse(sd.targets(await manager().list_workers(), "workers"))
